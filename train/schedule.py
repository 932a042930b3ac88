"""The learning-rate schedules: a multiplier of each parameter group's peak LR as a pure function of the step.

For step s = 0, 1, ... (the step about to be taken), with ``W = warmup_steps`` and ``M = max_steps``:

- warmup (both kinds): ``m(s) = (s + 1) / W`` while ``s < W``;
- ``cosine``: from 1 at ``s = W`` down to ``min_ratio`` at ``s = M - 1`` (and ``min_ratio`` after);
- ``wsd`` (warmup, stable, decay): 1 until ``decay_start = M - D`` with ``D = max(1, round(decay_frac * M))``
  (never before ``W``), then linear ``1 -> min_ratio`` over the last D steps: ``m(s) = 1 - (1 - min_ratio) *
  (s - decay_start + 1) / D``, so the last step runs at ``min_ratio``.

Invariants: ``m`` depends on s and the record only, so resuming needs just the step counter; a WSD run's
multipliers before ``decay_start`` do not depend on M, so the weights after ``decay_start`` steps (the
pre-decay checkpoint the loop always keeps) are the same for any longer M: a finished run extended to a
larger M from there continues exactly as if it had been started with that M (same warmup, no second one).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from train.defaults import DECAY_FRAC

KINDS = ("cosine", "wsd")


@dataclass(frozen=True)
class Schedule:
    kind: str
    warmup_steps: int
    max_steps: int
    min_ratio: float = 0.1  # final LR / peak LR
    decay_frac: float = DECAY_FRAC  # wsd: the last fraction of max_steps that decays

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown schedule {self.kind!r}; known: {', '.join(KINDS)}")
        if not 0.0 < self.decay_frac <= 1.0:
            raise ValueError(f"decay_frac must be in (0, 1], not {self.decay_frac}")

    @property
    def decay_start(self) -> int:
        """The first step whose multiplier is below 1 after warmup (cosine: the end of warmup)."""
        if self.kind == "cosine":
            return self.warmup_steps
        return max(self.warmup_steps, self.max_steps - max(1, round(self.decay_frac * self.max_steps)))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            span = max(1, self.max_steps - 1 - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return self.min_ratio + 0.5 * (1.0 - self.min_ratio) * (1.0 + math.cos(math.pi * progress))
        if step < self.decay_start:
            return 1.0
        span = max(1, self.max_steps - self.decay_start)
        return 1.0 - (1.0 - self.min_ratio) * min(1.0, (step - self.decay_start + 1) / span)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)


def recorded_kind(record: dict[str, Any] | None) -> str:
    """The schedule kind a checkpoint's ``training.schedule`` record names (older files: cosine)."""
    return str((record or {}).get("kind", "cosine"))
