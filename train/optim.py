"""The optimizers: AdamW alone, or Muon on the hidden matrices with AdamW on everything else.

AdamW parameter groups: weight decay applies to parameters with ``ndim >= 2`` that are not embeddings
(``embed_tokens``; a tied ``lm_head`` is the same tensor and is listed once); norms, biases and every
other 1-D tensor get none. Only parameters with ``requires_grad`` are handed over, so a stage that
freezes weights (LoRA) simply returns fewer of them.

Muon (:class:`DeviceMuon`: ``torch.optim.Muon``'s momentum, then a Newton-Schulz orthogonalisation of the
update, as in modded-nanogpt and nanochat, run in :func:`newton_schulz_dtype` of the device: bfloat16 where
the hardware has it, float32 on CPU, which only emulates bfloat16 matrix products) takes the 2-D hidden
matrices: the attention and MLP (and MoE expert) projections inside ``model.layers``. AdamW keeps the
embeddings, the output head, norms, biases, the MoE router and LoRA adapters: a rank-r adapter factor is
not a hidden matrix whose update should have all singular values ~1 (its product B A is what acts on
activations; B starts at zero), so LoRA runs are AdamW whatever ``--optimizer`` says, and the run says so.

Every group has a peak LR (``--lr`` for AdamW, ``--muon-lr`` for Muon); :meth:`Optimizers.set_lr` sets each
to ``peak * multiplier`` with the schedule's multiplier (``train/schedule.py``). DDP averages gradients
during backward, before :meth:`Optimizers.step`, so Muon orthogonalises the averaged gradient, the same
on every rank, and the ranks' weights stay identical.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from train import defaults

OPTIMIZERS = ("adamw", "muon")


@dataclass(frozen=True)
class OptimConfig:
    """What builds the optimizers: the name, the AdamW part's LR / decay, the Muon part's."""

    name: str
    lr: float
    weight_decay: float
    muon_lr: float
    muon_momentum: float
    muon_weight_decay: float

    @classmethod
    def for_stage(cls, name: str, stage: str = "pretrain", preset: str | None = None, **changes: float) -> OptimConfig:
        """Optimizer ``name`` with the defaults table's row for ``stage`` / ``preset``, ``changes`` applied."""
        row = defaults.lookup(stage, name, preset)
        base = cls(name, row.lr, row.weight_decay, row.muon_lr, row.muon_momentum, row.muon_weight_decay)
        return dataclasses.replace(base, **changes)


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Norm weights and biases are 1-D; embeddings are matrices that are excluded by name."""
    return param.ndim < 2 or "embed_tokens" in name


def is_hidden_matrix(name: str, param: nn.Parameter) -> bool:
    """A 2-D projection inside a transformer block (Muon's share); not a LoRA factor, not the MoE router."""
    return (param.ndim == 2 and name.startswith("model.layers.") and name.endswith("proj.weight"))


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two AdamW groups (decay / no decay) over the trainable parameters, each tensor once."""
    decay, plain, seen = [], [], set()
    for name, p in named:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (plain if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def split_for_muon(named: Iterable[tuple[str, nn.Parameter]]) -> tuple[list[nn.Parameter],
                                                                      list[tuple[str, nn.Parameter]]]:
    """(Muon's hidden matrices, the named rest for AdamW) over the trainable parameters."""
    muon, rest = [], []
    for name, p in named:
        if p.requires_grad and is_hidden_matrix(name, p):
            muon.append(p)
        else:
            rest.append((name, p))
    return muon, rest


class Optimizers:
    """One or two optimizers stepped as one: ``adamw`` always (unless it has nothing to train), ``muon``
    when asked for and there are hidden matrices. State: ``{part: state_dict}``."""

    def __init__(self, parts: dict[str, torch.optim.Optimizer], cfg: OptimConfig) -> None:
        self.parts, self.cfg = parts, cfg
        self.peaks = {"adamw": cfg.lr, "muon": cfg.muon_lr}

    @property
    def name(self) -> str:
        """``muon`` when a Muon part exists, else ``adamw``."""
        return "muon" if "muon" in self.parts else "adamw"

    def set_lr(self, multiplier: float) -> dict[str, float]:
        """Every group's LR = its part's peak x ``multiplier``; returns ``{part: lr}`` for the log."""
        lrs = {}
        for part, opt in self.parts.items():
            lrs[part] = self.peaks[part] * multiplier
            for group in opt.param_groups:
                group["lr"] = lrs[part]
        return lrs

    def unscale_(self, scaler: torch.amp.GradScaler) -> None:
        for opt in self.parts.values():
            scaler.unscale_(opt)

    def step(self, scaler: torch.amp.GradScaler) -> None:
        for opt in self.parts.values():
            scaler.step(opt)

    def zero_grad(self) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {part: opt.state_dict() for part, opt in self.parts.items()}

    def load_state_dict(self, states: dict[str, dict[str, Any]]) -> None:
        for part, opt in self.parts.items():
            opt.load_state_dict(states[part])


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """The dtype of Muon's Newton-Schulz products on ``device``: bfloat16 on CUDA with bfloat16 support
    (torch.optim.Muon's choice), float32 elsewhere (CPUs emulate bfloat16 matrix products)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def newton_schulz(grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz orthogonalisation of a 2-D ``grad``, computed in ``dtype``:
    X = G / ||G|| (transposed when tall), then ``steps`` times X <- a X + (b A + c A A) X with A = X X^T."""
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class DeviceMuon(torch.optim.Muon):
    """``torch.optim.Muon`` (same groups, state and update) whose Newton-Schulz runs in ``ns_dtype``."""

    def __init__(self, params: Iterable[nn.Parameter], ns_dtype: torch.dtype = torch.bfloat16, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Muon's single-tensor update: Nesterov momentum, orthogonalised, decoupled weight decay, LR scaled
        by sqrt(max(1, rows / cols)) (``adjust_lr_fn`` None / "original") or 0.2 sqrt(max(rows, cols))."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, decay = float(group["lr"]), group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype)
                rows, cols = p.shape[:2]
                if group["adjust_lr_fn"] == "match_rms_adamw":
                    scale = 0.2 * math.sqrt(max(rows, cols))
                else:
                    scale = math.sqrt(max(1, rows / cols))
                p.mul_(1 - lr * decay)
                p.add_(update, alpha=-lr * scale)
        return loss


def build_optimizers(named: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig,
                     device: torch.device | None = None) -> Optimizers:
    """AdamW over everything (``adamw``), or Muon over the hidden matrices + AdamW over the rest (``muon``)."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.name!r}; known: {', '.join(OPTIMIZERS)}")
    named = list(named)
    parts: dict[str, torch.optim.Optimizer] = {}
    if cfg.name == "muon":
        hidden, named = split_for_muon(named)
        if hidden:
            parts["muon"] = DeviceMuon(hidden, lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                                       weight_decay=cfg.muon_weight_decay,
                                       ns_dtype=newton_schulz_dtype(device or hidden[0].device))
    if any(p.requires_grad for _, p in named):
        parts["adamw"] = build_adamw(named, cfg.lr, cfg.weight_decay, device=device)
    if not parts:
        raise ValueError("no trainable parameters: the stage froze everything")
    return Optimizers(parts, cfg)


def build_adamw(named: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                device: torch.device | None = None) -> torch.optim.AdamW:
    """AdamW over ``named``; the fused CUDA kernel on CUDA, the default (foreach) implementation elsewhere."""
    groups = param_groups(named, weight_decay)
    if not groups:
        raise ValueError("no trainable parameters: the stage froze everything")
    fused = device is not None and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
