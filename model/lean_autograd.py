"""Memory-lean autograd for the decoder block's biggest keepers of activations: SwiGLU and RMSNorm.

Plain autograd keeps, per SwiGLU ``down(silu(gate) * up)``, four [N, intermediate] tensors for backward
(silu's input ``gate``, the product's operands ``silu(gate)`` and ``up``, and ``down``'s input
``silu(gate) * up``), and per RMSNorm both its input and the normalised input. The Functions here keep
only what backward cannot cheaply recompute and redo the cheap elementwise work in backward:

- :func:`swiglu_down`: keeps ``gate`` and ``up`` (and ``down``'s weight); ``silu(gate) * up`` is recomputed
  for ``down``'s weight gradient. When ``down`` is not a bias-free plain ``nn.Linear`` (a LoRA adapter),
  only ``silu(gate) * up`` is a lean Function (keeping ``gate`` and ``up``) and ``down`` runs as itself.
- :func:`rms_norm`: keeps the input and the per-row ``rstd`` [..., 1] (fp32, or fp64 for fp64 input);
  the normalised input is recomputed from them.
- :func:`norm_linear`: an RMSNorm and the projections that read it (q/k/v; gate/up) as one Function that
  keeps x and rstd, not the normalised x the projections would otherwise keep for their weight gradients.

Forward values are bit-identical to the plain formulas (the same operations, in the same order and
dtypes). The SwiGLU gradients use the same kernels autograd uses (``silu_backward``, the products and
``mm`` s of ``MulBackward`` / ``MmBackward``); RMSNorm's input gradient is the closed form
``rstd * (g_n - n * mean(g_n * n))`` (``n`` normalised, ``g_n`` its gradient, both in at least fp32),
equal to autograd's to rounding. The normalisation runs in at least fp32: bf16 / fp16 inputs are upcast
to fp32, fp64 inputs stay fp64. Under autocast the
SwiGLU operands arrive in the autocast dtype (the projections' outputs), and ``down``'s weight is cast
to it outside the Function (a differentiable cast, as autocast's own).
Without autograd (no grad mode, or nothing requires grad), or with :data:`ENABLED` off, the plain
formulas run, with no Function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

ENABLED = True
"""False: every function here (and the CPU per-document attention) runs the plain formulas under plain
autograd (``bench/memory.py --ab`` times both in one process)."""


def use_lean(*tensors: Tensor) -> bool:
    """Whether to run a lean Function: enabled, autograd on, and some input requires grad."""
    return ENABLED and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _swiglu_input_grads(grad_h: Tensor, gate: Tensor, up: Tensor, silu: Tensor,
                        needs: tuple[bool, ...]) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``h = silu(gate) * up`` w.r.t. gate and up, given dL/dh (autograd's own kernels)."""
    grad_gate = torch.ops.aten.silu_backward(grad_h * up, gate) if needs[0] else None
    grad_up = grad_h * silu if needs[1] else None
    return grad_gate, grad_up


class _SiluMul(torch.autograd.Function):
    """h = silu(gate) * up, keeping gate and up only."""

    @staticmethod
    def forward(ctx: FunctionCtx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: FunctionCtx, grad_h: Tensor) -> tuple[Tensor | None, Tensor | None]:
        gate, up = ctx.saved_tensors
        return _swiglu_input_grads(grad_h, gate, up, F.silu(gate), ctx.needs_input_grad)


class _SwiGLUDown(torch.autograd.Function):
    """y = (silu(gate) * up) @ weight.T, keeping gate, up and weight; the product is recomputed in backward."""

    @staticmethod
    def forward(ctx: FunctionCtx, gate: Tensor, up: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up, weight)
        return F.linear(F.silu(gate) * up, weight)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        gate, up, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        silu = F.silu(gate)
        grad_weight = None
        if needs[2]:  # as MmBackward: (h^T g)^T over the flattened positions
            h = (silu * up).reshape(-1, up.shape[-1])
            grad_weight = h.t().mm(grad_out.reshape(-1, grad_out.shape[-1])).t()
        if not (needs[0] or needs[1]):
            return None, None, grad_weight
        grad_h = grad_out.reshape(-1, grad_out.shape[-1]).mm(weight).view(up.shape)
        return (*_swiglu_input_grads(grad_h, gate, up, silu, needs), grad_weight)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``; under autograd keeps gate and up only (not silu(gate))."""
    if not use_lean(gate, up):
        return F.silu(gate) * up
    return _SiluMul.apply(gate, up)


def swiglu_down(gate: Tensor, up: Tensor, down: nn.Module) -> Tensor:
    """``down(silu(gate) * up)``; under autograd keeps gate and up, never the [N, intermediate] product.

    ``down`` fuses in when it is a bias-free plain ``nn.Linear``; any other module (a LoRA adapter) is
    called on :func:`silu_mul`'s output.
    """
    if type(down) is not nn.Linear or down.bias is not None:
        return down(silu_mul(gate, up))
    if not use_lean(gate, up, down.weight):
        return down(F.silu(gate) * up)
    return _SwiGLUDown.apply(gate, up, down.weight.to(gate.dtype))


def _upcast(x: Tensor) -> Tensor:
    """x in at least fp32 (bf16 / fp16 -> fp32; fp32 and fp64 unchanged)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _normalise(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype), rstd [..., 1]): normalised in at least fp32."""
    x32 = _upcast(x)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


def _rms_norm_grads(grad_y: Tensor, x: Tensor, n32: Tensor, rstd: Tensor, weight: Tensor,
                    needs: tuple[bool, ...]) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``y = weight * n.to(x.dtype)``, ``n = x * rstd`` (``n32``: n in at least fp32, recomputed
    by the caller from x and rstd), w.r.t. x and weight.

    dL/dx = rstd * (g_n - n * mean(g_n * n)) with g_n = dL/dn (in at least fp32); dL/dweight as MulBackward
    computes it (g * n summed over the broadcast dims, in weight's dtype).
    """
    grad_weight = None
    if needs[1]:
        rows = grad_y * n32.to(x.dtype)
        grad_weight = rows.sum(tuple(range(rows.dim() - 1))).to(weight.dtype)
    if not needs[0]:
        return None, grad_weight
    grad_n = _upcast((grad_y * weight).to(x.dtype))
    grad_x = rstd * (grad_n - n32 * (grad_n * n32).mean(-1, keepdim=True))
    return grad_x.to(x.dtype), grad_weight


class _RMSNorm(torch.autograd.Function):
    """weight * normalised(x).to(x.dtype), keeping x, rstd and weight (not the normalised x)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        y, rstd = _normalise(x, weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, rstd, weight = ctx.saved_tensors
        return (*_rms_norm_grads(grad_y, x, _upcast(x) * rstd, rstd, weight, ctx.needs_input_grad[:2]), None)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))``, normalised in at least fp32 and cast back to x's dtype before the
    weight multiply (so the result has the promoted dtype of weight and x); under autograd keeps x and rstd."""
    if not use_lean(x, weight):
        return _normalise(x, weight, eps)[0]
    return _RMSNorm.apply(x, weight, eps)


class _NormLinear(torch.autograd.Function):
    """outs_i = F.linear(rms_norm(x).to(W_i.dtype), W_i): keeps x, rstd and the weights, never the normalised x.

    The projections' weight gradients need the normalised input; backward recomputes it from x and rstd.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, norm_weight: Tensor, eps: float, *weights: Tensor) -> tuple[Tensor, ...]:
        y, rstd = _normalise(x, norm_weight, eps)
        ctx.save_for_backward(x, rstd, norm_weight, *weights)
        return tuple(F.linear(y.to(w.dtype), w) for w in weights)

    @staticmethod
    def backward(ctx: FunctionCtx, *grad_outs: Tensor) -> tuple[Tensor | None, ...]:
        x, rstd, norm_weight, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        n32 = _upcast(x) * rstd  # recomputed once: for the projections' weight gradients and the norm's
        y = norm_weight * n32.to(x.dtype)
        flat = [g.reshape(-1, g.shape[-1]) for g in grad_outs]
        grad_weights = [y.reshape(-1, y.shape[-1]).to(w.dtype).t().mm(g).t() if need else None  # as MmBackward
                        for w, g, need in zip(weights, flat, needs[3:], strict=True)]
        if not (needs[0] or needs[1]):
            return None, None, None, *grad_weights
        grad_y = sum(g.mm(w).to(y.dtype) for g, w in zip(flat, weights, strict=True)).view(y.shape)
        return (*_rms_norm_grads(grad_y, x, n32, rstd, norm_weight, needs[:2]), None, *grad_weights)


def norm_linear(x: Tensor, norm: nn.Module, projections: tuple[nn.Module, ...]) -> tuple[Tensor, ...]:
    """``tuple(p(norm(x)) for p in projections)`` for an RMSNorm module ``norm`` (``weight``, ``eps``);
    under autograd the normalised x is never kept (backward recomputes it from x and rstd).

    Fused only when every projection is a bias-free plain ``nn.Linear`` (else, e.g. LoRA adapters: the
    modules are called on ``norm(x)``). Under autocast the weights are cast to the autocast dtype outside
    the Function (differentiably, as autocast's own cast) and the normalised x is cast to it inside.
    """
    weights = [p.weight for p in projections if type(p) is nn.Linear and p.bias is None]
    if len(weights) < len(projections) or not use_lean(x, norm.weight, *weights):
        h = norm(x)
        return tuple(p(h) for p in projections)
    device = x.device.type
    if torch.is_autocast_enabled(device):
        weights = [w.to(torch.get_autocast_dtype(device)) for w in weights]
    return _NormLinear.apply(x, norm.weight, norm.eps, *weights)
