"""One-token decode step of a :class:`~model.transformer.TinyLM` over fused weight copies.

A decode step multiplies a few rows ([B, hidden], B = batch) by every weight matrix once, so on CPU it
is GEMM-bound, and CPU GEMM is markedly faster for such skinny products with a prepared weight layout and
with the projections that read the same input fused into one matrix. :class:`DecodeWeights` therefore
holds, per layer, ``qkv`` = [q; k; v], ``o``, ``gate_up`` = [gate; up] and ``down``, plus the ``head``
(MoE layers keep calling their module), each either input-major dense ([in, out], ``x @ W`` with no
transposed operand: one row, or not a CPU) or oneDNN-packed (2+ rows on CPU). Measured for the 33
products of one small-preset step (distinct weights, one thread, CPU time, batch 8): nn.Linear 19.0 ms,
input-major 14.9 ms, oneDNN-packed 12.1 ms (batch 1: 8.0, 7.4, 9.2 ms). LoRA adapters are folded in
(W + scaling * B A). Optionally the copies are in a lower precision (``torch.bfloat16``: AMX kernels)
with each product's input cast to it.
:func:`decode_step` is ``TinyLM.forward(ids[:, None], cache=...)`` for one new token per row, computed with
those copies and the model's own embedding, norms, RoPE, attention kernel and MoE blocks
(``tests/test_generate.py`` checks it equals the model's logits and cache).

The copies cost one more model's worth of memory and are built once per model and weight state:
:func:`decode_weights` caches them (weakly, per model) under the ``(data_ptr, _version)`` of every
source tensor, so an optimizer step (an in-place update, which bumps ``_version``) or a loaded state
dict triggers a rebuild, and an unchanged model (a server, successive rollouts without training) reuses
them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.attention import InferenceMask, attend_inference
from model.kv_cache import KVCache
from model.lora import LoRALinear
from model.transformer import MoE, TinyLM, apply_rope

ONEDNN_MIN_BATCH = 2
"""From this batch size on, CPU steps use oneDNN-packed weights (measured at batch 1: slower)."""


def onednn_usable(batch: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether to pack for oneDNN: CPU, float32 or bfloat16, batch >= ONEDNN_MIN_BATCH, torch built with it."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and batch >= ONEDNN_MIN_BATCH
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@dataclass
class DecodeWeights:
    """Fused weights per layer (``gate_up``/``down`` are None for MoE layers) and the head, in ``dtype``
    (the model's, or a lower matmul precision: the step casts each product's input to it and the output back).

    Each is input-major dense [in, out] (``x @ w``) or, when ``onednn``, a oneDNN-packed tensor of the
    [out, in] weight (``torch.ops.mkldnn._linear_pointwise``, the kernel torch.compile uses for CPU linears).
    """

    qkv: list[Tensor]
    o: list[Tensor]
    gate_up: list[Tensor | None]
    down: list[Tensor | None]
    head: Tensor
    onednn: bool
    dtype: torch.dtype
    stamp: tuple[tuple[int, int], ...]


def _linears(model: TinyLM) -> list[nn.Linear]:
    """Every linear whose weight a :class:`DecodeWeights` copies, in a fixed order."""
    out: list[nn.Linear] = []
    for layer in model.model.layers:
        a = layer.self_attn
        out += [a.q_proj, a.k_proj, a.v_proj, a.o_proj]
        if not isinstance(layer.mlp, MoE):
            out += [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    return [*out, model.lm_head]


def _stamp(model: TinyLM) -> tuple[tuple[int, int], ...]:
    """(data_ptr, version) of every tensor the copies derive from: changes whenever a weight does."""
    tensors = []
    for linear in _linears(model):
        tensors.append(linear.weight)
        if isinstance(linear, LoRALinear):
            tensors += [linear.lora_A, linear.lora_B]
    return tuple((t.data_ptr(), t._version) for t in tensors)


def _weight(linear: nn.Linear) -> Tensor:
    """The weight [out, in] the layer applies (a LoRA adapter folded in)."""
    if isinstance(linear, LoRALinear):
        return linear.weight + linear.delta().to(linear.weight.dtype)
    return linear.weight


def _fuse(onednn: bool, dtype: torch.dtype, *linears: nn.Linear) -> Tensor:
    """The layers' weights stacked along out, in ``dtype``: oneDNN-packed, or transposed to [in, sum of outs]."""
    stacked = torch.cat([_weight(lin) for lin in linears]).to(dtype)
    if onednn:
        return torch.ops.mkldnn._reorder_linear_weight(stacked, 8)  # packed for a few rows
    return stacked.t().contiguous()


def _mm(x: Tensor, w: Tensor) -> Tensor:
    """x [B, in] times a :class:`DecodeWeights` entry -> [B, out] in x's dtype."""
    xw = x.to(w.dtype)
    y = torch.ops.mkldnn._linear_pointwise(xw, w, None, "none", [], "") if w.is_mkldnn else xw @ w
    return y.to(x.dtype)


@torch.no_grad()
def build_decode_weights(model: TinyLM, onednn: bool = False, dtype: torch.dtype | None = None) -> DecodeWeights:
    """Fresh fused copies of ``model``'s weights in ``dtype`` (default the model's; oneDNN-packed when ``onednn``)."""
    dtype = dtype or model.lm_head.weight.dtype
    qkv, o, gate_up, down = [], [], [], []
    for layer in model.model.layers:
        a = layer.self_attn
        qkv.append(_fuse(onednn, dtype, a.q_proj, a.k_proj, a.v_proj))
        o.append(_fuse(onednn, dtype, a.o_proj))
        dense = not isinstance(layer.mlp, MoE)
        gate_up.append(_fuse(onednn, dtype, layer.mlp.gate_proj, layer.mlp.up_proj) if dense else None)
        down.append(_fuse(onednn, dtype, layer.mlp.down_proj) if dense else None)
    head = _fuse(onednn, dtype, model.lm_head)
    return DecodeWeights(qkv, o, gate_up, down, head, onednn, dtype, _stamp(model))


_CACHE: weakref.WeakKeyDictionary[TinyLM, DecodeWeights] = weakref.WeakKeyDictionary()


def decode_weights(model: TinyLM, batch: int = 1, dtype: torch.dtype | None = None) -> DecodeWeights:
    """The cached :class:`DecodeWeights` of ``model`` in ``dtype`` (default the model's) for steps of ``batch``
    rows (oneDNN-packed when :func:`onednn_usable`), rebuilt when a source weight, the dtype or the packing
    changed."""
    param = model.lm_head.weight
    dtype = dtype or param.dtype
    onednn = onednn_usable(batch, dtype, param.device)
    cached = _CACHE.get(model)
    if cached is None or (cached.onednn, cached.dtype, cached.stamp) != (onednn, dtype, _stamp(model)):
        _CACHE.pop(model, None)  # free the stale copies before building new ones
        cached = _CACHE[model] = build_decode_weights(model, onednn, dtype)
    return cached


def decode_step(model: TinyLM, weights: DecodeWeights, ids: Tensor, positions: Tensor, cache: KVCache,
                mask: InferenceMask) -> Tensor:
    """Logits [B, V] (fp32) of one new token per row: ``ids`` [B] at ``positions`` [B].

    Writes the tokens' k/v at slot ``cache.length`` of every layer and advances ``cache.length`` by one;
    ``mask`` covers the ``cache.length + 1`` filled slots (see :func:`~model.attention.inference_mask`).
    Eval-mode semantics (no dropout).
    """
    body, cfg = model.model, model.config
    b, nh, nkv, d = ids.size(0), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    cos, sin = body.rotary_emb(positions[:, None])
    x = body.embed_tokens(ids)  # [B, h]
    for i, layer in enumerate(body.layers):
        attn = layer.self_attn
        q, k, v = _mm(layer.input_layernorm(x), weights.qkv[i]).split((nh * d, nkv * d, nkv * d), dim=-1)
        q, k, v = q.view(b, 1, nh, d), k.view(b, 1, nkv, d), v.view(b, nkv, 1, d)
        if attn.q_norm is not None and attn.k_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        keys, values = cache.update(i, k, v)
        x = x + _mm(attend_inference(q, keys, values, mask).view(b, nh * d), weights.o[i])
        h = layer.post_attention_layernorm(x)
        gate_up, down = weights.gate_up[i], weights.down[i]
        if gate_up is None or down is None:
            x = x + layer.mlp(h)[0]
        else:
            gate, up = _mm(h, gate_up).chunk(2, dim=-1)
            x = x + _mm(F.silu(gate) * up, down)
    cache.length += 1
    return _mm(body.norm(x), weights.head).float()
