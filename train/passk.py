"""pass@k of a model on RL prompts, scored by reward functions: the RL stage's ``--eval-prompts`` evaluation
and ``bin/eval --prompts FILE --reward SPEC`` run this same code, with the same per-sample seeds.

For each prompt, n samples at the rollout temperature and one greedy completion are drawn and scored; a
sample succeeds when its total reward >= the threshold. With c successes among n, pass@k is the unbiased
estimate ``1 - C(n - c, k) / C(n, k)`` (Chen et al. 2021); pass@1 = c / n. Sample j of prompt i uses the
seed ``sample_seed(seed, EVAL_BATCH, i, j)``, so every evaluation of a checkpoint draws the same samples.
Sums are kept per chunk of prompts (:func:`pass_sums`, summed over chunks and ranks) and turned into means
by :func:`pass_metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core.tokenizer import TokenizerInfo
from train.prompt_set import PromptSet
from train.rewards import Reward, score
from train.rollout import RolloutConfig, generate, reward_inputs, sample_seed, tool_rollouts, trajectory_inputs

EVAL_BATCH = 1 << 40  # the rollout-batch key of evaluation samples: the same seeds at every evaluation


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples with c successes: ``1 - C(n - c, k) / C(n, k)``."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass(frozen=True)
class PassConfig:
    """pass@k evaluation: samples per prompt (n), k <= n, and the total reward that counts as a success
    (built by ``RLOptions.pass_config``)."""

    samples: int
    k: int
    threshold: float


def _totals(model: nn.Module, prompts: PromptSet, rows: list[int], tok: TokenizerInfo, rewards: list[Reward],
            cfg: RolloutConfig, seeds: list[int] | None, stop: int) -> list[float]:
    """Total rewards of one completion per row (``seeds`` None: greedy), multi-turn with ``cfg.tools``."""
    if cfg.tools is not None:
        trajectories = tool_rollouts(model, prompts, rows, tok, seeds, cfg, stop)
        return score(rewards, *trajectory_inputs(prompts, rows, trajectories))[0]
    done = generate(model, [prompts.ids[i] for i in rows], seeds, cfg, stop, greedy=seeds is None)
    return score(rewards, *reward_inputs(prompts, rows, tok, done))[0]


def pass_sums(model: nn.Module, prompts: PromptSet, indices: Sequence[int], tok: TokenizerInfo,
              rewards: list[Reward], cfg: RolloutConfig, passing: PassConfig) -> dict[str, Tensor]:
    """Sums over prompts ``indices``: sampled pass@1 and pass@k, greedy pass@1, mean sampled reward, prompts."""
    stop = tok.special_ids["<|im_end|>"]
    n = passing.samples
    rows = [i for i in indices for _ in range(n)]
    seeds = [sample_seed(cfg.seed, EVAL_BATCH, i, j) for i in indices for j in range(n)]
    totals = _totals(model, prompts, rows, tok, rewards, cfg, seeds, stop)
    greedy_totals = _totals(model, prompts, list(indices), tok, rewards, cfg, None, stop)
    pass1 = passk = 0.0
    for g in range(len(indices)):
        c = sum(t >= passing.threshold for t in totals[g * n:(g + 1) * n])
        pass1 += c / n
        passk += pass_at_k(n, c, passing.k)
    f64 = torch.float64
    return {"prompts": torch.tensor(float(len(indices)), dtype=f64), "pass1": torch.tensor(pass1, dtype=f64),
            "passk": torch.tensor(passk, dtype=f64),
            "greedy": torch.tensor(float(sum(t >= passing.threshold for t in greedy_totals)), dtype=f64),
            "reward": torch.tensor(sum(totals) / n, dtype=f64)}


def pass_metrics(sums: dict[str, float], k: int, prefix: str = "val_") -> dict[str, float]:
    """pass@1 / pass@k / greedy pass@1 / mean reward from :func:`pass_sums` (summed over chunks and ranks)."""
    n = max(sums["prompts"], 1.0)
    return {f"{prefix}pass@1": sums["pass1"] / n, f"{prefix}pass@{k}": sums["passk"] / n,
            f"{prefix}greedy_pass@1": sums["greedy"] / n, f"{prefix}reward": sums["reward"] / n,
            f"{prefix}prompts": int(sums["prompts"])}
