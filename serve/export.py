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
from core.files import atomic_write_text, read_json
from core.tokenizer import TokenizerInfo
from model.export_hf import ExportError, TokenizerFiles, export_hf
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
    return TokenizerFiles(info.path.read_text(encoding="utf-8"), CHAT_TEMPLATE, bos, eos, pad, ids, stops,
                          conf.get("model_max_length"), keep)


def export(loaded: LoadedModel, fmt: str, out: str | Path, dtype: str, progress: bool = False,
           write_modelfile: bool = True) -> list[Path]:
    """Write ``loaded`` as ``fmt`` (hf | gguf) to ``out``; returns the paths written."""
    tok = tokenizer_files(loaded.tokenizer)
    state, config = loaded.state(), loaded.config
    out = Path(out)
    try:
        if fmt == "hf":
            if dtype not in HF_DTYPES:
                raise ToolError(f"--dtype {dtype}: hf export takes {', '.join(HF_DTYPES)}")
            return [export_hf(state, config, tok, out, HF_DTYPES[dtype])]
        if fmt == "gguf":
            from model.export_gguf import export_gguf, modelfile, vocab_from_tokenizer_json

            if dtype not in GGUF_DTYPES:
                raise ToolError(f"--dtype {dtype}: gguf export takes {', '.join(GGUF_DTYPES)}")
            if out.is_dir():
                raise ToolError(f"{out}: is a directory; give the .gguf file to write")
            vocab = vocab_from_tokenizer_json(json.loads(tok.tokenizer_json), config.vocab_size,
                                              tok.chat_template, tok.bos_token, tok.eos_token, tok.pad_token,
                                              eot=IM_END if IM_END in tok.token_ids else None)
            name = loaded.run_folder.name or "tinylm"
            written = [export_gguf(state, config, vocab, out, dtype, name=name, progress=progress)]
            if write_modelfile:
                mf = out.parent / "Modelfile"
                atomic_write_text(mf, modelfile(out.name))
                written.append(mf)
            return written
    except ExportError as e:  # the writers do not know the file: name it, keep the error
        e.path = e.path or loaded.checkpoint.path
        raise
    raise ToolError(f"--format {fmt}: must be hf or gguf")
