"""Training stages: the only stage-specific code the loop calls (interface and contract: ``base.py``).

One module per job: ``base`` (the interface, the model call, pretrain / SFT / reasoning cross-entropy),
``dpo`` (preference pairs against a reference), ``distill`` (a frozen teacher's soft targets), ``rl`` (what the
reinforcement-learning stages share: the model's own rollouts, scored by reward functions), ``grpo``
(group-relative advantages) and ``ppo`` (a value head and GAE).
"""

from __future__ import annotations

from typing import Any

from train.stages.base import (
    CrossEntropyStage,
    PretrainStage,
    ReasonStage,
    SFTStage,
    Stage,
    StageContext,
    StageError,
    StepNorm,
    Supervised,
    forward,
    supervised_forward,
    token_cross_entropy,
)
from train.stages.distill import DistillStage
from train.stages.dpo import DPOStage
from train.stages.grpo import GRPOStage
from train.stages.ppo import PPOStage

STAGES: dict[str, type[Stage]] = {cls.name: cls for cls in (PretrainStage, SFTStage, ReasonStage, DPOStage,
                                                            DistillStage, GRPOStage, PPOStage)}


def build_stage(name: str, **kwargs: Any) -> Stage:
    """The stage called ``name`` with its keyword options (StageError for an unknown name)."""
    if name not in STAGES:
        raise StageError(f"unknown stage {name!r}; known: {', '.join(STAGES)}")
    return STAGES[name](**kwargs)


__all__ = ["STAGES", "CrossEntropyStage", "DPOStage", "DistillStage", "GRPOStage", "PPOStage", "PretrainStage",
           "ReasonStage", "SFTStage", "Stage", "StageContext", "StageError", "StepNorm", "Supervised", "build_stage",
           "forward", "supervised_forward", "token_cross_entropy"]
