"""Rollouts for the RL stage: the model's own batched KV-cache generation, scored by reward functions, as
the loop's batches (:class:`RolloutLoader`, a ``train.batches.Batches``).

Step layout. Optimizer step s trains on rollout batch ``b = s // reuse`` (``--rollout-reuse``: the same
rollouts for ``reuse`` consecutive steps, generated at the first of them by the policy of that moment,
whose per-token log-probs are kept as the "old" policy). Batch b takes the P prompts at global sample
positions ``[b * P, (b + 1) * P)`` of the prompt order (``train.data.Split``'s keyed permutation,
reshuffled every epoch); each prompt gets G samples. The P prompts are split into ``accum * world``
micro-batches of whole groups; micro-batch m of rank r holds global micro-batch ``m * world + r`` (the
layout of ``train.data.BatchLoader``), so each rank generates only its own groups. Sample j of the
prompt at position p of batch b is drawn with its own seed ``sample_seed(seed, b, p, j)``
(``Generation(seeds=...)``): its tokens depend only on (model, prompt, seed), never on the batch it ran
in, the rank or the number of processes; a resumed run therefore samples the same completions.

Rows. A row is ``prompt ids + completion ids (+ the <|im_end|> that ended it)``, right-padded to the
micro-batch's longest row; ``targets[t] = ids[t + 1]``; ``weights[t] = 1`` where ``targets[t]`` is a
completion token (its closing ``<|im_end|>`` included), 0 elsewhere, and 0 on the whole row of a
truncated completion under ``--mask-truncated``. Rewards see the completion text decoded without the
chat control tokens (``<think>`` / ``<answer>`` tags kept).

Tools (``--tools``, ``RolloutConfig.tools``). A rollout is multi-turn (``train/agentic.py``): the calls it
makes to its prompt's offered tools run, their results go back as tool turns, generation continues, up to
``--max-tool-rounds`` rounds. Its row is prompt + everything after it (model turns, tool turns, generation
prompts; at most ``--max-new-tokens`` ids); ``weights`` are 1 on the model's own tokens only (each turn's
closing ``<|im_end|>`` included): tool results are context, never supervised. Rewards see the trajectory's
messages (assistant and tool turns) as the completion; ``completion_len`` counts the model's tokens and
``tool_rounds`` the rounds of calls run. Seeds: round 0 of a sample uses its sample seed, round r its
``train.agentic.round_seed``, so a trajectory depends only on (model, prompt, seed, tools).

Advantages (group-relative): ``A_ij = r_ij - mean_j r_ij``, divided by ``std_j r_ij + 1e-4`` (unbiased
std, TRL's convention) under ``--scale-rewards group``; a group whose rewards are all equal (std 0) has A = 0 for
all its samples, so it gives no policy gradient, and it is counted in ``frac_reward_zero_std``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from core.tokenizer import TokenizerInfo
from model.generate import FINISH_LENGTH, Generation
from train import dist
from train.agentic import Sampling, ToolConfig, Trajectory, roll_out
from train.data import Batch, Split, splitmix64
from train.prompt_set import PromptSet
from train.rewards import Reward, score

STD_EPS = 1e-4  # TRL's epsilon in (r - mean) / (std + eps)


def sample_seed(seed: int, batch: int, position: int, sample: int) -> int:
    """The 63-bit sampling seed of sample ``sample`` of the prompt at ``position`` of rollout batch ``batch``:
    a splitmix64 chain over (batch, position, sample) keyed by the run's seed."""
    h = splitmix64(np.array([batch], dtype=np.uint64), seed)
    h = splitmix64(h ^ np.uint64(position), seed + 1)
    h = splitmix64(h ^ np.uint64(sample), seed + 2)
    return int(h[0] >> np.uint64(1))


ROLLOUT_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}
"""--rollout-dtype -> Generation(matmul_dtype=...): float32 = the model's own precision; bfloat16 = the decode
steps' weight products in bf16 (for CPUs with AMX / AVX512-BF16: ``bench/bench_grpo.py`` measures the split);
the sampled tokens are then those of a bf16-rounded policy, while log-probs, ratios and the loss stay in the
model's precision."""


@dataclass(frozen=True)
class RolloutConfig:
    """How rollouts are drawn and turned into advantages (built by ``RLOptions.rollout_config``,
    ``train/stages/rl.py``)."""

    group_size: int
    prompts_per_step: int
    max_new_tokens: int
    temperature: float
    top_k: int | None
    reuse: int
    scale_rewards: str
    mask_truncated: bool
    seed: int
    matmul_dtype: torch.dtype | None  # Generation(matmul_dtype=...): None = the model's precision
    tools: ToolConfig | None = None  # --tools: multi-turn rollouts with tool execution (train/agentic.py)

    @property
    def samples(self) -> int:
        """Completions per rollout batch (global): P x G."""
        return self.prompts_per_step * self.group_size


@dataclass(kw_only=True)
class RolloutBatch(Batch):
    """A micro-batch of rollouts: rows of prompt + completion (module docstring, "Rows"; plain causal attention,
    no ``doc_ids`` / ``position_ids``) with per-row ``advantages`` [B] and, when the loss needs them, per-token
    log-probs [B, T] of the completions: ``old_token_logps`` under the policy that drew them (``--rollout-reuse``
    > 1) and ``ref_token_logps`` under the frozen reference (a KL term). A stage that needs more per row
    subclasses it (``RolloutLoader(batch_type=...)``)."""

    advantages: Tensor
    scores: Tensor | None = None  # [B] each row's total reward (the sum of the weighted reward functions)
    old_token_logps: Tensor | None = None
    ref_token_logps: Tensor | None = None


@dataclass
class Completions:
    """The generated part of a micro-batch: ids per row (without the stop id) and whether it was truncated."""

    tokens: list[list[int]]
    truncated: list[bool]


def generate(model: nn.Module, prompts: Sequence[Sequence[int]], seeds: Sequence[int] | None, cfg: RolloutConfig,
             stop_id: int, greedy: bool = False) -> Completions:
    """One batched KV-cache generation (eval mode, inference mode) stopping at ``stop_id``."""
    gen = Generation(model, prompts, max_new_tokens=cfg.max_new_tokens, temperature=0.0 if greedy else cfg.temperature,
                     top_k=cfg.top_k, stop_ids=[stop_id], seeds=None if greedy else seeds,
                     matmul_dtype=cfg.matmul_dtype)
    tokens = gen.run()  # stops matched on the device, host reads every few steps only
    return Completions(tokens, [r == FINISH_LENGTH for r in gen.finish_reasons])


def completion_rows(prompts: Sequence[Sequence[int]], done: Completions, stop_id: int,
                    mask_truncated: bool) -> Batch:
    """The training rows of prompts + completions (module docstring, "Rows")."""
    rows = [list(p) + t + ([] if cut else [stop_id])
            for p, t, cut in zip(prompts, done.tokens, done.truncated, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    weights = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, (p, row, cut) in enumerate(zip(prompts, rows, done.truncated, strict=True)):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        if not (cut and mask_truncated):
            weights[i, len(p) - 1:len(row) - 1] = 1.0
    targets = torch.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    return Batch(ids, targets, weights)


def trajectory_rows(prompts: Sequence[Sequence[int]], trajectories: Sequence[Trajectory],
                    mask_truncated: bool) -> Batch:
    """The training rows of prompts + multi-turn trajectories: ``weights[t] = 1`` where ``targets[t]`` is one
    of the model's own tokens (``Trajectory.learn``), 0 on the prompt, tool turns and padding, and 0 on the
    whole row of a truncated trajectory under ``--mask-truncated``."""
    width = max(len(p) + len(t.tokens) for p, t in zip(prompts, trajectories, strict=True))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    weights = torch.zeros(len(prompts), width, dtype=torch.float32)
    for i, (p, t) in enumerate(zip(prompts, trajectories, strict=True)):
        ids[i, :len(p) + len(t.tokens)] = torch.tensor(list(p) + t.tokens, dtype=torch.long)
        if not (t.truncated and mask_truncated):
            weights[i, len(p) - 1:len(p) - 1 + len(t.tokens)] = torch.tensor(t.learn, dtype=torch.float32)
    targets = torch.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    return Batch(ids, targets, weights)


def group_advantages(rewards: Tensor, scale: str) -> tuple[Tensor, Tensor, Tensor]:
    """Rewards [groups, G] -> (advantages [groups, G], per-group std [groups], zero-std flag [groups])."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1)
    zero = torch.isclose(std, torch.zeros_like(std))
    adv = rewards - mean
    if scale == "group":
        adv = adv / (std[:, None] + STD_EPS)
    return adv.masked_fill(zero[:, None], 0.0), std, zero


def decode(tok: TokenizerInfo, tokens: list[int]) -> str:
    """A completion as reward functions see it: the text without chat control tokens (tags kept)."""
    return tok.tokenizer.decode(tokens, skip_special_tokens=True)


def reward_inputs(prompt_set: PromptSet, indices: Sequence[int], tok: TokenizerInfo,
                  done: Completions) -> tuple[list, list, dict[str, list]]:
    """TRL's (prompts, completions, columns) for rows whose prompts are ``indices`` of ``prompt_set``."""
    prompts = [prompt_set.prompts[i].turns for i in indices]
    completions = [[{"role": "assistant", "content": decode(tok, t)}] for t in done.tokens]
    keys = sorted({k for i in set(indices) for k in prompt_set.prompts[i].columns})
    columns = {k: [prompt_set.prompts[i].columns.get(k) for i in indices] for k in keys}
    columns["completion_ids"] = [[int(i) for i in t] for t in done.tokens]  # TRL's keyword: the generated ids
    columns["tokenizer"] = [str(tok.path)] * len(done.tokens)  # their tokenizer.json (calculator_call parses ids)
    return prompts, completions, columns


def sampling_of(cfg: RolloutConfig, stop_id: int, greedy: bool = False) -> Sampling:
    return Sampling(cfg.max_new_tokens, 0.0 if greedy else cfg.temperature, cfg.top_k, cfg.matmul_dtype, stop_id)


def tool_rollouts(model: nn.Module, prompt_set: PromptSet, indices: Sequence[int], tok: TokenizerInfo,
                  seeds: Sequence[int] | None, cfg: RolloutConfig, stop_id: int) -> list[Trajectory]:
    """Multi-turn rollouts (``train.agentic.roll_out``) of prompts ``indices``; ``seeds`` None: greedy."""
    assert cfg.tools is not None
    return roll_out(model, tok, [prompt_set.ids[i] for i in indices], [prompt_set.names[i] for i in indices],
                    seeds, sampling_of(cfg, stop_id, greedy=seeds is None), cfg.tools)


def trajectory_inputs(prompt_set: PromptSet, indices: Sequence[int],
                      trajectories: Sequence[Trajectory]) -> tuple[list, list, dict[str, list]]:
    """TRL's (prompts, completions, columns) where each completion is the trajectory's messages (assistant
    and tool turns, in order)."""
    prompts = [prompt_set.prompts[i].turns for i in indices]
    keys = sorted({k for i in set(indices) for k in prompt_set.prompts[i].columns})
    columns = {k: [prompt_set.prompts[i].columns.get(k) for i in indices] for k in keys}
    return prompts, [t.messages for t in trajectories], columns


# ---- the loop's batches -------------------------------------------------------------------------------------

STAT_SUMS = ("reward", "reward_std", "frac_reward_zero_std", "completion_len", "truncated_frac", "tokens")
TOOL_SUMS = ("tool_rounds",)  # with --tools: rounds of calls run per completion


@dataclass
class EvalChunk:
    """Evaluation prompts: indices into the evaluation set (the stage generates and scores them)."""

    indices: list[int] = field(default_factory=list)


class RolloutLoader:
    """The loop's batches (``train.batches.Batches``) for the RL stage: each step's micro-batches are this
    rank's rollouts, generated when the step is taken, by the current policy (module docstring); evaluation
    batches are chunks of the evaluation prompts. :meth:`step_metrics` gives the step's global rollout
    statistics (all-reduced once per rollout batch). ``annotate`` sees each micro-batch once it is scored;
    ``prepare`` (optional) sees this rank's micro-batches of each rollout batch once all are annotated, on every
    rank at the same moment, so it may use collectives."""

    shown = ("reward",)

    def __init__(self, split: Split[PromptSet], model: nn.Module, tok: TokenizerInfo, rewards: list[Reward],
                 cfg: RolloutConfig, rank: int, world: int, annotate: Callable[[RolloutBatch], None],
                 eval_set: PromptSet | None = None, batch_type: type[RolloutBatch] = RolloutBatch,
                 prepare: Callable[[list[RolloutBatch]], None] | None = None) -> None:
        self.split, self.prompts, self.rank, self.world = split, split.dataset, rank, world
        self.model, self.tok, self.rewards, self.cfg, self.annotate = model, tok, rewards, cfg, annotate
        self.eval_set, self.batch_type, self.prepare = eval_set, batch_type, prepare
        self.stop_id = tok.special_ids["<|im_end|>"]
        self.sums = STAT_SUMS + (TOOL_SUMS if cfg.tools is not None else ())
        self._stats: dict[str, float] = {}
        self._rollout_s = 0.0

    @property
    def seq_len(self) -> int:
        """The widest row a rollout can make: the longest prompt + ``max_new_tokens``."""
        return self.prompts.seq_len

    def global_batch(self, accum: int) -> int:
        """Completions per step, over all ranks (samples_seen counts completions)."""
        return self.cfg.samples

    @property
    def eval_rows(self) -> int:
        return self.eval_set.n_rows if self.eval_set is not None else 0

    def micro_prompts(self, accum: int) -> int:
        """Prompts per micro-batch: P / (accum x world), whole groups only (checked by ``train/run.py``)."""
        return self.cfg.prompts_per_step // (accum * self.world)

    def steps(self, start_sample: int, accum: int) -> Iterator[list[RolloutBatch]]:
        """Endless steps from ``start_sample``; rollouts are generated lazily, when the loop asks for the step."""
        step = start_sample // self.cfg.samples
        current, micro = -1, []
        while True:
            b = step // self.cfg.reuse
            if b != current:
                started = time.perf_counter()
                micro, local = self._rollout_batch(b, accum)
                self._rollout_s = time.perf_counter() - started
                self._stats = self._global_stats(local, self._rollout_s)
                current = b
            else:
                self._rollout_s = 0.0
            yield micro
            step += 1

    def _rollout_batch(self, b: int, accum: int) -> tuple[list[RolloutBatch], dict[str, Any]]:
        """This rank's micro-batches of rollout batch ``b`` and their local statistics."""
        cfg, per = self.cfg, self.micro_prompts(accum)
        first = b * cfg.prompts_per_step
        order = self.split.train_rows(np.arange(first, first + cfg.prompts_per_step), cfg.seed)
        out, stats = [], {k: 0.0 for k in self.sums}
        stats.update({"len_max": 0.0, "names": {r.name: [0.0, 0.0] for r in self.rewards}})
        for m in range(accum):
            lo = (m * self.world + self.rank) * per
            positions = range(lo, lo + per)
            indices = [int(order[p]) for p in positions for _ in range(cfg.group_size)]
            seeds = [sample_seed(cfg.seed, b, p, j) for p in positions for j in range(cfg.group_size)]
            out.append(self._micro_batch(indices, seeds, stats))
        if self.prepare is not None:
            self.prepare(out)
        return out, stats

    def _micro_batch(self, indices: list[int], seeds: list[int], stats: dict[str, Any]) -> RolloutBatch:
        """Generate, score, compute advantages, annotate (old / reference log-probs) one micro-batch."""
        cfg, ids = self.cfg, [self.prompts.ids[i] for i in indices]
        if cfg.tools is None:
            done = generate(self.model, ids, seeds, cfg, self.stop_id)
            totals, each = score(self.rewards, *reward_inputs(self.prompts, indices, self.tok, done))
            rows = completion_rows(ids, done, self.stop_id, cfg.mask_truncated)
            lengths = [len(t) + (not cut) for t, cut in zip(done.tokens, done.truncated, strict=True)]
            truncated, generated = done.truncated, [len(t) for t in done.tokens]
        else:
            trajectories = tool_rollouts(self.model, self.prompts, indices, self.tok, seeds, cfg, self.stop_id)
            totals, each = score(self.rewards, *trajectory_inputs(self.prompts, indices, trajectories))
            rows = trajectory_rows(ids, trajectories, cfg.mask_truncated)
            lengths = [sum(t.learn) for t in trajectories]  # the model's own tokens
            truncated, generated = [t.truncated for t in trajectories], [t.generated for t in trajectories]
            stats["tool_rounds"] += sum(t.rounds for t in trajectories)
        rewards = torch.tensor(totals, dtype=torch.float32).view(-1, cfg.group_size)
        adv, std, zero = group_advantages(rewards, cfg.scale_rewards)
        batch = self.batch_type(rows.input_ids, rows.targets, rows.weights, advantages=adv.reshape(-1),
                                scores=rewards.reshape(-1))
        self.annotate(batch)
        stats["reward"] += sum(totals)
        stats["reward_std"] += float(std.sum()) * cfg.group_size  # per sample: a group's std, G times
        stats["frac_reward_zero_std"] += float(zero.sum()) * cfg.group_size
        stats["completion_len"] += sum(lengths)
        stats["truncated_frac"] += sum(truncated)
        stats["tokens"] += sum(generated)
        stats["len_max"] = max(stats["len_max"], max(lengths))
        for name, values in each.items():
            ok = [v for v in values if not math.isnan(v)]
            stats["names"][name][0] += sum(ok)
            stats["names"][name][1] += len(ok)
        return batch

    def _global_stats(self, local: dict[str, Any], rollout_s: float) -> dict[str, float]:
        """Means over all the step's completions (one all-reduce of the sums, one of the maxima)."""
        names = list(local["names"])
        sums = torch.tensor([*(local[k] for k in self.sums), *(v for n in names for v in local["names"][n])],
                            dtype=torch.float64)
        dist.all_reduce_sum(sums)
        peaks = dist.all_reduce_max(torch.tensor([local["len_max"], rollout_s], dtype=torch.float64))
        total = dict(zip(self.sums, sums[:len(self.sums)].tolist(), strict=True))
        n = float(self.cfg.samples)
        out = {k: total[k] / n for k in self.sums if k != "tokens"}
        rest = sums[len(self.sums):].tolist()
        for i, name in enumerate(names):
            value, count = rest[2 * i], rest[2 * i + 1]
            out[f"reward/{name}"] = value / count if count else math.nan
        out["completion_len_max"] = float(peaks[0])
        out["rollout_tokens_per_s"] = total["tokens"] / max(float(peaks[1]), 1e-9)
        return out

    def step_metrics(self, train_s: float) -> dict[str, float]:
        """The rollout statistics of the batch this step trained on, the step's generation time (0 on a
        reused batch) and its training time."""
        return {**self._stats, "rollout_s": self._rollout_s, "train_s": train_s}

    def val_batches(self, device: torch.device | str = "cpu") -> Iterator[EvalChunk]:
        """This rank's evaluation prompts (strided by rank), in chunks of P; the stage generates on the model's
        device, so ``device`` changes nothing here."""
        if self.eval_set is None:
            return
        mine = list(range(self.rank, self.eval_set.n_rows, self.world))
        for lo in range(0, len(mine), self.cfg.prompts_per_step):
            yield EvalChunk(mine[lo:lo + self.cfg.prompts_per_step])
