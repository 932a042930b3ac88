#!/usr/bin/env python3
"""Train a tinylm model on a packed dataset: one loop for every stage.

  python train/run.py --stage pretrain --data data/packed/pretrain --out out/pretrain --model small
  python train/run.py --stage sft --data data/packed/sft --out out/sft --init-from out/pretrain
  torchrun --nproc_per_node 2 train/run.py --stage pretrain ...      (DDP; multi-node: torchrun's flags)
  torchrun --nproc_per_node 8 train/run.py --stage sft --fsdp --optimizer adamw ...   (sharded: FSDP2)
  python train/run.py ... --resume       (continue from the latest checkpoint in --out, exactly)
  python train/run.py --stage dpo --data data/packed/dpo --out out/dpo --init-from out/sft --beta 0.1
  python train/run.py --stage reason --data data/packed/reason --out out/reason --init-from out/sft
  python train/run.py --stage distill --data data/packed/sft --out out/student --model tiny --teacher out/sft
  python train/run.py --stage sft --data data/packed/lora --out out/lora --init-from out/sft --lora-rank 8 --merge
  python train/run.py --stage grpo --prompts data/sample/reasoning/gsm8k_en_think.jsonl --out out/grpo \
      --init-from out/reason --reward gsm8k --reward format@0.5     (RL on the model's own rollouts; no --data)
  python train/run.py --stage ppo --prompts ... --out out/ppo --init-from out/sft --reward ...   (PPO: value head, GAE)

A run folder receives ckpt_<step>.pt (atomic, the last --keep-last kept), metrics.jsonl (one JSON
object per logged step / evaluation), loss.png (when matplotlib is installed) and a copy of the
tokenizer. Pack data first with preprocess/pack.py (or run `bash train.sh`, which does everything).
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
REPO_ROOT = _HERE.parent
# `python train/run.py` puts train/ first on sys.path; replace it by the repo root so `import train...` works
# and train/*.py modules never shadow top-level modules.
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    sys.path[0] = str(REPO_ROOT)
elif str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import contextlib  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.chat_families import trained_family  # noqa: E402
from core.errors import TinyLMError, run_main, say_line  # noqa: E402
from core.files import FolderLock, refuse_inputs  # noqa: E402
from core.tokenizer import file_fingerprint, load_tokenizer  # noqa: E402
from model import ModelConfig, TinyLM  # noqa: E402
from train import checkpoint, config, dist, loading  # noqa: E402
from train.batches import Batches  # noqa: E402
from train.checkpoint import Checkpoint, DataRecord, TokenizerRecord  # noqa: E402
from train.config import RunConfig, loop_config, model_config  # noqa: E402
from train.data import PackedDataset, Split  # noqa: E402
from train.loop import LoopConfig, TrainingStopped, TrainState, train  # noqa: E402
from train.memory import return_freed_memory  # noqa: E402
from train.metrics import MetricsLogger, plot_losses, token_byte_lengths  # noqa: E402
from train.options import UsageError  # noqa: E402
from train.resume import Sources, resolve, supersede  # noqa: E402
from train.samples import Sampler, make_sampler  # noqa: E402
from train.stages import STAGES, Stage, StageContext  # noqa: E402
from train.stages.rl import RLOptions  # noqa: E402
from train.weights import load_model_state  # noqa: E402
from train.weights_policy import FullWeights, weights_for  # noqa: E402

__all__ = ["loop_config", "main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """The run configuration of ``argv`` (``train/config.py``); ``--help`` prints this module's docstring."""
    return config.parse_args(argv, description=__doc__)


def default_val_rows(n_rows: int) -> int:
    return min(64, n_rows * 5 // 100)


@dataclass
class Plan:
    """Everything the loop needs, built."""

    model: TinyLM
    weights: FullWeights
    loader: Batches
    loop: LoopConfig
    logger: MetricsLogger
    template: Checkpoint


# ---- run = open the data -> resolve the sources -> build -> train -> report --------------------------------------

def run(cfg: RunConfig, info: dist.DistInfo) -> None:
    """Open the data, then inside the locked run folder: resolve the source checkpoints, build the model and
    everything around it, train, report."""
    say = print if info.is_main else (lambda *a, **k: None)
    stage: Stage = STAGES[cfg.run.stage](options=cfg.stage)
    inputs = [(f"--{k.replace('_', '-')}", getattr(cfg.run, k, None) or getattr(cfg.stage, k, None))
              for k in ("data", "prompts", "eval_prompts", "init_from", "ref_from", "teacher")]
    refuse_inputs(cfg.run.out, inputs, folder=True)  # a run folder never holds or replaces what it reads
    dataset = open_data(cfg, stage, say)
    with locked_run_folder(cfg.run.out, info):
        sources = resolve(cfg, dataset, say)
        dist.barrier()  # every rank chose its checkpoint before rank 0 moves superseded ones
        if stage.rollouts:
            stage.attach_source(dataset, sources.resume or sources.init)
        plan = build(cfg, info, stage, dataset, sources, say)
        started = time.perf_counter()
        state = train(plan.model, stage, plan.weights, plan.loader, plan.loop, info, cfg.run.out, plan.logger,
                      plan.template, sources.resume, sampler_for(cfg, stage, dataset.meta, info))
        plan.logger.close()
        if info.is_main:
            report(cfg, state, time.perf_counter() - started, plan.logger, say)


def sampler_for(cfg: RunConfig, stage: Stage, meta: dict, info: dist.DistInfo) -> Sampler | None:
    """``--sample-every``'s answers (train/samples.py), rendered with the data's tokenizer and chat family."""
    if not cfg.logging.sample_every or not info.is_main:
        return None
    tok = load_tokenizer(meta["tokenizer"]["path"], trained_family(meta.get("chat_template")))
    return make_sampler(tok, chat=stage.name != "pretrain")


def open_data(cfg: RunConfig, stage: Stage, say: Callable[..., None]) -> PackedDataset:
    """The packed dataset, every shard checked; a dataset without a single training row is refused."""
    started = time.perf_counter()
    data, verify = cfg.run.data, not cfg.run.no_verify
    if stage.rollouts:
        prompts = stage.open_dataset(str(cfg.run.prompts))
        say(f"prompts: {cfg.run.prompts}: {prompts.n_rows:,} read in {time.perf_counter() - started:.2f} s")
        return prompts
    dataset = stage.open_dataset(str(data), verify=verify)
    checked = "sizes, counts, token ids" + (", sha256" if verify else "")
    say(f"data: {data}: {len(dataset.shards)} shard(s) checked ({checked}) in "
        f"{time.perf_counter() - started:.2f} s")
    if dataset.n_rows == 0:
        raise UsageError(f"{data}: no training rows (seq_len {dataset.seq_len}, "
                         f"{sum(len(s.tokens) for s in dataset.shards):,} tokens); re-pack with more data or a smaller "
                         "--seq-len")
    return dataset


def build(cfg: RunConfig, info: dist.DistInfo, stage: Stage, dataset: PackedDataset, sources: Sources,
          say: Callable[..., None]) -> Plan:
    """The model (initial or resumed weights, adapters inserted), the stage's setup, the batches, the loop
    config, the logger and the run's checkpoint records; prints the run's summary."""
    meta, resume, run_o = dataset.meta, sources.resume, cfg.run
    batch_size, grad_accum = cfg.optim.batch_size, cfg.optim.grad_accum
    model_cfg = resume.model_config if resume is not None else model_config(cfg, meta["tokenizer"]["vocab_size"],
                                                                            sources.init)
    check_fits(model_cfg, dataset)
    seed_everything(run_o.seed)  # identical initial weights on every rank
    model = TinyLM(model_cfg)
    start = sources.base or sources.init
    if start is not None:
        load_model_state(model, start.model, start.path)
    weights = weights_for(cfg.model.lora)
    model = weights.apply(model)
    model.activation_checkpointing = cfg.hardware.activation_checkpointing
    if resume is not None:
        weights.load_state(model, resume.model, resume.path)
    stage.setup(StageContext(dataset, info.device, info.rank, info.world, batch_size, sources.init, resume, say,
                             dist.barrier, moe=model_cfg.is_moe, model=model))
    seed_everything(run_o.seed + 1000 * info.rank)  # per-rank streams (dropout); restored on resume

    val_rows = cfg.logging.val_rows
    val_rows = 0 if stage.rollouts else default_val_rows(dataset.n_rows) if val_rows is None else val_rows
    if val_rows >= dataset.n_rows:
        raise UsageError(f"--val-rows {val_rows}: {run_o.data} has only {dataset.n_rows} rows")
    split = Split(dataset, val_rows)
    loader = stage.loader(split, batch_size, info.rank, info.world, run_o.seed, info.device.type == "cuda")
    if stage.rollouts:
        check_rollout_layout(loader.cfg.prompts_per_step, grad_accum, info.world)
    if val_rows and cfg.logging.eval_every:
        stage.byte_lengths = byte_table(meta, model_cfg.vocab_size, quiet=not info.is_main)
    loop = loop_config(cfg, stage, info.device, resume)
    wandb = cfg.logging.wandb
    logger = MetricsLogger(run_o.out, enabled=info.is_main, tensorboard=cfg.logging.tensorboard,
                           wandb={"project": wandb, "name": run_o.out.name, "config": cfg.record} if wandb else None)
    if info.is_main:
        if sources.superseded:
            supersede(run_o.out, sources.superseded, resume.training.schedule["max_steps"], say)
        logger.truncate_after(resume.step if resume is not None else 0)
        loading.copy_tokenizer(Path(meta["tokenizer"]["path"]).parent, run_o.out)
    dist.barrier()
    data = DataRecord(str(run_o.source), dataset.stage, dataset.seq_len, dataset.n_rows, val_rows,
                      loader.global_batch(grad_accum))
    template = run_record(cfg, model_cfg, stage, meta, data, sources)
    say_summary(cfg, info, stage, model, weights, sources, data, split.n_train, loop, say)
    return Plan(model, weights, loader, loop, logger, template)


def check_rollout_layout(prompts_per_step: int, grad_accum: int, world: int) -> None:
    """Each of the step's accum x world micro-batches holds whole groups of at least one prompt."""
    if prompts_per_step % (grad_accum * world):
        raise UsageError(f"--prompts-per-step {prompts_per_step} must be a multiple of --grad-accum {grad_accum} x "
                         f"{world} process(es): every micro-batch holds whole groups")


def check_fits(cfg: ModelConfig, dataset: PackedDataset) -> None:
    vocab = dataset.meta["tokenizer"]["vocab_size"]
    if cfg.vocab_size < vocab:
        raise UsageError(f"model vocab_size {cfg.vocab_size} < the dataset tokenizer's {vocab}")
    if dataset.seq_len > cfg.max_position_embeddings:
        raise UsageError(f"dataset seq_len {dataset.seq_len} > model max_position_embeddings "
                         f"{cfg.max_position_embeddings} (--model-arg max_position_embeddings=...)")


def run_record(cfg: RunConfig, model_cfg: ModelConfig, stage: Stage, meta: dict, data: DataRecord,
               sources: Sources) -> Checkpoint:
    """The records every checkpoint of the run repeats (the loop adds weights, counters and resume state)."""
    tok = meta["tokenizer"]
    resume, init, base = sources.resume, sources.init, sources.base
    if resume is not None:
        init_from, base_record = resume.init_from, resume.base
    else:
        init_from = checkpoint.SourceRecord(init.path, init.step, init.stage) if init is not None else None
        base_record = base.source_record() if base is not None else None
    return Checkpoint(model={}, model_config=model_cfg, stage=stage.name,
                      tokenizer=TokenizerRecord(tok["fingerprint"], tok["path"], tok["vocab_size"],
                                                tok.get("special_ids", {}), meta.get("chat_template")),
                      data=data, args=dict(cfg.record), lora=cfg.model.lora, base=base_record, init_from=init_from,
                      **stage.checkpoint_fields())


def say_summary(cfg: RunConfig, info: dist.DistInfo, stage: Stage, model: TinyLM, weights: FullWeights,
                sources: Sources, data: DataRecord, n_train: int, loop: LoopConfig, say: Callable[..., None]) -> None:
    lora, max_steps, accum = cfg.model.lora, cfg.optim.max_steps, cfg.optim.grad_accum
    say(f"== {stage.name}: {cfg.run.source} -> {cfg.run.out}")
    say(model.summary(data.seq_len))
    if lora is not None:
        n_adapter = sum(p.numel() for _, p in weights.trainable(model))
        say(f"lora: rank {lora.rank}, alpha {lora.alpha:g} on {','.join(lora.targets)}: "
            f"{n_adapter:,} trainable params ({100 * n_adapter / model.num_params():.2f}%), base "
            f"{sources.base.path} frozen")
    if isinstance(cfg.stage, RLOptions):
        group = cfg.stage.group_size
        say(f"prompts: {data.rows:,}; {data.global_batch // group} prompts x {group} samples = {data.global_batch} "
            f"completions/step in {accum} micro-batch(es) x {info.world} proc; rows up to {data.seq_len} "
            f"tokens; {max_steps} steps = {max_steps * data.global_batch / group / max(n_train, 1):.2f} epochs over "
            "the prompts")
    else:
        say(f"data: {data.rows:,} rows x {data.seq_len} ({n_train:,} train, {data.val_rows} val); global batch "
            f"{data.global_batch} rows = {cfg.optim.batch_size} x {accum} accum x {info.world} proc; "
            f"{data.global_batch * data.seq_len:,} tokens/step; {max_steps} steps = "
            f"{max_steps * data.global_batch / max(n_train, 1):.2f} epochs")
    optim = loop.optim
    say(f"device {info.device} | dtype {loop.dtype} | compile {loop.compile} | lr {optim.lr:g} -> {loop.min_lr:g}, "
        f"warmup {loop.warmup_steps} | seed {cfg.run.seed}")
    muon = f" (hidden matrices; lr {optim.muon_lr:g}, momentum {optim.muon_momentum:g}) + adamw" \
        if optim.name == "muon" else ""
    lora_note = " (LoRA adapters: AdamW)" if lora is not None and cfg.optim.optimizer == "muon" else ""
    wsd = f", decay over the last {loop.decay_frac:g}" if loop.schedule == "wsd" else ""
    say(f"optimizer {optim.name}{muon}{lora_note} | schedule {loop.schedule}{wsd}")
    if cfg.hardware.fsdp:
        say(f"fsdp: each of {info.world} processes holds 1/{info.world} of the weights, gradients and AdamW states "
            "(FSDP2, block by block); checkpoints are gathered on rank 0")
    if cfg.hardware.activation_checkpointing:
        say("activation checkpointing: each block's activations are recomputed in backward"
            + ("; freed memory goes back to the OS (--no-release-memory to keep glibc's heap)"
               if cfg.hardware.returns_memory else ""))
    source = sources.resume or sources.init
    if source is not None:
        what = "resuming" if sources.resume is not None else "initialised from"
        say(f"{what} {source.path} (step {source.step})")


def report(cfg: RunConfig, state: TrainState, took: float, logger: MetricsLogger, say: Callable[..., None]) -> None:
    """The closing lines (last loss and validation metrics, files written); ``--merge`` folds the adapter."""
    out = cfg.run.out
    last_loss = next((r["loss"] for r in reversed(state.history) if "loss" in r), None)
    last_val = next((r for r in reversed(state.history) if "val_loss" in r), None)
    plot = plot_losses(out)
    say(f"done: step {state.step}/{cfg.optim.max_steps} in {took:.1f} s"
        + (f" | loss {last_loss:.4f}" if last_loss is not None else "")
        + (f" | val_loss {last_val['val_loss']:.4f}" if last_val else "")
        + "".join(f" | {k} {v:.4f}" for k, v in (last_val or {}).items()
                  if k.startswith("val_") and k != "val_loss" and isinstance(v, float)))
    found = checkpoint.latest(out)
    say(f"checkpoint {found}" if found else "no checkpoint written")
    say(f"metrics    {logger.path}")
    say(f"plot       {plot}" if plot else "plot       skipped (pip install matplotlib for loss.png)")
    if cfg.model.merge and found is not None:
        say(f"merged     {loading.merge_checkpoint(found, out / 'merged')}  (adapter folded into the base)")


def byte_table(meta: dict, vocab_size: int, quiet: bool) -> torch.Tensor | None:
    """Bytes per token id from the tokenizer recorded in the dataset (None, said once, if it is gone)."""
    path = Path(meta["tokenizer"]["path"])
    if file_fingerprint(path) != meta["tokenizer"]["fingerprint"]:
        if not quiet:
            print(f"note: tokenizer {path} (recorded in the dataset) is missing or changed: no val_bpb",
                  file=sys.stderr)
        return None
    return torch.from_numpy(token_byte_lengths(path, vocab_size))


@contextlib.contextmanager
def locked_run_folder(out: Path, info: dist.DistInfo) -> Iterator[None]:
    """Create ``out`` and hold an exclusive flock on it for the run (rank 0; every rank learns whether it got
    it, so all refuse together). A second run into the same folder is refused in one line; the kernel drops
    the lock of a killed run; a run that fails before writing into a folder it created removes it again
    (:class:`core.files.FolderLock`)."""
    lock, error = None, None
    if info.is_main:
        try:
            lock = FolderLock(out, "training run", create="run folder")
            lock.__enter__()
        except TinyLMError as e:
            lock, error = None, str(e)
    error = dist.broadcast_object(error)
    if error is not None:
        raise UsageError(error)
    try:
        yield
    except BaseException as e:
        if lock is not None:
            lock.__exit__(type(e), e, e.__traceback__)
            lock = None
        raise
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def main(argv: list[str] | None = None) -> int:
    """Parse, join the process group, run; every user error (TinyLMError) is one line and exit status 1."""
    try:
        cfg = parse_args(argv)  # argparse errors exit 2 with usage; a stage option conflict is one line
    except TinyLMError as e:
        say_line(f"train/run.py: error: {e}")
        return 1
    if cfg.hardware.returns_memory:
        return_freed_memory()
    info = dist.setup(cfg.hardware.device)
    if cfg.hardware.fsdp and not info.enabled:
        say_line("train/run.py: error: --fsdp shards the model over torchrun's processes: launch with torchrun "
                 "--nproc_per_node N (N >= 2), or drop --fsdp")
        return 1
    agreed: list[TrainingStopped] = []

    def body() -> int | None:
        try:
            return run(cfg, info)
        except TrainingStopped as e:
            if e.agreed:
                agreed.append(e)
            raise

    try:
        code = run_main("train/run.py", body)
        if agreed:  # every rank stops on this error and has printed its line: meet before the first exit,
            dist.barrier()  # which makes torchrun stop the others (a line could be lost otherwise)
        return code
    finally:
        dist.cleanup()


if __name__ == "__main__":
    sys.exit(main())
