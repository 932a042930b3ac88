"""From a checkpoint to exported files: load the dense model and its tokenizer, hand them to the writers.

``load_trained(path)`` is what ``bin/export`` and ``bin/eval`` share: the checkpoint (file or run
folder), its model config and dense weights, and the tokenizer recorded in it, loaded by
``train.inference.load_for_inference`` (the loader bin/chat and bin/serve use). A LoRA checkpoint
(adapter only) is merged into the base it records, so it exports like the dense model ``bin/merge``
writes. The writers themselves are ``model/export_hf.py`` and ``model/export_gguf.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.chat_template import CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START
from core.errors import TinyLMError
from core.files import atomic_write_text, read_json
from core.tokenizer import TokenizerInfo
from model import ModelConfig, TinyLM
from model.export_hf import ExportError, TokenizerFiles, export_hf
from train import checkpoint
from train.checkpoint import CheckpointError
from train.inference import load_for_inference

HF_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
GGUF_DTYPES = ("f32", "f16", "q8_0")


class ToolError(TinyLMError):
    """A user-facing problem of bin/export or bin/eval: one line naming the file or field."""


@dataclass
class Trained:
    ckpt: dict[str, Any]  # the loaded checkpoint (``path`` = the file)
    config: ModelConfig
    state: dict[str, torch.Tensor]  # dense weights, our (= transformers') names
    tokenizer: TokenizerInfo

    @property
    def run_folder(self) -> Path:
        return Path(self.ckpt["path"]).parent

    def model(self, device: str | torch.device = "cpu") -> TinyLM:
        """A fresh TinyLM with these weights, in eval mode."""
        model = TinyLM(self.config)
        checkpoint.load_model_state(model, self.state, self.ckpt["path"])
        return model.to(device).eval()


def load_trained(path: str | Path) -> Trained:
    """Load a checkpoint and its tokenizer via ``train.inference`` (a LoRA checkpoint comes back with its
    adapter merged into the base it records, as ``bin/merge`` would write it); ToolError with one line."""
    try:
        loaded = load_for_inference(path)
    except CheckpointError as e:
        raise ToolError(str(e)) from None
    model = loaded.model
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return Trained(loaded.ckpt, model.config, state, loaded.tokenizer)


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
    stops = tuple(t for t in (IM_END, ENDOFTEXT) if info.tokenizer.token_to_id(t) is not None)
    ids = {t: info.tokenizer.token_to_id(t) for t in {bos, eos, pad, *stops} if t is not None}
    keep = {k: conf[k] for k in ("unk_token", "clean_up_tokenization_spaces", "spaces_between_special_tokens",
                                 "add_prefix_space") if k in conf}
    return TokenizerFiles(info.path.read_text(encoding="utf-8"), CHAT_TEMPLATE, bos, eos, pad, ids, stops,
                          conf.get("model_max_length"), keep)


def export(trained: Trained, fmt: str, out: str | Path, dtype: str, progress: bool = False,
           write_modelfile: bool = True) -> list[Path]:
    """Write ``trained`` as ``fmt`` (hf | gguf) to ``out``; returns the paths written."""
    tok = tokenizer_files(trained.tokenizer)
    out = Path(out)
    try:
        if fmt == "hf":
            if dtype not in HF_DTYPES:
                raise ToolError(f"--dtype {dtype}: hf export takes {', '.join(HF_DTYPES)}")
            return [export_hf(trained.state, trained.config, tok, out, HF_DTYPES[dtype])]
        if fmt == "gguf":
            from model.export_gguf import export_gguf, modelfile, vocab_from_tokenizer_json

            if dtype not in GGUF_DTYPES:
                raise ToolError(f"--dtype {dtype}: gguf export takes {', '.join(GGUF_DTYPES)}")
            if out.is_dir():
                raise ToolError(f"{out}: is a directory; give the .gguf file to write")
            vocab = vocab_from_tokenizer_json(json.loads(tok.tokenizer_json), trained.config.vocab_size,
                                              tok.chat_template, tok.bos_token, tok.eos_token, tok.pad_token,
                                              eot=IM_END if IM_END in tok.token_ids else None)
            name = trained.run_folder.name or "tinylm"
            written = [export_gguf(trained.state, trained.config, vocab, out, dtype, name=name, progress=progress)]
            if write_modelfile:
                mf = out.parent / "Modelfile"
                atomic_write_text(mf, modelfile(out.name))
                written.append(mf)
            return written
    except ExportError as e:
        raise ToolError(f"{trained.ckpt['path']}: {e}") from None
    raise ToolError(f"--format {fmt}: must be hf or gguf")
