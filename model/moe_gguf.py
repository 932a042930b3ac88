"""tinylm mixture-of-experts models as llama.cpp's GGUF ``qwen3moe`` architecture, or refused naming the field.

llama.cpp's ``qwen3moe`` graph (``src/models/qwen3moe.cpp``) is Qwen3's attention (q/k head norms, NEOX RoPE:
no q/k permutation) with, per layer, a softmax router ``ffn_gate_inp`` [E, H], top-``expert_used_count``
experts whose weights it *always* renormalises (``build_moe_ffn(..., norm_w = true, ...)``), and stacked SwiGLU
experts ``ffn_gate_exps`` / ``ffn_up_exps`` [E, I, H] and ``ffn_down_exps`` [E, H, I] (numpy shapes; GGUF
lists dimensions reversed), as ``convert_hf_to_gguf.py`` writes a ``Qwen3MoeForCausalLM``. So a tinylm model
is a ``qwen3moe`` exactly when it has ``qk_norm``, no shared expert and renormalised routing for its k
(``norm_topk_prob``, and ``norm_top1_prob`` for top-1) -- MiniMind-3-MoE's shape. A shared expert is refused:
llama.cpp's only Qwen class with one, ``qwen2moe``, gates it by ``silu(g) / g`` (a sigmoid), so the zero gate
that makes transformers' Qwen2-MoE always-on gives 0 / 0 there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from model.config import ModelConfig
from model.moe_hf import MoeInteropError

ARCHITECTURE = "qwen3moe"


def check_gguf_moe(cfg: ModelConfig) -> None:
    """MoeInteropError naming the field when llama.cpp's ``qwen3moe`` does not compute ``cfg`` exactly."""
    if cfg.n_shared_experts > 0:
        raise MoeInteropError(
            f"{cfg.n_shared_experts} shared experts: llama.cpp's qwen3moe has none and its qwen2moe gates the shared "
            "expert by silu(g)/g, which the always-on zero gate turns into 0/0; export --format hf instead",
            field="n_shared_experts")
    if not cfg.qk_norm:
        raise MoeInteropError("false: llama.cpp's qwen3moe has per-head q/k norms", field="qk_norm")
    if not (cfg.norm_topk_prob and (cfg.num_experts_per_tok > 1 or cfg.norm_top1_prob)):
        field = "norm_topk_prob" if not cfg.norm_topk_prob else "norm_top1_prob"
        raise MoeInteropError("false: llama.cpp's qwen3moe always renormalises the routed weights", field=field)


def add_moe_metadata(writer: Any, cfg: ModelConfig) -> None:
    """The ``qwen3moe.expert_*`` keys llama.cpp reads."""
    writer.add_expert_count(cfg.num_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_expert_feed_forward_length(cfg.intermediate_size)


def split_moe_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig
                      ) -> tuple[dict[str, torch.Tensor], list[tuple[str, np.ndarray]]]:
    """(the state without router and experts, [(llama.cpp name, float32 array)] of each layer's router and
    stacked experts)."""
    rest = dict(state)
    out = []
    for n in range(cfg.num_hidden_layers):
        mlp = f"model.layers.{n}.mlp"
        out.append((f"blk.{n}.ffn_gate_inp.weight", _array(rest.pop(f"{mlp}.gate.weight"))))
        for proj, name in (("gate", "ffn_gate_exps"), ("up", "ffn_up_exps"), ("down", "ffn_down_exps")):
            stacked = torch.stack([rest.pop(f"{mlp}.experts.{e}.{proj}_proj.weight") for e in range(cfg.num_experts)])
            out.append((f"blk.{n}.{name}.weight", _array(stacked)))
    return rest, out


def _array(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())
