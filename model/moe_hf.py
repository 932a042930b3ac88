"""tinylm's mixture-of-experts layers as transformers' Qwen-MoE classes, both ways, exactly.

tinylm's MoE block (``model.transformer.MoE``) is ``sum_k w_k * expert_k(x) + shared(x)``: a softmax router
``mlp.gate`` over ``num_experts`` SwiGLU experts ``mlp.experts.E`` of width ``intermediate_size`` and, when
``n_shared_experts > 0``, one always-on, *ungated* SwiGLU ``mlp.shared_experts`` of width
``n_shared_experts * intermediate_size``. Which transformers class computes the same function:

- no shared expert, q/k head norms (``qk_norm``): ``Qwen3MoeForCausalLM`` (MiniMind-3-MoE's export class);
- a shared expert, no q/k norms: ``Qwen2MoeForCausalLM`` (``qkv_bias`` false). Its shared expert is gated,
  ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``; a zero gate weight gives sigmoid(0) = 0.5 exactly,
  so the export doubles ``shared_expert.down_proj`` (a power of two: exact in every float format) and writes
  a zero ``shared_expert_gate``. Importing a Qwen2-MoE whose gate weight is not all zero is refused, naming
  the tensor: a token-dependent gate is not tinylm's always-on shared expert;
- a shared expert with q/k norms, or neither: no class computes it; refused naming ``n_shared_experts``.

Routing: transformers renormalises the top-k weights when ``norm_topk_prob``, for every k; tinylm does for
k > 1 with ``norm_topk_prob`` and for k = 1 only with ``norm_top1_prob`` too, and the mapping keeps that
(a top-1 model without ``norm_top1_prob`` exports ``norm_topk_prob: false``). Every layer is an MoE layer
(``decoder_sparse_step`` 1, no ``mlp_only_layers``); ``moe_intermediate_size`` is the expert width.

Expert layouts: per-expert tensors ``mlp.experts.E.{gate,up,down}_proj.weight`` (tinylm, MiniMind, transformers
4.x) or transformers 5's fused ``mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows, then up rows, per expert)
and ``mlp.experts.down_proj`` [E, H, I]; both are read, the fused one (what transformers 5 loads without a
conversion) is written. Errors are :class:`MoeInteropError` naming the field or tensor; callers add the file.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from core.errors import TinyLMError
from model.config import ModelConfig

MOE_ARCHITECTURES = {"Qwen3MoeForCausalLM": "qwen3_moe", "Qwen2MoeForCausalLM": "qwen2_moe"}
_SHARED_DOWN_SCALE = 2.0  # 1 / sigmoid(0): the zero shared_expert_gate halves the shared expert


class MoeInteropError(TinyLMError):
    """An MoE config or tensor layout the other side cannot express (one line naming the field or tensor)."""


def architecture(cfg: ModelConfig) -> str:
    """The transformers class that computes ``cfg``'s MoE layers exactly; MoeInteropError if none does."""
    if cfg.qk_norm and cfg.n_shared_experts == 0:
        return "Qwen3MoeForCausalLM"
    if not cfg.qk_norm and cfg.n_shared_experts > 0:
        return "Qwen2MoeForCausalLM"
    if cfg.qk_norm:
        raise MoeInteropError(
            f"{cfg.n_shared_experts} shared experts with qk_norm: Qwen3MoeForCausalLM has q/k norms but no shared "
            "expert, Qwen2MoeForCausalLM a shared expert but no q/k norms; no transformers class has both",
            field="n_shared_experts")
    raise MoeInteropError(
        "0 shared experts without qk_norm: Qwen2MoeForCausalLM always has a shared expert and Qwen3MoeForCausalLM "
        "has q/k norms; no transformers class has neither", field="n_shared_experts")


def hf_moe_config(base: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """``base`` (the dense config.json fields) turned into the config of :func:`architecture`'s class."""
    arch = architecture(cfg)
    conf = {k: v for k, v in base.items() if k not in ("mlp_bias", "pretraining_tp")}
    conf.update(architectures=[arch], model_type=MOE_ARCHITECTURES[arch], num_experts=cfg.num_experts,
                num_experts_per_tok=cfg.num_experts_per_tok, moe_intermediate_size=cfg.intermediate_size,
                norm_topk_prob=cfg.norm_topk_prob and (cfg.num_experts_per_tok > 1 or cfg.norm_top1_prob),
                decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=cfg.moe_aux_loss_coef,
                output_router_logits=False, use_sliding_window=False, sliding_window=None,
                max_window_layers=cfg.num_hidden_layers)
    if arch == "Qwen2MoeForCausalLM":
        conf.update(qkv_bias=False, shared_expert_intermediate_size=cfg.n_shared_experts * cfg.intermediate_size)
    return conf


def moe_values(conf: dict[str, Any], kind: str) -> dict[str, Any]:
    """The ModelConfig MoE fields of a Qwen2-MoE / Qwen3-MoE ``config.json`` (``kind`` its model_type); what
    tinylm cannot compute is refused naming the field. Values are range-checked by ModelConfig."""
    conf = dict(conf)
    local = conf.get("num_local_experts")  # transformers 5 saves num_experts under this name
    if local is not None and conf.setdefault("num_experts", local) != local:
        raise MoeInteropError(f"{local!r} contradicts num_experts {conf['num_experts']!r}",
                              field="num_local_experts")
    for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        if name not in conf:
            raise MoeInteropError("missing", field=name)
    if conf.get("decoder_sparse_step", 1) != 1:
        raise MoeInteropError(f"{conf['decoder_sparse_step']!r}: tinylm has an MoE block in every layer",
                              field="decoder_sparse_step")
    if conf.get("mlp_only_layers"):
        raise MoeInteropError(f"{conf['mlp_only_layers']!r}: tinylm has no dense layers in an MoE model",
                              field="mlp_only_layers")
    norm = conf.get("norm_topk_prob", False)
    if not isinstance(norm, bool):
        raise MoeInteropError(f"expected true or false, got {norm!r}", field="norm_topk_prob")
    width = conf["moe_intermediate_size"]
    values = dict(num_experts=conf["num_experts"], num_experts_per_tok=conf["num_experts_per_tok"],
                  intermediate_size=width, norm_topk_prob=norm,
                  norm_top1_prob=norm and conf["num_experts_per_tok"] == 1,
                  moe_aux_loss_coef=conf.get("router_aux_loss_coef", 0.001), n_shared_experts=0)
    if kind == "qwen2_moe":
        if conf.get("qkv_bias", True):  # transformers' default is true
            raise MoeInteropError("true (or absent: transformers' default): tinylm's projections have no biases",
                                  field="qkv_bias")
        shared = conf.get("shared_expert_intermediate_size", 5632)
        if not (isinstance(shared, int) and isinstance(width, int) and width > 0 and shared > 0
                and shared % width == 0):
            raise MoeInteropError(f"{shared!r}: tinylm's shared expert is a positive multiple of "
                                  f"moe_intermediate_size {width!r}", field="shared_expert_intermediate_size")
        values["n_shared_experts"] = shared // width
    return values


def fuse_experts(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """tinylm's MoE tensors under the names and layout of :func:`architecture`'s class (transformers 5's fused
    experts; Qwen2-MoE's shared expert doubled behind a zero gate); other tensors unchanged."""
    arch = architecture(cfg)
    out = dict(state)
    for n in range(cfg.num_hidden_layers):
        mlp = f"model.layers.{n}.mlp"
        experts = [[out.pop(f"{mlp}.experts.{e}.{p}_proj.weight") for e in range(cfg.num_experts)]
                   for p in ("gate", "up", "down")]
        out[f"{mlp}.experts.gate_up_proj"] = torch.cat([torch.stack(experts[0]), torch.stack(experts[1])], dim=1)
        out[f"{mlp}.experts.down_proj"] = torch.stack(experts[2])
        if arch == "Qwen2MoeForCausalLM":
            for p in ("gate", "up", "down"):
                weight = out.pop(f"{mlp}.shared_experts.{p}_proj.weight")
                out[f"{mlp}.shared_expert.{p}_proj.weight"] = weight * _SHARED_DOWN_SCALE if p == "down" else weight
            out[f"{mlp}.shared_expert_gate.weight"] = out[f"{mlp}.gate.weight"].new_zeros(1, cfg.hidden_size)
    return out


def unfuse_experts(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Any layout the module docstring lists -> tinylm's names (per-expert tensors, ``shared_experts``).
    Tensors already in tinylm's names pass unchanged; a fused tensor of the wrong shape or a non-zero
    ``shared_expert_gate`` is a MoeInteropError naming it. The caller checks the result against the config."""
    out = dict(state)
    i, h, e_count = cfg.intermediate_size, cfg.hidden_size, cfg.num_experts
    for n in range(cfg.num_hidden_layers):
        mlp = f"model.layers.{n}.mlp"
        gate_up, down = out.pop(f"{mlp}.experts.gate_up_proj", None), out.pop(f"{mlp}.experts.down_proj", None)
        for name, tensor, shape in ((f"{mlp}.experts.gate_up_proj", gate_up, (e_count, 2 * i, h)),
                                    (f"{mlp}.experts.down_proj", down, (e_count, h, i))):
            if tensor is not None and tuple(tensor.shape) != shape:
                raise MoeInteropError(f"shape {list(tensor.shape)}, the config needs {list(shape)}", field=name)
        if gate_up is not None:
            for e in range(e_count):
                out[f"{mlp}.experts.{e}.gate_proj.weight"] = gate_up[e, :i]
                out[f"{mlp}.experts.{e}.up_proj.weight"] = gate_up[e, i:]
        if down is not None:
            for e in range(e_count):
                out[f"{mlp}.experts.{e}.down_proj.weight"] = down[e]
        shared_gate = out.pop(f"{mlp}.shared_expert_gate.weight", None)
        if shared_gate is None:
            continue
        if shared_gate.numel() and bool((shared_gate != 0).any()):
            raise MoeInteropError("not all zero: a token-dependent shared-expert gate, which tinylm's always-on "
                                  "shared expert cannot express", field=f"{mlp}.shared_expert_gate.weight")
        for p in ("gate", "up", "down"):
            weight = out.pop(f"{mlp}.shared_expert.{p}_proj.weight", None)
            if weight is not None:
                out[f"{mlp}.shared_experts.{p}_proj.weight"] = weight / _SHARED_DOWN_SCALE if p == "down" else weight
    return out
