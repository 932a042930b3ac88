"""The training loop, for every stage: DDP or FSDP, accumulation, compile, autocast, schedule, clipping,
evaluation, logging and exact checkpoint/resume. The stage (``train/stages/``) supplies the loss, the
weights policy (``train/weights_policy.py``: all weights or LoRA adapters) what trains and what is saved.

One optimizer step s (0-based) on every rank:
  1. take the step's ``accum`` micro-batches (``loader.steps`` from ``samples_seen``, the ``train.batches.Batches``
     protocol: packed rows, or the RL stage's rollouts, generated here with the weights of this moment);
  2. ``N = all_reduce(sum of stage.count(micro-batch))`` once, clamped to >= 1;
  3. for each micro-batch: forward + ``stage.loss(.., StepNorm(N, accum * world))``, backward of
     ``loss * world`` (DDP averages gradients over ranks; the factor makes the result the *sum* of the
     ranks' contributions, i.e. the gradient of the single-process objective), DDP ``no_sync`` on all
     but the last micro-batch (``fsdp``: the model is sharded by ``train/sharding.py`` instead, and each
     micro-batch's gradients are reduce-scattered, averaged the same way, into the ranks' shards);
  4. unscale (fp16), clip the global grad norm; all-reduce the loss sums together with a "this rank's
     grad norm is non-finite" flag (the loop's only host sync of the step reads them), so every rank takes the same
     decision; optimizer step(s) (AdamW, or Muon + AdamW: ``train/optim.py``) at each part's peak LR x the
     schedule's multiplier ``m(s)`` (``train/schedule.py``) unless the loss or the grad norm is non-finite;
     zero grads;
  5. ``step, samples_seen, tokens_seen += 1, global_batch, global_batch * seq_len``; log (with the loader's
     ``step_metrics``: rollout rewards, lengths and the generation / training time split) / eval / save.

Non-finite steps. A nan/inf step loss or global grad norm (under fp16 only the loss: the GradScaler skips
inf gradients itself, which is dynamic loss scaling at work) is never applied to the weights. The run
then stops with :class:`NonFiniteError` (one line: the step, what was non-finite, the last good
checkpoint), unless ``skip_nonfinite`` allows more skipped steps: then the step counts (schedule and
data move on) without an update, and a ``skipped_nonfinite`` line goes to metrics.jsonl. Weights are
checked before every checkpoint, so no checkpoint with nan/inf weights is ever written.

Divergence. A finite loss far above the first step's (:data:`DIVERGENCE_SCALES`) is said once on rank 0
and the run goes on; with ``stop_on_divergence`` every rank (the loss is all-reduced) raises
:class:`DivergenceError` before the step is applied, so the last checkpoint is the one before.

Exact resume: a checkpoint after step s holds the model, optimizer(s), grad scaler, counters
and every rank's RNG states (a WSD run also keeps ``pre_decay.pt``, the checkpoint at its decay start);
the schedule is a pure function of s and the data order a pure function
of ``samples_seen``. So a run resumed from it repeats the uninterrupted run's steps s+1, s+2, ...
(bit-identical on CPU in fp32).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from core.dtypes import canonical as canonical_dtype
from core.errors import TinyLMError
from train import checkpoint, dist, sharding
from train.batches import Batches
from train.checkpoint import Checkpoint, ResumeState
from train.dist import DistInfo
from train.metrics import MetricsLogger, Throughput, format_line, peak_flops
from train.optim import OptimConfig, Optimizers, build_optimizers
from train.schedule import Schedule
from train.stages import Stage, StepNorm
from train.weights import nonfinite_tensors
from train.weights_policy import FullWeights

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainingStopped(TinyLMError):
    """The loop stopped the run; the message names the step and the last good checkpoint. ``agreed``:
    every rank raised it at the same step (an all-reduced decision)."""

    agreed = False


class NonFiniteError(TrainingStopped):
    """Training produced a nan/inf loss, gradient norm or weights."""


@dataclass(frozen=True)
class LoopConfig:
    """The loop's settings, every one given (``train/config.py`` resolves them from flags and defaults)."""

    max_steps: int
    grad_accum: int
    optim: OptimConfig  # the optimizer(s) and their peak LRs (train/optim.py)
    min_lr: float  # the AdamW part's final LR; the Muon LR decays by the same factor
    warmup_steps: int
    schedule: str  # cosine | wsd (train/schedule.py)
    decay_frac: float  # wsd: the decaying fraction of max_steps
    grad_clip: float  # max global grad norm, 0 = off
    dtype: str  # resolved autocast dtype: float32 | bfloat16 | float16
    compile: bool
    eval_every: int
    save_every: int
    keep_last: int
    log_every: int
    stop_after: int | None  # end (with a checkpoint) after this step; the schedule keeps max_steps
    progress: bool  # tqdm bar on rank 0 (shown only on a terminal)
    skip_nonfinite: int  # non-finite steps that may be skipped (no update) before the run stops
    stop_on_divergence: bool  # a diverging loss (Divergence) stops the run instead of a warning
    fsdp: bool = False  # shard weights, gradients and optimizer states over the ranks (train/sharding.py)
    sample_every: int = 0  # log greedy answers to fixed prompts every N steps (train/samples.py); 0 = never

    def lr_schedule(self) -> Schedule:
        return Schedule(self.schedule, self.warmup_steps, self.max_steps, self.min_lr / self.optim.lr,
                        self.decay_frac)


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0  # input positions processed (padding included)
    supervised_seen: int = 0  # positions with loss weight > 0
    nonfinite_skipped: int = 0  # steps whose update was skipped because the loss / grad norm was nan or inf
    history: list[dict[str, Any]] = field(default_factory=list)  # logged records of this process


def resolve_dtype(name: str, device: torch.device) -> str:
    """``auto``: bfloat16 on CUDA when supported, else float16 there; float32 elsewhere (CPUs without
    AVX512-BF16 run bfloat16 autocast slowly); any spelling of ``core/dtypes.py`` -> its full name."""
    if name != "auto":
        full = canonical_dtype(name)
        if full is None:
            raise ValueError(f"unknown dtype {name!r}")
        return full
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[dtype])


def train(model: nn.Module, stage: Stage, weights: FullWeights, loader: Batches, cfg: LoopConfig,
          info: DistInfo, out: Path, logger: MetricsLogger, template: Checkpoint,
          resume: Checkpoint | None = None, sampler: Callable[[nn.Module], list[dict]] | None = None) -> TrainState:
    """Train ``model`` (unwrapped, already holding its initial or resumed weights) to ``cfg.max_steps``.

    ``weights`` says which parameters train and what a checkpoint stores; ``template`` holds the run's
    records (model config, stage, tokenizer, data, sources, args) that every checkpoint repeats;
    ``resume`` is a loaded checkpoint whose optimizer, scaler, counters and RNG are restored.
    """
    device = info.device
    model.to(device)
    model.train()
    for extra in stage.extra_models().values():
        extra.to(device).eval().requires_grad_(False)
    if cfg.fsdp:
        sharding.shard_model(model, cfg.dtype)  # before the optimizer: it holds the shards
    named = list(weights.trainable(model))
    params = [p for _, p in named if p.requires_grad]
    optimizer = build_optimizers(named, cfg.optim, device=device)
    schedule = cfg.lr_schedule()
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")
    state = TrainState() if resume is None else restore(resume, optimizer, scaler, info, model if cfg.fsdp else None)

    fwd = torch.compile(model) if cfg.compile else model
    ddp = None
    if info.enabled and not cfg.fsdp:
        ddp = nn.parallel.DistributedDataParallel(
            fwd, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=stage.find_unused_parameters)
    train_model = ddp if ddp is not None else fwd

    seq_len = loader.seq_len
    global_batch = loader.global_batch(cfg.grad_accum)
    peak = peak_flops(device)
    flops_per_token = model.config.flops_per_token(seq_len) if peak and hasattr(model, "config") else None
    amp = autocast(device, cfg.dtype)
    micro_total = cfg.grad_accum * info.world

    def save() -> None:
        state_dict = sharding.full_model_state(model) if cfg.fsdp else weights.state(model)
        bad = nonfinite_tensors(state_dict)  # same weights on every rank: all ranks stop together
        if cfg.fsdp:
            bad = dist.broadcast_object(bad)  # only rank 0 holds the gathered weights
        if bad:
            raise NonFiniteError(f"step {state.step}: non-finite weights after the update (nan/inf in "
                                 f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); no checkpoint written, "
                                 f"{last_good(out)}")
        rng = dist.gather_objects(dist.rng_state())
        parts = {part: sharding.full_optimizer_state(model, opt) for part, opt in optimizer.parts.items()} \
            if cfg.fsdp else optimizer.state_dict() if info.is_main else {}
        if info.is_main:
            training = ResumeState(parts.get("adamw", {"state": {}, "param_groups": []}), rng,
                                   schedule.state_dict(), scaler.state_dict() if scaler.is_enabled() else None,
                                   world=info.world, optimizer_name=optimizer.name, muon=parts.get("muon"))
            ckpt = dataclasses.replace(template, model=state_dict, step=state.step, samples_seen=state.samples_seen,
                                       tokens_seen=state.tokens_seen, supervised_seen=state.supervised_seen,
                                       nonfinite_skipped=state.nonfinite_skipped, training=training)
            ckpt.save(out, cfg.keep_last)
            if schedule.kind == "wsd" and state.step == schedule.decay_start:
                ckpt.save(out, name=checkpoint.PRE_DECAY)  # kept: a longer run continues from here

    bar = tqdm(total=cfg.max_steps, initial=state.step, desc=stage.name, unit="step", dynamic_ncols=True,
               disable=None if (cfg.progress and info.is_main) else True, file=sys.stderr)
    steps: Iterator = loader.steps(state.samples_seen, cfg.grad_accum)
    supervised_base = state.supervised_seen
    supervised_acc = torch.zeros((), dtype=torch.int64, device=device)  # summed on device: no per-step sync
    speed = Throughput(state.step, state.supervised_seen, flops_per_token, peak * info.world if peak else None)
    end = cfg.max_steps if cfg.stop_after is None else min(cfg.max_steps, cfg.stop_after)
    watch = DivergenceWatch()
    try:
        while state.step < end:
            micro = next(steps)
            fetched = time.perf_counter()
            lrs = optimizer.set_lr(schedule(state.step))
            count = torch.stack([stage.count(b) for b in micro]).sum().to(device, torch.int64)
            dist.all_reduce_sum(count)  # the only collective before the forward passes
            supervised_acc += count
            norm = StepNorm(count.float().clamp(min=1.0), micro_total)
            sums: torch.Tensor | None = None
            names: list[str] = []
            for i, batch in enumerate(micro):
                batch = batch.to(device, non_blocking=True)
                sync = ddp is None or i == len(micro) - 1
                with contextlib.nullcontext() if sync else ddp.no_sync():
                    with amp:
                        loss, parts = stage.loss(train_model, batch, norm)
                    scaler.scale(loss * info.world).backward()
                names = ["loss", *parts]
                vals = torch.stack([loss.detach().float(), *(v.float() for v in parts.values())])
                sums = vals if sums is None else sums + vals
            optimizer.unscale_(scaler)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            grad_norm = sharding.full_tensor(grad_norm)  # FSDP: the norm over every rank's shards
            grad_bad = torch.zeros(1, device=device) if scaler.is_enabled() else (~torch.isfinite(grad_norm)).float()
            reduced = dist.all_reduce_sum(torch.cat([sums, grad_bad.reshape(1).to(sums)]))
            sums = reduced[:-1]
            problem, loss_value = nonfinite_problem(sums[0], reduced[-1], grad_norm)  # the loop's host sync
            if problem is None:
                watch.check(state.step + 1, loss_value, cfg, info, out)
                optimizer.step(scaler)
            scaler.update()
            optimizer.zero_grad()
            if problem is not None:
                skip_or_stop(state, problem, cfg, info, logger, bar, out)

            state.step += 1
            state.samples_seen += global_batch
            state.tokens_seen += global_batch * seq_len
            speed.advance(global_batch * seq_len)
            bar.update(1)
            last = state.step == end

            if problem is None and (state.step % cfg.log_every == 0 or last or speed.is_first_step(state.step)):
                state.supervised_seen = supervised_base + int(supervised_acc.item())
                record = {"step": state.step, **dict(zip(names, sums.tolist(), strict=True)),
                          "lr": lrs.get("adamw", lrs.get("muon")),
                          **({"muon_lr": lrs["muon"]} if "muon" in lrs else {}),
                          "grad_norm": float(grad_norm), **speed.report(state.step, end, state.supervised_seen),
                          "tokens_seen": state.tokens_seen, "supervised_seen": state.supervised_seen,
                          "samples_seen": state.samples_seen,
                          **loader.step_metrics(time.perf_counter() - fetched)}
                if info.is_main:
                    logger.log(record)
                    bar.write(format_line(record, cfg.max_steps, [*names[1:], *loader.shown]))
                state.history.append(record)

            with speed.paused():  # evaluation and saving are not training throughput
                if loader.eval_rows and cfg.eval_every > 0 and (state.step % cfg.eval_every == 0 or last):
                    record = {"step": state.step, **evaluate(fwd, stage, loader, device, amp)}
                    if info.is_main:
                        logger.log(record)
                        bar.write(format_line(record, cfg.max_steps))
                    state.history.append(record)
                if sampler is not None and cfg.sample_every > 0 and (state.step % cfg.sample_every == 0 or last) \
                        and info.is_main:
                    logger.log({"step": state.step, "samples": sampler(model)})
                if (cfg.save_every > 0 and state.step % cfg.save_every == 0) or last or (
                        schedule.kind == "wsd" and state.step == schedule.decay_start):
                    state.supervised_seen = supervised_base + int(supervised_acc.item())
                    save()
    finally:
        steps.close()
        bar.close()
    return state


def restore(resume: Checkpoint, optimizer: Optimizers, scaler: torch.amp.GradScaler, info: DistInfo,
            sharded: nn.Module | None = None) -> TrainState:
    """Optimizer(s), scaler, counters and this rank's RNG streams from a checkpoint (``load(resume=True)``);
    ``sharded``: the FSDP model whose optimizer shards are cut from the checkpoint's full states."""
    training = resume.training  # its optimizer is this run's (train/resume.py checked it)
    states = {"adamw": training.optimizer, "muon": training.muon}
    if sharded is None:
        optimizer.load_state_dict(states)
    else:
        for part, opt in optimizer.parts.items():
            sharding.load_optimizer_state(sharded, opt, states[part])
    if training.scaler:
        scaler.load_state_dict(training.scaler)
    rngs = training.rng
    if len(rngs) != info.world and info.is_main:
        print(f"note: checkpoint written by {len(rngs)} process(es), resuming on {info.world}: "
              "random streams (dropout) differ from an uninterrupted run", file=sys.stderr)
    dist.set_rng_state(rngs[info.rank] if info.rank < len(rngs) else rngs[0])
    return TrainState(resume.step, resume.samples_seen, resume.tokens_seen, resume.supervised_seen,
                      nonfinite_skipped=resume.nonfinite_skipped)


def last_good(out: Path) -> str:
    found = checkpoint.latest(out)
    return f"the last good checkpoint is {found}" if found else "no checkpoint was written yet"


def skip_or_stop(state: TrainState, problem: str, cfg: LoopConfig, info: DistInfo, logger: MetricsLogger,
                 bar: tqdm, out: Path) -> None:
    """A non-finite step (its update was not applied): count it, log it, and stop once more than
    ``cfg.skip_nonfinite`` were skipped (NonFiniteError naming the last good checkpoint)."""
    state.nonfinite_skipped += 1
    stop = state.nonfinite_skipped > cfg.skip_nonfinite
    record = {"step": state.step + 1, "skipped_nonfinite": state.nonfinite_skipped, "nonfinite": problem,
              **({"stopped": True} if stop else {})}
    if info.is_main:
        logger.log(record)
    if stop:
        allowed = f" ({cfg.skip_nonfinite} skip(s) allowed, all used)" if cfg.skip_nonfinite else ""
        error = NonFiniteError(
            f"step {state.step + 1}: non-finite {problem}; the update was not applied{allowed}; "
            f"{last_good(out)} (resume from it with --resume, e.g. with a lower --lr, or let up to N "
            "such steps be skipped with --skip-nonfinite N)")
        error.agreed = True  # the flag was all-reduced: every rank stops here (train/run.py main meets them)
        raise error
    if info.is_main:
        bar.write(f"step {state.step + 1}: non-finite {problem}: update skipped "
                  f"({state.nonfinite_skipped}/{cfg.skip_nonfinite} allowed)")


def nonfinite_problem(loss: torch.Tensor, bad_ranks: torch.Tensor,
                      grad_norm: torch.Tensor) -> tuple[str | None, float]:
    """What was non-finite this step ("loss nan", "gradient norm inf", both) or None, and the step loss
    (reads the values: the loop's only host sync of the step)."""
    loss_v, bad_v, norm_v = torch.stack([loss.float(), bad_ranks.float(), grad_norm.float()]).tolist()
    parts = []
    if not math.isfinite(loss_v):
        parts.append(f"loss ({loss_v})")
    if bad_v > 0:
        parts.append(f"gradient norm ({norm_v if not math.isfinite(norm_v) else 'on another rank'})")
    return " and ".join(parts) or None, loss_v


# "Far above its start": more than 3 x max(|start|, 1) above the first step's loss, i.e. 4x a cross-entropy
# start (>= 1 nat) and +3 nats for losses near or under 1 (DPO, RL); noise stays well inside that, while a
# far too high LR leaves it within a few steps.
DIVERGENCE_SCALES = 3.0


class DivergenceError(TrainingStopped):
    """The loss rose far above its start and ``--stop-on-divergence`` was given (the step was not applied)."""


@dataclass
class DivergenceWatch:
    """Compares each step's loss (all-reduced: the same on every rank) with the first step's of this run."""

    start: float | None = None
    start_step: int = 0
    warned: bool = False

    def check(self, step: int, loss: float, cfg: LoopConfig, info: DistInfo, out: Path) -> None:
        """Warn once (rank 0), or raise :class:`DivergenceError` on every rank with ``stop_on_divergence``."""
        if self.start is None:
            self.start, self.start_step = loss, step
            return
        if loss - self.start <= DIVERGENCE_SCALES * max(abs(self.start), 1.0):
            return
        what = (f"step {step}: the loss diverged: {loss:.4g}, against {self.start:.4g} at step {self.start_step} "
                f"(more than {DIVERGENCE_SCALES:g} x max(|start|, 1) above it)")
        if cfg.stop_on_divergence:
            error = DivergenceError(f"{what}; the update was not applied; {last_good(out)} (resume from it with "
                                    "--resume and a lower --lr)")
            error.agreed = True  # the loss is all-reduced: every rank stops at this step
            raise error
        if not self.warned and info.is_main:
            tqdm.write(f"warning: {what}; training goes on (a lower --lr may help; --stop-on-divergence stops "
                       "such a run)", file=sys.stderr)
        self.warned = True


@torch.no_grad()
def evaluate(model: nn.Module, stage: Stage, loader: Batches, device: torch.device,
             amp: contextlib.AbstractContextManager) -> dict[str, float]:
    """The stage's validation metrics over the whole validation split (sums all-reduced over ranks)."""
    was_training = model.training
    model.eval()
    totals: dict[str, torch.Tensor] = {}
    acc = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    for batch in loader.val_batches(device):
        with amp:
            sums = stage.eval_sums(model, batch)
        for k, v in sums.items():
            totals[k] = totals[k] + v.to(acc) if k in totals else v.to(acc)
    keys = sorted(totals)
    packed = dist.all_reduce_sum(torch.stack([totals[k] for k in keys])) if keys else torch.zeros(0)
    model.train(was_training)
    return stage.eval_metrics(dict(zip(keys, packed.tolist(), strict=True)))
