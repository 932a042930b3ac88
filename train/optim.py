"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine learning-rate schedule.

Parameter groups: weight decay applies to parameters with ``ndim >= 2`` that are not embeddings
(``embed_tokens``; a tied ``lm_head`` is the same tensor and is listed once); norms, biases and every
other 1-D tensor get none. Only parameters with ``requires_grad`` are handed over, so a stage that
freezes weights (LoRA) simply returns fewer of them.

Schedule, for step s = 0, 1, ... (the step about to be taken):
``lr(s) = peak * (s + 1) / warmup`` while ``s < warmup``; then cosine from ``peak`` at ``s = warmup``
down to ``min_lr`` at ``s = max_steps - 1`` (and ``min_lr`` after). It is a pure function of s, so
resuming needs only the step counter; the hyper-parameters are saved beside it for the record.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Norm weights and biases are 1-D; embeddings are matrices that are excluded by name."""
    return param.ndim < 2 or "embed_tokens" in name


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


def build_adamw(named: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                device: torch.device | None = None) -> torch.optim.AdamW:
    """AdamW over ``named``; the fused CUDA kernel on CUDA, the default (foreach) implementation elsewhere."""
    groups = param_groups(named, weight_decay)
    if not groups:
        raise ValueError("no trainable parameters: the stage froze everything")
    fused = device is not None and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


@dataclass(frozen=True)
class CosineSchedule:
    peak_lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        span = max(1, self.max_steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict:
        return asdict(self)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
