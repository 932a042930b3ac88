"""Write a TinyLM as a transformers ``LlamaForCausalLM`` directory (config, safetensors, tokenizer files); a
model with ``qk_norm`` as ``Qwen3ForCausalLM`` (the same layout plus per-head ``q_norm`` / ``k_norm``); a
mixture-of-experts model as the Qwen-MoE class :mod:`model.moe_hf` maps it to (or refused naming the field).

Our parameter names are transformers' names, so the weights go out unchanged:

    config.json              LlamaForCausalLM / Qwen3ForCausalLM config; transformers 5 fields (``rope_parameters``,
                             ``dtype``) plus ``rope_theta`` / ``torch_dtype`` so 4.x reads the same model
    model.safetensors        the state dict; a tied model has no ``lm_head.weight`` (transformers
                             re-ties it from ``embed_tokens``), an untied one always has it
    generation_config.json   bos / eos / pad ids; eos lists every id that ends a chat answer
    tokenizer.json, tokenizer_config.json, chat_template.jinja   the tokenizer and its chat template

Invariants: every file is written (and fsync-ed) into a hidden temporary folder next to ``out`` that is
renamed into place only when complete, so ``out`` is either absent, the previous export, or the whole new
export; a full disk or a read-only folder is one FileWriteError naming ``out``, the temporary folder removed.
The caller hands over the tokenizer's bytes and settings; this module knows weights, not where they came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.errors import TinyLMError
from core.files import atomic_write_folder, check_output_folder
from model.config import ModelConfig
from model.moe_gguf import check_gguf_moe
from model.moe_hf import MoeInteropError, architecture, fuse_experts, hf_moe_config

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ExportError(TinyLMError):
    """The model cannot be exported in this format (the message says why, in one line)."""


@dataclass(frozen=True)
class TokenizerFiles:
    """What an export needs of a tokenizer: its ``tokenizer.json`` text, chat template and special tokens."""

    tokenizer_json: str
    chat_template: str
    bos_token: str | None
    eos_token: str
    pad_token: str | None
    token_ids: dict[str, int]  # id of every token named above (and of the extra stop tokens)
    extra_stop_tokens: tuple[str, ...] = ()  # more ids that end generation (e.g. <|endoftext|>)
    model_max_length: int | None = None
    extra_config: dict = field(default_factory=dict)  # further tokenizer_config.json keys to keep

    @property
    def eos_ids(self) -> list[int]:
        names = [self.eos_token, *(t for t in self.extra_stop_tokens if t != self.eos_token)]
        return [self.token_ids[t] for t in names]


def check_exportable(cfg: ModelConfig, fmt: str) -> None:
    """Refuse an MoE layout the format's MoE class does not compute (hf: model/moe_hf.py, gguf: model/moe_gguf.py)."""
    if cfg.is_moe and fmt == "hf":
        try:
            architecture(cfg)
        except MoeInteropError as e:
            raise ExportError(f"hf export: {e.message}", field=e.field) from None
    elif cfg.is_moe:
        try:
            check_gguf_moe(cfg)
        except MoeInteropError as e:
            raise ExportError(f"{fmt} export of a mixture-of-experts model: {e.message}", field=e.field) from None


def hf_config(cfg: ModelConfig, tok: TokenizerFiles, dtype: str) -> dict:
    """The ``config.json`` of a ``LlamaForCausalLM`` (``Qwen3ForCausalLM`` with ``qk_norm``) equal to ``cfg``."""
    conf = _llama_config(cfg, tok, dtype)
    if cfg.is_moe:
        return hf_moe_config(conf, cfg)
    if not cfg.qk_norm:
        return conf
    for llama_only in ("mlp_bias", "pretraining_tp"):
        del conf[llama_only]
    return {**conf, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": cfg.num_hidden_layers}


def _llama_config(cfg: ModelConfig, tok: TokenizerFiles, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "rope_theta": float(cfg.rope_theta),  # transformers 4.x reads this key (default 10000 otherwise)
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_cache": True,
        "bos_token_id": tok.token_ids.get(tok.bos_token) if tok.bos_token else None,
        "eos_token_id": tok.token_ids[tok.eos_token],
        "pad_token_id": tok.token_ids.get(tok.pad_token) if tok.pad_token else None,
        "dtype": dtype,
        "torch_dtype": dtype,
    }


def export_state(state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: str) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``: contiguous copies in ``dtype``, no tied ``lm_head.weight``."""
    out = {}
    for name, tensor in (fuse_experts(state, cfg) if cfg.is_moe else state).items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        out[name] = tensor.detach().to("cpu", DTYPES[dtype]).contiguous().clone()
    if not cfg.tie_word_embeddings and "lm_head.weight" not in out:
        raise ExportError("untied model without lm_head.weight: transformers would load a random head")
    return out


HF_FILES = frozenset({"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                      "chat_template.jinja", "tokenizer_config.json"})  # the folder's exact file set


def export_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, tok: TokenizerFiles, out: str | Path,
              dtype: str = "float32") -> Path:
    """Write the transformers directory ``out`` (replacing an earlier export there); returns ``out``. A folder
    holding any other file is refused (:func:`core.files.check_output_folder`), never replaced."""
    from safetensors.torch import save as safetensors_bytes

    check_exportable(cfg, "hf")
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    check_output_folder(out, "bin/export", HF_FILES.__contains__)
    generation = {"bos_token_id": tok.token_ids.get(tok.bos_token) if tok.bos_token else None,
                  "eos_token_id": tok.eos_ids,
                  "pad_token_id": tok.token_ids.get(tok.pad_token) if tok.pad_token else None}
    files = {"model.safetensors": safetensors_bytes(export_state(state, cfg, dtype), metadata={"format": "pt"}),
             "config.json": _json(hf_config(cfg, tok, dtype)), "generation_config.json": _json(generation),
             "tokenizer.json": tok.tokenizer_json.encode("utf-8"),
             "chat_template.jinja": tok.chat_template.encode("utf-8"),
             "tokenizer_config.json": _json(tokenizer_config(tok, cfg))}
    assert set(files) == HF_FILES
    return atomic_write_folder(out, files, "export")


def tokenizer_config(tok: TokenizerFiles, cfg: ModelConfig) -> dict:
    """``tokenizer_config.json``: a fast tokenizer that adds no tokens, with the special tokens and the
    chat template (also as a key, for transformers 4.x; 5.x reads ``chat_template.jinja``)."""
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", **tok.extra_config,
            "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
            "add_bos_token": False, "add_eos_token": False,
            "model_max_length": min(tok.model_max_length or cfg.max_position_embeddings, cfg.max_position_embeddings),
            "chat_template": tok.chat_template}
    return conf


def _json(value: dict) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
