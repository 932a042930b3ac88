"""Reinforcement learning with verifiable rewards (GRPO family): batches are the policy's own rollouts
(``train/rollout.py``), scored by reward functions (``train/rewards.py``); everything else is the loop
of ``train/loop.py``.

Per completion token t of sample i (loss weight m = 1, see ``train/rollout.py`` "Rows"), with
``logp = log pi(y_t)`` under ``softmax(logits / T)`` (T = ``--rollout-temperature``, the distribution the
tokens were drawn from), ``old`` the log-prob when the rollout was generated (= ``logp.detach()`` unless
``--rollout-reuse`` > 1), ``rho = exp(logp - old)`` and the group-relative advantage A_i::

    dapo / grpo / dr_grpo:  l = -min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A)
    cispo:                  l = -detach(min(rho, 1 + eps_high)) * A * logp
    + kl_coef * k3,  k3 = exp(ref - logp) - (ref - logp) - 1   (ref: the frozen --init-from model)

and the step loss (summed over micro-batches and ranks, the loss contract of ``base.py``), N = completion
tokens of the whole step, S = completions of the step (P x G), L = ``--max-new-tokens``::

    dapo, cispo:  sum(l * m) / N                 (token level over the whole step; TRL's default)
    grpo:         sum_i (sum_t l * m / |m_i|) / S  (per-sequence mean, then the mean)
    dr_grpo:      sum(l * m) / (S * L)

Metrics (token means over the step): ``kl`` (k3, only with a reference), ``clip_frac`` (tokens whose
clipped term is the active one: rho outside the range in the direction A pushes; cispo: rho > 1 + eps_high),
``entropy`` (of softmax(logits / T)). Rollout statistics come from :class:`~train.rollout.RolloutLoader`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from train.options import OptionError, option
from train.rollout import RolloutBatch
from train.stages.base import StepNorm, Supervised
from train.stages.rl import RLOptions, RolloutStage, token_entropy, token_logps

LOSSES = ("dapo", "dr_grpo", "grpo", "cispo")
SCALES = ("group", "none")

__all__ = ["LOSSES", "SCALES", "GRPOOptions", "GRPOStage", "token_entropy", "token_logps"]


@dataclass(frozen=True)
class GRPOOptions(RLOptions):
    """The --stage grpo flags: the RL flags (``train/stages/rl.py``) and how group-relative advantages become a
    loss (the module docstring)."""

    loss: str = option("dapo", "grpo only: dapo: token-level over the step (default); grpo: per-sequence mean; "
                       "dr_grpo: / (S x max-new-tokens); cispo: clipped IS weight (detached) x log-prob",
                       choices=LOSSES)
    scale_rewards: str = option("group", "grpo only: divide advantages by the group's reward std (group, default) or "
                                "not (none)", choices=SCALES)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in LOSSES or self.scale_rewards not in SCALES:
            raise OptionError(f"--loss is one of {', '.join(LOSSES)}; --scale-rewards one of {', '.join(SCALES)}")

    @property
    def advantage_scale(self) -> str:
        return self.scale_rewards


class GRPOStage(RolloutStage):
    """On-policy RL from prompts and reward functions with group-relative advantages (the module docstring)."""

    name = "grpo"
    Options = GRPOOptions

    def __init__(self, byte_lengths: Tensor | None = None, options: GRPOOptions | None = None, **values: Any):
        super().__init__(byte_lengths, options, **values)
        self.loss_type = self.options.loss

    def summary_detail(self) -> str:
        return f", loss {self.loss_type}"

    def annotate(self, batch: RolloutBatch) -> None:
        """At rollout time: the old policy's per-token log-probs (only with reuse > 1) and the reference's
        (only with a KL term), computed in eval mode on the rollout's device, kept on the CPU."""
        if self.options.rollout_reuse > 1:
            batch.old_token_logps = self.eval_logps(self.model, batch)
        if self.ref_model is not None:
            batch.ref_token_logps = self.eval_logps(self.ref_model, batch)

    # ---- objective ---------------------------------------------------------------------------------------------
    def objective(self, sup: Supervised, batch: RolloutBatch, norm: StepNorm) -> tuple[Tensor, dict[str, Tensor]]:
        """The step loss of the module docstring, and its token-mean metrics."""
        loss, metrics = self.token_loss(sup, batch)
        m = batch.weights
        samples = float(self.options.prompts_per_step * self.options.group_size)
        if self.loss_type == "grpo":
            total = ((loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / samples
        elif self.loss_type == "dr_grpo":
            total = (loss * m).sum() / (samples * float(self.options.max_new_tokens))
        else:
            total = (loss * m).sum() / norm.tokens
        return total, {k: ((v * m).sum() / norm.tokens).detach() for k, v in metrics.items()}

    def token_loss(self, sup: Supervised, batch: RolloutBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-token loss l [B, T] and per-token metric values (kl, clip_frac, entropy)."""
        logp = token_logps(sup, batch.targets, self.temperature)
        old = batch.old_token_logps if batch.old_token_logps is not None else logp.detach()
        adv = batch.advantages[:, None].to(logp.dtype)
        ratio = torch.exp(logp - old)
        if self.loss_type == "cispo":
            loss = -torch.clamp(ratio, max=1.0 + self.eps_high).detach() * adv * logp
            clipped = ratio > 1.0 + self.eps_high
        else:
            loss = -torch.min(ratio * adv, torch.clamp(ratio, 1.0 - self.eps, 1.0 + self.eps_high) * adv)
            clipped = ((ratio < 1.0 - self.eps) & (adv < 0)) | ((ratio > 1.0 + self.eps_high) & (adv > 0))
        metrics = {"clip_frac": clipped.float(), "entropy": token_entropy(sup, self.temperature)}
        if batch.ref_token_logps is not None:
            d = batch.ref_token_logps - logp
            kl = torch.exp(d) - d - 1.0
            loss = loss + self.kl_coef * kl
            metrics["kl"] = kl.detach()
        return loss, metrics
