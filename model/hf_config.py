"""A transformers ``config.json`` (LlamaForCausalLM, Qwen3ForCausalLM, and the Qwen2-MoE / Qwen3-MoE classes
:mod:`model.moe_hf` maps) as a :class:`ModelConfig`, strictly.

Every field that changes the function the model computes is read, never guessed; a value tinylm does not
implement (rope scaling, biases, sliding-window attention, another activation, a mixture-of-experts layout)
is refused with :class:`UnsupportedConfig` naming the field. Fields that only concern training or other
frameworks (``pretraining_tp``, ``attention_dropout``, ``use_cache``, token ids, ...) are ignored.
Defaults for absent fields are transformers' own (``LlamaConfig`` / ``Qwen3Config``).
"""

from __future__ import annotations

from typing import Any

from core.errors import TinyLMError
from model.config import ConfigError, ModelConfig
from model.moe_hf import MOE_ARCHITECTURES, MoeInteropError, moe_values

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3", **MOE_ARCHITECTURES}
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "qwen3": 32768, "qwen2_moe": 32768, "qwen3_moe": 32768}
_QK_NORM_KINDS = ("qwen3", "qwen3_moe")
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


class UnsupportedConfig(TinyLMError):
    """A transformers config tinylm cannot represent; the message names the field."""


def _arch(conf: dict[str, Any]) -> str:
    archs = conf.get("architectures")
    if not (isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str)
            and archs[0] in ARCHITECTURES):
        raise UnsupportedConfig(f"{repr(archs)[:80]}: tinylm loads exactly one of {', '.join(ARCHITECTURES)}",
                                field="architectures")
    kind = ARCHITECTURES[archs[0]]
    if conf.get("model_type", kind) != kind:
        raise UnsupportedConfig(f"{conf['model_type']!r} does not match architecture {archs[0]}",
                                field="model_type")
    return kind


def _rope_theta(conf: dict[str, Any]) -> Any:
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
    return (params or {}).get("rope_theta", conf.get("rope_theta", 10000.0))  # checked by ModelConfig


def _refuse_unsupported(conf: dict[str, Any], kind: str) -> None:
    if conf.get("hidden_act", "silu") != "silu":
        raise UnsupportedConfig(f"{conf['hidden_act']!r}: tinylm's MLP is SwiGLU (silu)", field="hidden_act")
    for name in ("attention_bias", "mlp_bias"):
        if conf.get(name, False):
            raise UnsupportedConfig("true: tinylm's projections have no biases", field=name)
    if conf.get("use_sliding_window", False):
        raise UnsupportedConfig("true: tinylm has no sliding-window attention", field="use_sliding_window")
    layers = conf.get("layer_types")
    if layers is not None and (not isinstance(layers, list) or any(t != "full_attention" for t in layers)):
        raise UnsupportedConfig("only 'full_attention' layers are supported", field="layer_types")
    for name in _MOE_FIELDS if kind not in MOE_ARCHITECTURES.values() else ():
        if conf.get(name):
            raise UnsupportedConfig(f"{conf[name]!r}: a mixture-of-experts layout tinylm does not implement",
                                    field=name)


def config_from_hf(conf: dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of a transformers ``config.json`` dict (UnsupportedConfig naming the field)."""
    if not isinstance(conf, dict):
        raise UnsupportedConfig(f"expected a JSON object, got {type(conf).__name__}")
    kind = _arch(conf)
    _refuse_unsupported(conf, kind)
    for name in _REQUIRED:
        if name not in conf:
            raise UnsupportedConfig("missing", field=name)
    size = conf["intermediate_size"]
    if size is None or (isinstance(size, int) and not isinstance(size, bool) and size <= 0):
        raise UnsupportedConfig(f"expected a positive integer, got {conf.get('intermediate_size')!r}",
                                field="intermediate_size")  # tinylm would derive one: never guess
    values = {name: conf[name] for name in _REQUIRED}
    values.update(
        num_key_value_heads=conf.get("num_key_value_heads", conf["num_attention_heads"]),
        head_dim=conf.get("head_dim"),
        max_position_embeddings=conf.get("max_position_embeddings", _DEFAULT_MAX_POSITIONS[kind]),
        rope_theta=_rope_theta(conf), rms_norm_eps=conf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=conf.get("tie_word_embeddings", False),
        initializer_range=conf.get("initializer_range", 0.02), qk_norm=kind in _QK_NORM_KINDS)
    if kind in MOE_ARCHITECTURES.values():
        try:
            values.update(moe_values(conf, kind))
        except MoeInteropError as e:
            raise UnsupportedConfig(e.message, field=e.field) from None
    try:  # every value's type, finiteness and range: ModelConfig's own checks, the same for every source
        return ModelConfig(**values)
    except ConfigError as e:
        raise UnsupportedConfig(e.message, field=e.field) from None
