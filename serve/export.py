"""From a loaded model to exported files: the tokenizer as the writers take it, and the writer of each format.

``bin/export`` loads the checkpoint with :func:`train.loading.load_model` (a LoRA checkpoint comes back
merged into the base it records, so it exports like the dense model ``bin/merge`` writes) and hands it to
:func:`export`. The writers themselves are ``model/export_hf.py`` and ``model/export_gguf.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.chat_template import CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START, STOP_TOKENS
from core.files import (
    FileWriteError,
    Named,
    check_output_folder,
    publish_together,
    read_json,
    refuse_inputs,
    refuse_special,
    temp_path,
)
from core.tokenizer import TokenizerInfo
from model.export_hf import HF_FILES, ExportError, TokenizerFiles, export_hf
from serve.source_args import ToolError
from train.loading import LoadedModel

HF_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
GGUF_DTYPES = ("f32", "f16", "q8_0")


def tokenizer_files(info: TokenizerInfo) -> TokenizerFiles:
    """The tokenizer as the writers take it: tokenizer.json text, ChatML template, special tokens from
    ``tokenizer_config.json`` beside it (defaults: bos ``<|im_start|>``, eos ``<|im_end|>``, pad
    ``<|endoftext|>``); ``<|endoftext|>`` also ends generation."""
    conf_file = info.path.parent / "tokenizer_config.json"
    conf: dict[str, Any] = {}
    if conf_file.is_file():
        conf = read_json(conf_file, "tokenizer config")
        if not isinstance(conf, dict):
            raise ToolError("not a JSON object", path=conf_file)

    def token(key: str, default: str) -> str | None:
        value = conf.get(key, default)
        if isinstance(value, dict):  # {"content": ..., "lstrip": ...} form
            value = value.get("content")
        if value is not None and info.tokenizer.token_to_id(value) is None:
            raise ToolError(f"{conf_file}: field {key!r}: token {value!r} is not in {info.path}")
        return value

    bos, eos, pad = token("bos_token", IM_START), token("eos_token", IM_END), token("pad_token", ENDOFTEXT)
    if eos is None:
        raise ToolError(f"{conf_file}: field 'eos_token' is empty; a chat model needs one")
    stops = tuple(t for t in STOP_TOKENS if info.tokenizer.token_to_id(t) is not None)
    ids = {t: info.tokenizer.token_to_id(t) for t in {bos, eos, pad, *stops} if t is not None}
    keep = {k: conf[k] for k in ("unk_token", "clean_up_tokenization_spaces", "spaces_between_special_tokens",
                                 "add_prefix_space") if k in conf}
    template = info.chat.jinja or CHAT_TEMPLATE  # the family the model renders with, as its Jinja text
    return TokenizerFiles(info.path.read_text(encoding="utf-8"), template, bos, eos, pad, ids, stops,
                          conf.get("model_max_length"), keep)


def model_inputs(loaded: LoadedModel) -> list[Named]:
    """The files an export of ``loaded`` reads, which its outputs must never replace: the checkpoint, its run
    folder, the tokenizer, and a LoRA checkpoint's base."""
    inputs: list[Named] = [("--ckpt", loaded.checkpoint.path), ("--ckpt's run folder", loaded.run_folder),
                           ("tokenizer", loaded.tokenizer.path)]
    base = getattr(loaded.checkpoint, "base", None)
    if base is not None and getattr(base, "path", None):
        inputs.append(("the LoRA base checkpoint", base.path))
    return inputs


def check_export_target(loaded: LoadedModel, fmt: str, out: Path, write_modelfile: bool) -> None:
    """Refuse, before any work, an ``out`` that would replace an input or (hf) a folder holding other files
    (:func:`core.files.check_output_folder`: missing, empty, or only the files an hf export writes)."""
    inputs = model_inputs(loaded)
    if fmt == "hf":
        if out.exists() and not out.is_dir():
            raise ExportError(f"{out}: exists and is not a directory")
        check_output_folder(out, "bin/export", HF_FILES.__contains__, inputs)
        return
    if out.is_dir():
        raise ToolError(f"{out}: is a directory; give the .gguf file to write")
    refuse_inputs(out, inputs)
    refuse_special(out)
    if write_modelfile:
        refuse_inputs(out.parent / "Modelfile", [*inputs, ("--out", out)], "the Modelfile beside --out")
        refuse_special(out.parent / "Modelfile")


def export(loaded: LoadedModel, fmt: str, out: str | Path, dtype: str, progress: bool = False,
           write_modelfile: bool = True) -> list[Path]:
    """Write ``loaded`` as ``fmt`` (hf | gguf) to ``out``; returns the paths written. An output never
    replaces an input (:func:`check_export_target`); the GGUF file and its Modelfile are published together
    (a failure leaves both as they were)."""
    out = Path(out)
    check_export_target(loaded, fmt, out, write_modelfile)
    tok = tokenizer_files(loaded.tokenizer)
    state, config = loaded.state(), loaded.config
    try:
        if fmt == "hf":
            if dtype not in HF_DTYPES:
                raise ToolError(f"--dtype {dtype}: hf export takes {', '.join(HF_DTYPES)}")
            return [export_hf(state, config, tok, out, HF_DTYPES[dtype])]
        if fmt == "gguf":
            from model.export_gguf import export_gguf, modelfile, vocab_from_tokenizer_json

            if dtype not in GGUF_DTYPES:
                raise ToolError(f"--dtype {dtype}: gguf export takes {', '.join(GGUF_DTYPES)}")
            vocab = vocab_from_tokenizer_json(json.loads(tok.tokenizer_json), config.vocab_size,
                                              tok.chat_template, tok.bos_token, tok.eos_token, tok.pad_token,
                                              eot=IM_END if IM_END in tok.token_ids else None)
            name = loaded.run_folder.name or "tinylm"
            gguf_tmp = temp_path(out)
            try:
                export_gguf(state, config, vocab, gguf_tmp, dtype, name=name, progress=progress)
            except FileWriteError as e:  # it wrote the temp name: the user knows --out
                e.path = out if e.path == gguf_tmp else e.path
                raise
            pairs = [(gguf_tmp, out)]
            if write_modelfile:
                mf = out.parent / "Modelfile"
                mf_tmp = temp_path(mf)
                try:
                    mf_tmp.write_text(modelfile(out.name), encoding="utf-8")
                except OSError as e:
                    gguf_tmp.unlink(missing_ok=True)
                    mf_tmp.unlink(missing_ok=True)
                    raise FileWriteError(f"cannot write ({e.strerror or e})", path=mf) from None
                pairs.append((mf_tmp, mf))
            publish_together(pairs)
            return [path for _, path in pairs]
    except ExportError as e:  # the writers do not know the file: name it, keep the error
        e.path = e.path or loaded.checkpoint.path
        raise
    raise ToolError(f"--format {fmt}: must be hf or gguf")
