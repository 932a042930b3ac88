"""Model hyper-parameters: one dataclass, named presets, command-line overrides, size and FLOP estimates.

Field names follow transformers' ``LlamaConfig`` / ``Qwen3Config`` so that a config maps onto it field by
field. ``head_dim=None`` means ``hidden_size // num_attention_heads``; Qwen3 states it explicitly and it may
differ (then q/k/v are ``heads * head_dim`` wide, not ``hidden_size``). ``qk_norm`` adds Qwen3's per-head
RMSNorm on q and k (before RoPE). ``num_experts == 0`` means a
dense SwiGLU MLP in every layer; ``num_experts > 0`` replaces it by a mixture of experts. ``norm_topk_prob``
renormalises the top-k routing weights to sum 1 when k > 1; ``norm_top1_prob`` also renormalises a single
routed weight (to 1, as transformers' Qwen-MoE with ``norm_topk_prob`` and MiniMind-3-MoE do; off, a top-1
weight stays the router probability, so the router learns from the LM loss).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

ATTN_BACKENDS = ("auto", "flex", "sdpa", "docs")

# inclusive ranges of the integer fields: wide enough for every published decoder, narrow enough that a
# config cannot claim a model nobody could build (a billion layers, a trillion positions)
INT_RANGES: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 2**24), "hidden_size": (1, 2**16), "intermediate_size": (1, 2**20),
    "num_hidden_layers": (1, 1024), "num_attention_heads": (1, 2**12), "num_key_value_heads": (1, 2**12),
    "max_position_embeddings": (1, 2**24), "num_experts": (0, 1024), "num_experts_per_tok": (0, 1024),
    "n_shared_experts": (0, 64), "head_dim": (2, 2**12),
}
# ranges of the float fields (finite always): (low, high, low inclusive, high inclusive)
FLOAT_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "rope_theta": (0.0, math.inf, False, False), "rms_norm_eps": (0.0, 1.0, False, False),
    "dropout": (0.0, 1.0, True, False), "moe_aux_loss_coef": (0.0, math.inf, True, False),
    "initializer_range": (0.0, math.inf, True, False),
}
BOOL_FIELDS = ("tie_word_embeddings", "norm_topk_prob", "norm_top1_prob", "qk_norm")


class ConfigError(ValueError):
    """A model config field of the wrong type, non-finite or out of range, or fields that contradict each
    other; ``field`` names the (first) field, ``message`` says what is wrong with it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"invalid ModelConfig: {field}: {message}")
        self.field, self.message = field, message


def _show(value: Any) -> str:
    """A value for a message, cut short (a hostile config may hold a 5,000-digit number)."""
    if isinstance(value, int) and value.bit_length() > 100:  # repr itself refuses past 4300 digits
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def default_intermediate_size(hidden_size: int) -> int:
    """MiniMind's SwiGLU width: int(8/3 * hidden) rounded up to a multiple of 64."""
    return 64 * ((int(hidden_size * 8 / 3) + 63) // 64)


@dataclass
class ModelConfig:
    """Decoder-only Llama-style Transformer (RMSNorm, rotate-half RoPE, GQA, SwiGLU, optional MoE).

    ``intermediate_size=None`` is replaced by :func:`default_intermediate_size` of ``hidden_size``.
    ``attn_backend`` picks the attention kernel for packed rows (``doc_ids`` given): "flex"
    (FlexAttention block mask), "sdpa" (dense block-diagonal causal mask), "docs" (one causal SDPA call
    per document) or "auto" (flex on CUDA, docs elsewhere: FlexAttention has no backward on CPU).
    """

    vocab_size: int = 6400
    hidden_size: int = 512
    intermediate_size: int | None = None
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    dropout: float = 0.0
    # mixture of experts (num_experts == 0: dense)
    num_experts: int = 0
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    moe_aux_loss_coef: float = 0.01
    norm_topk_prob: bool = True
    norm_top1_prob: bool = False  # with norm_topk_prob: renormalise top-1 too (its weight becomes 1)
    attn_backend: str = "auto"
    initializer_range: float = 0.02
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    qk_norm: bool = False  # Qwen3: RMSNorm over each q / k head before RoPE

    def __post_init__(self) -> None:
        self._check_types()
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            self.intermediate_size = None
        self._check_ranges()  # before deriving: a huge hidden_size must not overflow the derivation
        if self.intermediate_size is None:
            self.intermediate_size = default_intermediate_size(self.hidden_size)
        if self.head_dim is None and self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    # ---- invariants -------------------------------------------------------------------------
    def _check_types(self) -> None:
        """Each field has its type (an int for a float field becomes a float; a bool is not a number)."""
        for name in INT_RANGES:
            value = getattr(self, name)
            if value is None and name in ("intermediate_size", "head_dim"):
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(name, f"expected an integer, got {_show(value)}")
        for name in FLOAT_RANGES:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(name, f"expected a number, got {_show(value)}")
            setattr(self, name, float(value))
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"expected true or false, got {_show(getattr(self, name))}")
        if not isinstance(self.attn_backend, str) or self.attn_backend not in ATTN_BACKENDS:
            raise ConfigError("attn_backend", f"must be one of {ATTN_BACKENDS}, got {_show(self.attn_backend)}")

    def validate(self) -> None:
        """Raise :class:`ConfigError` (a ValueError) naming the first field of the wrong type, non-finite, out
        of its range, or inconsistent with another."""
        self._check_types()
        self._check_ranges()
        if self.head_dim is None:
            raise ConfigError("head_dim", f"hidden_size {self.hidden_size} is not divisible by "
                                          f"num_attention_heads {self.num_attention_heads} (give head_dim)")
        if self.head_dim % 2:
            raise ConfigError("head_dim", f"head_dim {self.head_dim} must be even and > 0 for RoPE")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_key_value_heads", f"num_attention_heads {self.num_attention_heads} is not a "
                                                     f"multiple of num_key_value_heads {self.num_key_value_heads}")
        if self.num_experts > 0 and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError("num_experts_per_tok", f"must be in [1, num_experts={self.num_experts}], "
                                                     f"got {self.num_experts_per_tok}")
        if self.norm_top1_prob and not self.norm_topk_prob:
            raise ConfigError("norm_top1_prob", "true needs norm_topk_prob true (it extends top-k "
                                                "renormalisation to k = 1)")

    def _check_ranges(self) -> None:
        """Every number within its range (``INT_RANGES``, ``FLOAT_RANGES``; floats finite)."""
        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise ConfigError(name, f"must be in [{low}, {high}], got {_show(value)}")
        for name, (low, high, low_in, high_in) in FLOAT_RANGES.items():
            value = getattr(self, name)
            above = value >= low if low_in else value > low
            below = value <= high if high_in else value < high
            if not (math.isfinite(value) and above and below):
                span = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
                raise ConfigError(name, f"must be finite and in {span}, got {value}")

    @property
    def derived_head_dim(self) -> bool:
        """Whether ``head_dim`` is the default ``hidden_size // num_attention_heads``."""
        return self.num_attention_heads > 0 and self.head_dim * self.num_attention_heads == self.hidden_size

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    # ---- presets and overrides ----------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """The named preset with keyword overrides applied (unknown names/fields raise ValueError)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
        _check_fields(overrides)
        return cls(**{**PRESETS[name], **overrides})

    def override(self, items: list[str] | dict[str, Any]) -> ModelConfig:
        """A new config with ``["key=value", ...]`` (strings converted to the field's type) applied.

        If ``hidden_size`` changes and ``intermediate_size`` is not given and was the derived
        default, it is derived again from the new ``hidden_size``; likewise ``head_dim`` when
        ``hidden_size`` or ``num_attention_heads`` changes.
        """
        changes = parse_overrides(items) if isinstance(items, list) else dict(items)
        _check_fields(changes)
        values = self.to_dict()
        if ("hidden_size" in changes and "intermediate_size" not in changes
                and self.intermediate_size == default_intermediate_size(self.hidden_size)):
            values["intermediate_size"] = None
        if ({"hidden_size", "num_attention_heads"} & set(changes) and "head_dim" not in changes
                and self.derived_head_dim):
            values["head_dim"] = None
        values.update(changes)
        return ModelConfig(**values)

    # ---- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError (a checkpoint from another model)."""
        _check_fields(values)
        return cls(**values)

    # ---- size and cost ----------------------------------------------------------------------------
    def num_params(self, active: bool = False) -> int:
        """Parameter count computed from the shapes (a tied head counts once).

        ``active=True`` counts, for MoE, only the ``num_experts_per_tok`` routed experts a token uses.
        """
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        attn = 2 * h * q + 2 * h * kv + (2 * self.head_dim if self.qk_norm else 0)
        swiglu = 3 * h * i
        if self.is_moe:
            routed = self.num_experts_per_tok if active else self.num_experts
            mlp = h * self.num_experts + routed * swiglu + self.n_shared_experts * swiglu
        else:
            mlp = swiglu
        layer = attn + mlp + 2 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + self.num_hidden_layers * layer + h + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, PaLM/nanoGPT style: ``6 * N + 12 * L * H * Q * T``.

        N counts parameters that take part in a matmul per token (MoE: active experts; the input
        embedding is a lookup, so it is excluded unless it is tied to the output head). The attention
        term is for a full (non-causal, unpacked) window of ``seq_len``, as in the PaLM appendix.
        """
        n = self.num_params(active=True)
        if not self.tie_word_embeddings:
            n -= self.vocab_size * self.hidden_size
        attn = 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
        return 6.0 * n + attn


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(ModelConfig)


def _check_fields(values: dict[str, Any]) -> None:
    unknown = sorted(set(values) - set(_field_types()))
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {', '.join(unknown)}; "
                         f"known fields: {', '.join(_field_types())}")


def _convert(name: str, text: str, kind: Any) -> Any:
    """Convert one command-line string to the annotated type of field ``name``."""
    args = typing.get_args(kind)
    if type(None) in args:  # Optional[X]
        if text.strip().lower() in ("none", "null", ""):
            return None
        kind = next(a for a in args if a is not type(None))
    try:
        if kind is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            as_float = float(text)
            if not as_float.is_integer():
                raise ValueError(text)
            return int(as_float)
        return kind(text)
    except ValueError:
        raise ValueError(f"model override {name}={text!r}: expected {kind.__name__}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["hidden_size=256", "dropout=0.1"]`` -> ``{"hidden_size": 256, "dropout": 0.1}``.

    Values are converted to each field's type (bool accepts true/false/1/0/yes/no; int accepts
    ``1e3``; optional fields accept ``none``). Unknown fields and malformed items raise ValueError.
    """
    types = _field_types()
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"model override {item!r} is not of the form key=value")
        _check_fields({key: None})
        out[key] = _convert(key, text.strip(), types[key])
    return out


_SMALL = dict(vocab_size=6400, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=32768)
_TINY = dict(vocab_size=6400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024)
_MOE = dict(num_experts=4, num_experts_per_tok=2, n_shared_experts=1)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _TINY,  # ~0.5M params, for tests
    "tiny-moe": {**_TINY, **_MOE},
    "tiny-qwen3": dict(_TINY, qk_norm=True, head_dim=32),  # QK-norm, head_dim != hidden / heads, for tests
    "small": _SMALL,  # MiniMind2-small, ~25.8M params
    "small-moe": {**_SMALL, **_MOE},
    "base": dict(_SMALL, hidden_size=768, num_hidden_layers=16),  # MiniMind2, ~104M params
    # minimind-3 (Qwen3-style): 63,912,192 params with vocab 6400
    "minimind3": dict(vocab_size=6400, hidden_size=768, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4, intermediate_size=2432, tie_word_embeddings=True, rope_theta=1e6,
                      qk_norm=True, rms_norm_eps=1e-6, max_position_embeddings=32768),
}
# MiniMind-3-MoE: 4 routed experts of the dense width, top-1 renormalised (weight 1), no shared expert
PRESETS["minimind3-moe"] = dict(PRESETS["minimind3"], num_experts=4, num_experts_per_tok=1, n_shared_experts=0,
                                norm_topk_prob=True, norm_top1_prob=True, moe_aux_loss_coef=5e-4)
