"""A transformers ``config.json`` (LlamaForCausalLM, Qwen3ForCausalLM) as a :class:`ModelConfig`, strictly.

Every field that changes the function the model computes is read, never guessed; a value tinylm does not
implement (rope scaling, biases, sliding-window attention, another activation, a mixture-of-experts layout)
is refused with :class:`UnsupportedConfig` naming the field. Fields that only concern training or other
frameworks (``pretraining_tp``, ``attention_dropout``, ``use_cache``, token ids, ...) are ignored.
Defaults for absent fields are transformers' own (``LlamaConfig`` / ``Qwen3Config``).
"""

from __future__ import annotations

from typing import Any

from core.errors import TinyLMError
from model.config import ModelConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "qwen3": 32768}
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


class UnsupportedConfig(TinyLMError):
    """A transformers config tinylm cannot represent; the message names the field."""


def _arch(conf: dict[str, Any]) -> str:
    archs = conf.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise UnsupportedConfig(f"{archs!r}: tinylm loads exactly one of {', '.join(ARCHITECTURES)}",
                                field="architectures")
    kind = ARCHITECTURES[archs[0]]
    if conf.get("model_type", kind) != kind:
        raise UnsupportedConfig(f"{conf['model_type']!r} does not match architecture {archs[0]}",
                                field="model_type")
    return kind


def _rope_theta(conf: dict[str, Any]) -> float:
    """``rope_parameters`` (transformers 5) or ``rope_theta`` / ``rope_scaling`` (4.x); only plain RoPE."""
    params = conf.get("rope_parameters")
    for name, value in (("rope_parameters", params), ("rope_scaling", conf.get("rope_scaling"))):
        if value is None:
            continue
        if not isinstance(value, dict):
            raise UnsupportedConfig(f"expected an object, got {value!r}", field=name)
        kind = value.get("rope_type", value.get("type", "default"))
        if kind != "default":
            raise UnsupportedConfig(f"rope type {kind!r}: tinylm implements only plain RoPE ('default')",
                                    field=name)
    theta = (params or {}).get("rope_theta", conf.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise UnsupportedConfig(f"expected a positive number, got {theta!r}", field="rope_theta")
    return float(theta)


def _refuse_unsupported(conf: dict[str, Any]) -> None:
    if conf.get("hidden_act", "silu") != "silu":
        raise UnsupportedConfig(f"{conf['hidden_act']!r}: tinylm's MLP is SwiGLU (silu)", field="hidden_act")
    for name in ("attention_bias", "mlp_bias"):
        if conf.get(name, False):
            raise UnsupportedConfig("true: tinylm's projections have no biases", field=name)
    if conf.get("use_sliding_window", False):
        raise UnsupportedConfig("true: tinylm has no sliding-window attention", field="use_sliding_window")
    layers = conf.get("layer_types")
    if layers is not None and any(t != "full_attention" for t in layers):
        raise UnsupportedConfig("only 'full_attention' layers are supported", field="layer_types")
    for name in _MOE_FIELDS:
        if conf.get(name):
            raise UnsupportedConfig(f"{conf[name]!r}: a mixture-of-experts layout tinylm does not implement",
                                    field=name)


def _int(conf: dict[str, Any], name: str, default: int | None = None) -> int:
    value = conf.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UnsupportedConfig(f"expected a positive integer, got {value!r}", field=name)
    return value


def config_from_hf(conf: dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of a transformers ``config.json`` dict (UnsupportedConfig naming the field)."""
    if not isinstance(conf, dict):
        raise UnsupportedConfig(f"expected a JSON object, got {type(conf).__name__}")
    kind = _arch(conf)
    _refuse_unsupported(conf)
    heads = _int(conf, "num_attention_heads")
    head_dim = conf.get("head_dim")
    values = dict(
        vocab_size=_int(conf, "vocab_size"), hidden_size=_int(conf, "hidden_size"),
        intermediate_size=_int(conf, "intermediate_size"), num_hidden_layers=_int(conf, "num_hidden_layers"),
        num_attention_heads=heads, num_key_value_heads=_int(conf, "num_key_value_heads", heads),
        head_dim=None if head_dim is None else _int(conf, "head_dim"),
        max_position_embeddings=_int(conf, "max_position_embeddings", _DEFAULT_MAX_POSITIONS[kind]),
        rope_theta=_rope_theta(conf), rms_norm_eps=float(conf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(conf.get("tie_word_embeddings", False)),
        initializer_range=float(conf.get("initializer_range", 0.02)), qk_norm=kind == "qwen3")
    try:
        return ModelConfig(**values)
    except ValueError as e:
        raise UnsupportedConfig(str(e)) from None
