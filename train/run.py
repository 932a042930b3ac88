#!/usr/bin/env python3
"""Train a tinylm model on a packed dataset: one loop for every stage.

  python train/run.py --stage pretrain --data data/packed/pretrain --out out/pretrain --model small
  python train/run.py --stage sft --data data/packed/sft --out out/sft --init-from out/pretrain
  torchrun --nproc_per_node 2 train/run.py --stage pretrain ...      (DDP; multi-node: torchrun's flags)
  python train/run.py ... --resume       (continue from the latest checkpoint in --out, exactly)
  python train/run.py --stage dpo --data data/packed/dpo --out out/dpo --init-from out/sft --beta 0.1
  python train/run.py --stage reason --data data/packed/reason --out out/reason --init-from out/sft
  python train/run.py --stage distill --data data/packed/sft --out out/student --model tiny --teacher out/sft
  python train/run.py --stage sft --data data/packed/lora --out out/lora --init-from out/sft --lora-rank 8 --merge
  python train/run.py --stage grpo --prompts data/sample/reasoning/gsm8k_en_think.jsonl --out out/grpo \
      --init-from out/reason --reward gsm8k --reward format@0.5     (RL on the model's own rollouts; no --data)

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

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.errors import TinyLMError, run_main  # noqa: E402
from core.files import FolderLock, make_dir, refuse_inputs  # noqa: E402
from core.tokenizer import file_fingerprint  # noqa: E402
from model import ModelConfig, TinyLM  # noqa: E402
from model.lora import ALL_TARGETS, LoRAConfig  # noqa: E402
from train import checkpoint, defaults, dist  # noqa: E402
from train.adapters import FullWeights, weights_for  # noqa: E402
from train.checkpoint import (  # noqa: E402
    Checkpoint,
    CheckpointError,
    DataRecord,
    SourceOptions,
    SourceRecord,
    TokenizerRecord,
)
from train.data import PackedDataset, Split  # noqa: E402
from train.loop import LoopConfig, NonFiniteError, TrainState, resolve_dtype, train  # noqa: E402
from train.memory import return_freed_memory  # noqa: E402
from train.metrics import MetricsLogger, plot_losses, token_byte_lengths  # noqa: E402
from train.optim import OPTIMIZERS  # noqa: E402
from train.rollout import ROLLOUT_DTYPES  # noqa: E402
from train.schedule import KINDS, Schedule, recorded_kind  # noqa: E402
from train.stages import STAGES, Stage, StageContext, build_stage  # noqa: E402

DEFAULT_MODEL = "small"
# stage-specific flags (argparse dests) -> the stages that take them (Stage.options); LoRA flags fit every stage
STAGE_FLAGS = {"beta": "--beta", "online_ref": "--online-ref", "ref_from": "--ref-from", "teacher": "--teacher",
               "alpha": "--alpha", "temperature": "--temperature"}
RL_FLAGS = ("reward", "group_size", "prompts_per_step", "max_new_tokens", "rollout_temperature", "rollout_top_k",
            "loss", "rollout_reuse", "epsilon", "epsilon_high", "kl_coef", "scale_rewards", "mask_truncated",
            "eval_prompts", "pass_k", "success_threshold", "rollout_dtype")
STAGE_FLAGS.update({dest: "--" + dest.replace("_", "-") for dest in RL_FLAGS})
LORA_FLAGS = {"lora_alpha": "--lora-alpha", "lora_targets": "--lora-targets", "merge": "--merge"}


class UsageError(TinyLMError):
    """A problem with the command line or the inputs: printed as one line, exit status 1."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="defaults by stage x optimizer x preset (train/defaults.py; train.sh reads the "
                                       "same table; preset '*' is any other --model):\n" + defaults.table_text())
    g = p.add_argument_group("run")
    g.add_argument("--stage", required=True, choices=sorted(STAGES),
                   help="pretrain: next-token loss on document windows; sft: loss on assistant tokens of "
                        "packed conversations; reason: sft on <think>/<answer> data, tag tokens up-weighted by the "
                        "mask; dpo: preference loss on (chosen, rejected) pairs; distill: CE + KL to a --teacher; "
                        "grpo: RL on the model's own rollouts of --prompts, scored by --reward functions")
    g.add_argument("--data", type=Path, metavar="DIR",
                   help="packed dataset folder (preprocess/pack.py --stage STAGE --out DIR); every stage but grpo")
    g.add_argument("--prompts", type=Path, metavar="FILE.jsonl",
                   help="--stage grpo: prompt records ({conversations: [...]} ending with a user turn, or any "
                        "chat / reasoning record: a final assistant turn becomes the 'reference' column)")
    g.add_argument("--out", required=True, type=Path, metavar="DIR", help="run folder (checkpoints, metrics)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out (starts fresh if there is none)")
    g.add_argument("--init-from", type=Path, metavar="CKPT",
                   help="start from this checkpoint's weights and model config (a file, or a run folder: its "
                        "latest checkpoint), e.g. SFT from the pretrain run; or a transformers folder (Llama, "
                        "Qwen3), or a MiniMind .pth state dict whose shape --model / --model-arg give")
    g.add_argument("--seed", type=int, default=1337, help="model init and data order seed (default 1337)")
    g.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of every shard file when the dataset is opened (sizes, headers, "
                        "counts and token ids are still checked)")

    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PRESET",
                   help="preset: tiny (0.5M), tiny-moe, small (26M, default), small-moe, base (104M); with "
                        "--init-from / --resume the checkpoint's config is used instead")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override a ModelConfig field, repeatable (e.g. num_hidden_layers=4, dropout=0.1); "
                        "also applied on top of an --init-from config")

    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=200, metavar="N", help="optimizer steps (default 200)")
    g.add_argument("--stop-after", type=int, metavar="N",
                   help="end after step N (with a checkpoint) while keeping the --max-steps schedule, e.g. for "
                        "time-sliced jobs; continue later with --resume")
    g.add_argument("--batch-size", type=int, default=8, metavar="B", help="micro-batch rows per process (default 8)")
    g.add_argument("--grad-accum", type=int, default=2, metavar="A",
                   help="micro-batches per step; global batch = B x A x processes rows (default 2)")
    g.add_argument("--lr", type=float, help="peak learning rate of AdamW (under --optimizer muon: of the AdamW part) "
                   "(default: the table below)")
    g.add_argument("--min-lr", type=float, help="final learning rate of the decay (default lr / 10; the Muon LR "
                   "decays by the same factor)")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: the table's share of "
                   "--max-steps; a resumed run keeps its own)")
    g.add_argument("--weight-decay", type=float, help="AdamW decay of matrices (default: the table below)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm, 0 = off (default 1.0)")
    g.add_argument("--skip-nonfinite", type=int, default=0, metavar="N",
                   help="a nan/inf loss or gradient norm stops the run at once (default); allow up to N such steps "
                        "to be skipped instead (no update, counted in metrics.jsonl), then stop")

    g = p.add_argument_group("optimizer and schedule (defaults: the table below; a resumed run keeps its own)")
    g.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="adamw: AdamW on every weight; muon: torch.optim.Muon on the hidden matrices (attention, "
                        "MLP), AdamW on embeddings, head, norms, biases, router (LoRA adapters: always AdamW)")
    g.add_argument("--muon-lr", type=float, metavar="LR", help="Muon peak learning rate (default: the table below)")
    g.add_argument("--muon-momentum", type=float, metavar="M",
                   help="Muon (Nesterov) momentum (default: the table below)")
    g.add_argument("--muon-weight-decay", type=float, metavar="WD",
                   help="Muon decoupled weight decay (default: the table below)")
    g.add_argument("--schedule", choices=KINDS,
                   help=f"cosine: warmup then cosine decay to --min-lr; wsd: warmup, stable, then linear decay over "
                        f"the last --decay-frac of the steps; --resume --max-steps N (larger) extends a WSD run "
                        f"from {checkpoint.PRE_DECAY}, its checkpoint where the decay began, without a second "
                        f"warmup (default {defaults.SCHEDULE})")
    g.add_argument("--decay-frac", type=float, metavar="F", help="wsd: fraction of --max-steps that decays (default "
                   "0.2)")

    g = p.add_argument_group("dpo (--stage dpo)")
    g.add_argument("--beta", type=float, metavar="B",
                   help="DPO temperature: loss -log sigmoid(B * ((pi_c - ref_c) - (pi_r - ref_r))) (default 0.1)")
    g.add_argument("--ref-from", type=Path, metavar="CKPT",
                   help="reference model (default: the --init-from checkpoint); its log-probs are computed once into "
                        "DATA/ref_<fingerprint>/ and reused by later runs")
    g.add_argument("--online-ref", action="store_true", help="score every batch with the frozen reference model "
                   "kept in memory instead of stored log-probs (same loss, more memory and compute)")
    g = p.add_argument_group("distillation (--stage distill)")
    g.add_argument("--teacher", type=Path, metavar="CKPT",
                   help="frozen teacher checkpoint or run folder (any size, same tokenizer)")
    g.add_argument("--alpha", type=float, metavar="A",
                   help="loss = A * CE + (1 - A) * T^2 * KL(teacher || student) (default 0.5)")
    g.add_argument("--temperature", type=float, metavar="T", help="softmax temperature of the KL term (default 2.0)")
    add_rl_arguments(p)
    g = p.add_argument_group("LoRA (any stage)")
    g.add_argument("--lora-rank", type=int, metavar="R",
                   help="train rank-R adapters on a frozen --init-from base instead of all weights; checkpoints "
                        "then hold only the adapter (and name the base)")
    g.add_argument("--lora-alpha", type=float, metavar="ALPHA",
                   help="adapter scaling ALPHA / R (default ALPHA = R, i.e. scaling 1)")
    g.add_argument("--lora-targets", metavar="NAMES",
                   help=f"comma-separated projections to adapt (default all: {','.join(ALL_TARGETS)})")
    g.add_argument("--merge", action="store_true",
                   help="after training, fold the adapter into the base: a dense checkpoint in OUT/merged "
                        "(same as bin/merge --ckpt OUT --out OUT/merged)")

    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK, else mps, else cpu), cpu, cuda, ...")
    g.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast dtype; auto = bf16 on CUDA (fp16 + GradScaler if bf16 is unsupported), fp32 "
                        "on CPU (bf16 autocast is ~40x slower on CPUs without AVX512-BF16)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off for CPU: ~40 s compile, 2-5%% gain)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="keep only each block's input for backward and recompute the block there: much less "
                        "memory for ~1/3 more compute; same loss and gradients (any stage, LoRA, DDP, compile)")
    g.add_argument("--release-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="glibc: serve allocations >= 1 MiB by mmap so freed activations go back to the OS at once "
                        "(small 16x512 SFT step with --activation-checkpointing: peak RSS 2.25 -> 1.22 GB; costs "
                        "page faults, ~1.3x the step time); default: on with --activation-checkpointing (both "
                        "trade time for memory), off otherwise")

    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval-every", type=int, default=100, metavar="N",
                   help="validation loss and bits-per-byte every N steps and at the end; 0 = never (default 100)")
    g.add_argument("--val-rows", type=int, metavar="R",
                   help="rows held out for validation (default min(64, 5%% of rows); 0 = none)")
    g.add_argument("--save-every", type=int, default=100, metavar="N",
                   help="checkpoint every N steps (and always at the end); 0 = only at the end (default 100)")
    g.add_argument("--keep-last", type=int, default=2, metavar="K", help="checkpoints kept, 0 = all (default 2)")
    g.add_argument("--log-every", type=int, default=10, metavar="N", help="metrics line every N steps (default 10)")
    g.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard (needs tensorboard)")
    g.add_argument("--wandb", nargs="?", const="tinylm", metavar="PROJECT",
                   help="also log to Weights & Biases project PROJECT (default tinylm; needs wandb)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    for name in ("max_steps", "batch_size", "grad_accum", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("eval_every", "save_every", "keep_last", "skip_nonfinite"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    for name, low, strict in (("lr", 0.0, True), ("min_lr", 0.0, False), ("weight_decay", 0.0, False),
                              ("grad_clip", 0.0, False), ("muon_lr", 0.0, True), ("muon_momentum", 0.0, False),
                              ("muon_weight_decay", 0.0, False), ("decay_frac", 0.0, True)):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and (value > low if strict else value >= low)):
            p.error(f"--{name.replace('_', '-')} must be a finite number {'>' if strict else '>='} {low:g}, "
                    f"not {value}")
    rollouts = STAGES[args.stage].rollouts
    if rollouts and (args.prompts is None or args.data is not None):
        p.error(f"--stage {args.stage} trains on rollouts of --prompts FILE.jsonl (and takes no --data)")
    if not rollouts and (args.data is None or args.prompts is not None):
        p.error(f"--stage {args.stage} reads --data DIR (--prompts is for --stage grpo)")
    reuse = args.rollout_reuse or 1
    for name in ("save_every", "stop_after"):
        if getattr(args, name) is not None and getattr(args, name) % reuse:
            p.error(f"--{name.replace('_', '-')} must be a multiple of --rollout-reuse {reuse} (a checkpoint "
                    "between two reuses of one rollout batch could not be resumed exactly)")
    for name, high in (("muon_momentum", 1.0), ("decay_frac", 1.0)):
        value = getattr(args, name)
        if value is not None and value > high:
            p.error(f"--{name.replace('_', '-')} must be <= {high:g}, not {value}")
    takes = STAGES[args.stage].options
    for dest, flag in STAGE_FLAGS.items():
        if getattr(args, dest) not in (None, False) and dest not in takes:
            users = [name for name, cls in STAGES.items() if dest in cls.options]
            p.error(f"{flag} applies to --stage {' / '.join(users)} only, not --stage {args.stage}")
    if args.lora_rank is None:
        for dest, flag in LORA_FLAGS.items():
            if getattr(args, dest) not in (None, False):
                p.error(f"{flag} needs --lora-rank")
    elif args.lora_rank < 1:
        p.error("--lora-rank must be >= 1")
    try:
        args.lora = lora_config(args)
    except ValueError as e:
        p.error(str(e))
    return args


def add_rl_arguments(p: argparse.ArgumentParser) -> None:
    """The --stage grpo flags (defaults: ``train.stages.grpo.DEFAULTS``; None here = not given)."""
    g = p.add_argument_group("reinforcement learning (--stage grpo: --prompts, no --data)")
    g.add_argument("--reward", action="append", metavar="SPEC[@W]",
                   help="reward function, repeatable (weights sum): gsm8k, format, length, module:function or "
                        "path/to/file.py:function in TRL's convention f(prompts, completions, **columns)")
    g.add_argument("--group-size", type=int, metavar="G", help="samples per prompt (default 8)")
    g.add_argument("--prompts-per-step", type=int, metavar="P",
                   help="prompts per optimizer step, all ranks (default 8); a multiple of --grad-accum x processes")
    g.add_argument("--max-new-tokens", type=int, metavar="N", help="completion length limit (default 256)")
    g.add_argument("--rollout-temperature", type=float, metavar="T", help="sampling temperature (default 1.0)")
    g.add_argument("--rollout-top-k", type=int, metavar="K", help="sample from the K most likely tokens only")
    g.add_argument("--rollout-dtype", choices=tuple(ROLLOUT_DTYPES),
                   help="precision of the rollouts' decode matmuls: float32 (the model's, default) or bfloat16 "
                        "(AMX / AVX512-BF16 CPUs and GPUs: ~2x faster on CPU; tokens of a bf16-rounded policy, "
                        "while log-probs and the loss stay float32)")
    g.add_argument("--loss", choices=("dapo", "dr_grpo", "grpo", "cispo"),
                   help="dapo: token-level over the step (default); grpo: per-sequence mean; dr_grpo: / (S x "
                        "max-new-tokens); cispo: clipped IS weight (detached) x log-prob")
    g.add_argument("--rollout-reuse", type=int, metavar="K", help="optimizer steps per batch of rollouts (default 1)")
    g.add_argument("--epsilon", type=float, help="clip range low: ratio >= 1 - eps (default 0.2)")
    g.add_argument("--epsilon-high", type=float, help="clip range high: ratio <= 1 + eps_high (default --epsilon)")
    g.add_argument("--kl-coef", type=float, help="k3 KL to the frozen --init-from model (default 0: not loaded)")
    g.add_argument("--scale-rewards", choices=("group", "none"),
                   help="divide advantages by the group's reward std (group, default) or not (none)")
    g.add_argument("--mask-truncated", action="store_true", help="no loss on completions cut by --max-new-tokens")
    g.add_argument("--eval-prompts", type=Path, metavar="FILE.jsonl",
                   help="pass@1 / pass@k (sampled and greedy) on these prompts every --eval-every steps")
    g.add_argument("--pass-k", type=int, metavar="K", help="the k of pass@k, <= --group-size (default G)")
    g.add_argument("--success-threshold", type=float, metavar="R",
                   help="a sample succeeds when its total reward >= R (default 1.0)")


def lora_config(args: argparse.Namespace) -> LoRAConfig | None:
    if args.lora_rank is None:
        return None
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) if args.lora_targets else ALL_TARGETS
    alpha = float(args.lora_rank) if args.lora_alpha is None else args.lora_alpha
    return LoRAConfig(args.lora_rank, alpha, targets)


def default_val_rows(n_rows: int) -> int:
    return min(64, n_rows * 5 // 100)


def model_config(args: argparse.Namespace, vocab_size: int | None, init: Checkpoint | None) -> ModelConfig:
    """The checkpoint's config (``--init-from``) or the preset, with ``--model-arg`` applied; a fresh model
    takes the dataset's vocabulary size (None: RL prompts, not tokenized yet: the preset's) unless it is
    overridden."""
    try:
        if init is not None:
            return init.model_config.override(args.model_arg)
        cfg = ModelConfig.from_preset(args.model or DEFAULT_MODEL)
        if vocab_size is not None and not any(item.split("=", 1)[0].strip() == "vocab_size"
                                              for item in args.model_arg):
            cfg = cfg.override({"vocab_size": vocab_size})
        return cfg.override(args.model_arg)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_resume_compatible(args: argparse.Namespace, ckpt: Checkpoint) -> None:
    """A resumed run must be the same run: stage, model, data and adapter (the tokenizer is checked separately)."""
    old = dict(ckpt.args or {})
    if ckpt.stage != args.stage:
        raise UsageError(f"{ckpt.path}: a {ckpt.stage} run, but --stage {args.stage}; "
                         "choose another --out or drop --resume")
    for key in ("model", "model_arg", "init_from"):
        now = [str(v) for v in args.model_arg] if key == "model_arg" else getattr(args, key)
        now = str(now) if isinstance(now, Path) else now
        if key == "model":
            now, old[key] = now or DEFAULT_MODEL, old.get(key) or DEFAULT_MODEL
        if key in old and old[key] != now and not (key == "init_from" and now is None):
            raise UsageError(f"{ckpt.path}: --{key.replace('_', '-')} was {old[key]!r}, now {now!r}; "
                             "a resumed run keeps its model — choose another --out or drop --resume")
    if ckpt.lora is not None and args.lora is None:
        raise UsageError(f"{ckpt.path}: a LoRA run (rank {ckpt.lora.rank}); resume it with the same --lora-* flags")
    if ckpt.lora != args.lora:
        raise UsageError(f"{ckpt.path}: LoRA config {ckpt.lora}, now {args.lora}; a resumed run keeps its adapter "
                         "shape")
    if args.optimizer is not None and effective_optimizer(args.optimizer, args) != ckpt.training.optimizer_name:
        raise UsageError(f"{ckpt.path}: trained with --optimizer {ckpt.training.optimizer_name}, now "
                         f"{args.optimizer}; a resumed run keeps its optimizer")
    kind = recorded_kind(ckpt.training.schedule)
    if args.schedule is not None and args.schedule != kind:
        raise UsageError(f"{ckpt.path}: trained with --schedule {kind}, now {args.schedule}; a resumed run keeps its "
                         "schedule")


def effective_optimizer(name: str, args: argparse.Namespace) -> str:
    """What ``name`` trains with: LoRA adapters are always AdamW (``train/optim.py``)."""
    return "adamw" if args.lora is not None else name


def extension_source(args: argparse.Namespace, latest: Checkpoint) -> tuple[Checkpoint, list[Path]]:
    """``--resume --max-steps N`` on a WSD run recorded with another max_steps: the checkpoint to continue from
    and the later checkpoints (decayed under the old length) it supersedes. A run still before both decay starts
    continues from its latest; one whose decay began continues from its ``pre_decay.pt`` (weights at the old
    decay start, which do not depend on max_steps); a length whose decay would start before that is refused."""
    record = latest.training.schedule or {}
    if recorded_kind(record) != "wsd" or args.max_steps == record.get("max_steps"):
        return latest, []
    old = Schedule(**record)
    new = dataclasses.replace(old, max_steps=args.max_steps,
                              warmup_steps=old.warmup_steps if args.warmup_steps is None else args.warmup_steps,
                              decay_frac=old.decay_frac if args.decay_frac is None else args.decay_frac)
    if latest.step <= old.decay_start:
        source = latest
    else:
        pre = args.out / checkpoint.PRE_DECAY
        if not pre.is_file():
            raise UsageError(f"{args.out}: the decay of this WSD run began at step {old.decay_start} and "
                             f"{checkpoint.PRE_DECAY} is missing: it cannot be extended to --max-steps "
                             f"{args.max_steps}")
        source = load_resume(pre)
    if new.decay_start < source.step:
        raise UsageError(f"--max-steps {args.max_steps}: its decay would start at step {new.decay_start}, before step "
                         f"{source.step} of {source.path}; give a larger --max-steps")
    later = [p for p in checkpoint.list_checkpoints(args.out) if checkpoint.step_of(p) > source.step]
    return source, later


def supersede(out: Path, later: list[Path], old_max: int, say: Callable[..., None]) -> None:
    """Move the checkpoints an extension replaces into ``out/decayed_<old max_steps>/`` (still loadable there)."""
    if not later:
        return
    folder = make_dir(out / f"decayed_{old_max}", "superseded checkpoints folder")
    for path in later:
        path.replace(folder / path.name)
    say(f"extending: {len(later)} checkpoint(s) of the {old_max}-step schedule moved to {folder}")


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


def jsonable(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "lora"}


# ---- run = resolve -> build -> train -> report ----------------------------------------------------------------

def run(args: argparse.Namespace, info: dist.DistInfo) -> None:
    """Open the data, then inside the locked run folder: resolve the source checkpoints, build the model and
    everything around it, train, report."""
    say = print if info.is_main else (lambda *a, **k: None)
    stage: Stage = build_stage(args.stage, **{dest: getattr(args, dest) for dest in STAGES[args.stage].options})
    refuse_inputs(args.out, [(f"--{k.replace('_', '-')}", getattr(args, k, None)) for k in
                             ("data", "prompts", "eval_prompts", "init_from", "ref_from", "teacher")], folder=True)
    dataset = open_data(args, stage, say)
    with locked_run_folder(args.out, info):
        sources = resolve(args, dataset, say)
        dist.barrier()  # every rank chose its checkpoint before rank 0 moves superseded ones
        if stage.rollouts:
            stage.attach_source(dataset, sources.resume or sources.init)
        plan = build(args, info, stage, dataset, sources, say)
        started = time.perf_counter()
        state = train(plan.model, stage, plan.weights, plan.loader, plan.loop, info, args.out, plan.logger,
                      plan.template, sources.resume)
        plan.logger.close()
        if info.is_main:
            report(args, state, time.perf_counter() - started, plan.logger, say)


def open_data(args: argparse.Namespace, stage: Stage, say: Callable[..., None]) -> PackedDataset:
    """The packed dataset, every shard checked; a dataset without a single training row is refused."""
    started = time.perf_counter()
    if stage.rollouts:
        prompts = stage.open_dataset(str(args.prompts))
        say(f"prompts: {args.prompts}: {prompts.n_rows:,} read in {time.perf_counter() - started:.2f} s")
        return prompts
    dataset = stage.open_dataset(str(args.data), verify=not args.no_verify)
    checked = "sizes, counts, token ids" + ("" if args.no_verify else ", sha256")
    say(f"data: {args.data}: {len(dataset.shards)} shard(s) checked ({checked}) in "
        f"{time.perf_counter() - started:.2f} s")
    if dataset.n_rows == 0:
        raise UsageError(f"{args.data}: no training rows (seq_len {dataset.seq_len}, "
                         f"{sum(len(s.tokens) for s in dataset.shards):,} tokens); re-pack with more data or a smaller "
                         "--seq-len")
    return dataset


@dataclass
class Sources:
    """The checkpoints a run starts from: the one it resumes, its --init-from, and a LoRA run's frozen base."""

    resume: Checkpoint | None = None
    init: Checkpoint | None = None
    base: Checkpoint | None = None
    superseded: list[Path] = field(default_factory=list)  # later checkpoints a WSD extension replaces


def resolve(args: argparse.Namespace, dataset: PackedDataset, say: Callable[..., None]) -> Sources:
    """Load and check the source checkpoints: same tokenizer as the data; a resumed run is the same run."""
    fingerprint = dataset.meta.get("tokenizer", {}).get("fingerprint")  # None: prompts, tokenized by the model's
    found = checkpoint.latest(args.out)
    if found is not None and not args.resume:
        raise UsageError(f"{args.out} already holds checkpoints (latest {found.name}); "
                         "pass --resume to continue that run, or choose another --out")
    if args.resume and found is None:
        say(f"note: --resume but no checkpoint in {args.out}: starting fresh")
    if found is not None:
        resume, later = extension_source(args, load_resume(found))
        if fingerprint is not None:
            resume.check_tokenizer(fingerprint, str(args.data))
        check_resume_compatible(args, resume)
        return Sources(resume=resume, base=resume.load_base() if resume.lora is not None else None, superseded=later)
    if args.init_from is None:
        if args.prompts is not None:
            raise UsageError("--stage grpo improves a trained model: give it with --init-from CKPT (e.g. the reason "
                             "or sft run)")
        if args.lora is not None:
            raise UsageError("--lora-rank trains adapters on a frozen base: give it with --init-from CKPT")
        return Sources()
    # the shape of a bare state dict (a MiniMind .pth), which holds no config
    shape = model_config(args, dataset.meta.get("tokenizer", {}).get("vocab_size"), None) \
        if args.model or args.model_arg else None
    init = checkpoint.load(args.init_from, options=SourceOptions(shape))
    if fingerprint is not None:
        init.check_tokenizer(fingerprint, str(args.data))
    if args.model is not None and init.model_config is not shape:
        say(f"note: --model {args.model} ignored: the model config comes from {init.path}")
    return Sources(init=init, base=init if args.lora is not None else None)


def load_resume(path: Path) -> Checkpoint:
    """The latest checkpoint of --out for --resume; a damaged one is refused with what to do about it."""
    try:
        return checkpoint.load(path, resume=True)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (it is the latest checkpoint in --out: move it away to resume from the one "
                              "before)") from None


@dataclass
class Plan:
    """Everything the loop needs, built."""

    model: TinyLM
    weights: FullWeights
    loader: Any
    loop: LoopConfig
    logger: MetricsLogger
    template: Checkpoint


def build(args: argparse.Namespace, info: dist.DistInfo, stage: Stage, dataset: PackedDataset, sources: Sources,
          say: Callable[..., None]) -> Plan:
    """The model (initial or resumed weights, adapters inserted), the stage's setup, the batches, the loop
    config, the logger and the run's checkpoint records; prints the run's summary."""
    meta, resume = dataset.meta, sources.resume
    cfg = resume.model_config if resume is not None else model_config(args, meta["tokenizer"]["vocab_size"],
                                                                      sources.init)
    check_fits(cfg, dataset)
    seed_everything(args.seed)  # identical initial weights on every rank
    model = TinyLM(cfg)
    start = sources.base or sources.init
    if start is not None:
        checkpoint.load_model_state(model, start.model, start.path)
    weights = weights_for(args.lora)
    model = weights.apply(model)
    model.activation_checkpointing = args.activation_checkpointing
    if resume is not None:
        weights.load_state(model, resume.model, resume.path)
    stage.setup(StageContext(dataset, info.device, info.rank, info.world, args.batch_size, sources.init, resume, say,
                             dist.barrier, moe=cfg.is_moe, model=model))
    seed_everything(args.seed + 1000 * info.rank)  # per-rank streams (dropout); restored on resume

    val_rows = 0 if stage.rollouts else default_val_rows(dataset.n_rows) if args.val_rows is None else args.val_rows
    if val_rows >= dataset.n_rows:
        raise UsageError(f"--val-rows {val_rows}: {args.data} has only {dataset.n_rows} rows")
    split = Split(dataset, val_rows)
    loader = stage.loader(split, args.batch_size, info.rank, info.world, args.seed, info.device.type == "cuda")
    if stage.rollouts:
        check_rollout_layout(args, loader, info.world)
    if val_rows and args.eval_every:
        stage.byte_lengths = byte_table(meta, cfg.vocab_size, quiet=not info.is_main)
    loop = loop_config(args, stage, info.device, resume)
    logger = MetricsLogger(args.out, enabled=info.is_main, tensorboard=args.tensorboard,
                           wandb={"project": args.wandb, "name": args.out.name, "config": jsonable(args)}
                           if args.wandb else None)
    if info.is_main:
        if sources.superseded:
            supersede(args.out, sources.superseded, resume.training.schedule["max_steps"], say)
        logger.truncate_after(resume.step if resume is not None else 0)
        checkpoint.copy_tokenizer(Path(meta["tokenizer"]["path"]).parent, args.out)
    dist.barrier()
    global_batch = loader.global_batch(args.grad_accum)
    data = DataRecord(str(args.data or args.prompts), dataset.stage, dataset.seq_len, dataset.n_rows, val_rows,
                      global_batch)
    template = run_record(args, cfg, stage, meta, data, sources)
    say_summary(args, info, stage, model, weights, sources, data, split.n_train, loop, say)
    return Plan(model, weights, loader, loop, logger, template)


def check_rollout_layout(args: argparse.Namespace, loader: Any, world: int) -> None:
    """Each of the step's accum x world micro-batches holds whole groups of at least one prompt."""
    prompts = loader.cfg.prompts_per_step
    if prompts % (args.grad_accum * world):
        raise UsageError(f"--prompts-per-step {prompts} must be a multiple of --grad-accum {args.grad_accum} x "
                         f"{world} process(es): every micro-batch holds whole groups")


def check_fits(cfg: ModelConfig, dataset: PackedDataset) -> None:
    vocab = dataset.meta["tokenizer"]["vocab_size"]
    if cfg.vocab_size < vocab:
        raise UsageError(f"model vocab_size {cfg.vocab_size} < the dataset tokenizer's {vocab}")
    if dataset.seq_len > cfg.max_position_embeddings:
        raise UsageError(f"dataset seq_len {dataset.seq_len} > model max_position_embeddings "
                         f"{cfg.max_position_embeddings} (--model-arg max_position_embeddings=...)")


def loop_config(args: argparse.Namespace, stage: Stage, device: torch.device,
                resume: Checkpoint | None = None) -> LoopConfig:
    """The loop's settings: a flag given wins; then (resumed run) the optimizer, schedule kind, warmup and
    decay fraction the run recorded; then the defaults table's row (``train/defaults.py``, its one definition)."""
    training = resume.training if resume is not None else None
    record = (training.schedule or {}) if training is not None else {}
    optimizer = effective_optimizer(args.optimizer or (training.optimizer_name if training is not None
                                                       else defaults.OPTIMIZER[stage.name]), args)
    row = defaults.lookup(stage.name, optimizer, args.model)
    lr = row.lr if args.lr is None else args.lr
    warmup = record.get("warmup_steps", max(1, int(row.warmup_frac * args.max_steps)))
    kind = args.schedule or (recorded_kind(record) if training is not None else defaults.SCHEDULE)
    return LoopConfig(
        max_steps=args.max_steps, grad_accum=args.grad_accum, lr=lr,
        min_lr=lr / 10 if args.min_lr is None else args.min_lr,
        warmup_steps=warmup if args.warmup_steps is None else args.warmup_steps,
        weight_decay=row.weight_decay if args.weight_decay is None else args.weight_decay,
        optimizer=optimizer,
        muon_lr=row.muon_lr if args.muon_lr is None else args.muon_lr,
        muon_momentum=row.muon_momentum if args.muon_momentum is None else args.muon_momentum,
        muon_weight_decay=row.muon_weight_decay if args.muon_weight_decay is None else args.muon_weight_decay,
        schedule=kind, decay_frac=record.get("decay_frac", 0.2) if args.decay_frac is None else args.decay_frac,
        grad_clip=args.grad_clip, dtype=resolve_dtype(args.dtype, device),
        compile=device.type == "cuda" if args.compile is None else args.compile,
        eval_every=args.eval_every, save_every=args.save_every, keep_last=args.keep_last,
        log_every=args.log_every, stop_after=args.stop_after, progress=not args.no_progress,
        skip_nonfinite=args.skip_nonfinite)


def run_record(args: argparse.Namespace, cfg: ModelConfig, stage: Stage, meta: dict, data: DataRecord,
               sources: Sources) -> Checkpoint:
    """The records every checkpoint of the run repeats (the loop adds weights, counters and resume state)."""
    tok = meta["tokenizer"]
    resume, init, base = sources.resume, sources.init, sources.base
    if resume is not None:
        init_from, base_record = resume.init_from, resume.base
    else:
        init_from = SourceRecord(init.path, init.step, init.stage) if init is not None else None
        base_record = base.source_record() if base is not None else None
    return Checkpoint(model={}, model_config=cfg, stage=stage.name,
                      tokenizer=TokenizerRecord(tok["fingerprint"], tok["path"], tok["vocab_size"],
                                                tok.get("special_ids", {})),
                      data=data, args=jsonable(args), lora=args.lora, base=base_record, init_from=init_from,
                      **stage.checkpoint_fields())


def say_summary(args: argparse.Namespace, info: dist.DistInfo, stage: Stage, model: TinyLM, weights: FullWeights,
                sources: Sources, data: DataRecord, n_train: int, loop: LoopConfig, say: Callable[..., None]) -> None:
    say(f"== {stage.name}: {args.data or args.prompts} -> {args.out}")
    say(model.summary(data.seq_len))
    if args.lora is not None:
        n_adapter = sum(p.numel() for _, p in weights.trainable(model))
        say(f"lora: rank {args.lora.rank}, alpha {args.lora.alpha:g} on {','.join(args.lora.targets)}: "
            f"{n_adapter:,} trainable params ({100 * n_adapter / model.num_params():.2f}%), base "
            f"{sources.base.path} frozen")
    if stage.rollouts:
        group = int(stage.o["group_size"])  # type: ignore[attr-defined]
        say(f"prompts: {data.rows:,}; {data.global_batch // group} prompts x {group} samples = {data.global_batch} "
            f"completions/step in {args.grad_accum} micro-batch(es) x {info.world} proc; rows up to {data.seq_len} "
            f"tokens; {args.max_steps} steps = "
            f"{args.max_steps * data.global_batch / group / max(n_train, 1):.2f} epochs over the prompts")
    else:
        say(f"data: {data.rows:,} rows x {data.seq_len} ({n_train:,} train, {data.val_rows} val); global batch "
            f"{data.global_batch} rows = {args.batch_size} x {args.grad_accum} accum x {info.world} proc; "
            f"{data.global_batch * data.seq_len:,} tokens/step; {args.max_steps} steps = "
            f"{args.max_steps * data.global_batch / max(n_train, 1):.2f} epochs")
    say(f"device {info.device} | dtype {loop.dtype} | compile {loop.compile} | lr {loop.lr:g} -> {loop.min_lr:g}, "
        f"warmup {loop.warmup_steps} | seed {args.seed}")
    muon = f" (hidden matrices; lr {loop.muon_lr:g}, momentum {loop.muon_momentum:g}) + adamw" \
        if loop.optimizer == "muon" else ""
    lora_note = " (LoRA adapters: AdamW)" if args.lora is not None and args.optimizer == "muon" else ""
    wsd = f", decay over the last {loop.decay_frac:g}" if loop.schedule == "wsd" else ""
    say(f"optimizer {loop.optimizer}{muon}{lora_note} | schedule {loop.schedule}{wsd}")
    if args.activation_checkpointing:
        say("activation checkpointing: each block's activations are recomputed in backward"
            + ("; freed memory goes back to the OS (--no-release-memory to keep glibc's heap)"
               if release_memory(args) else ""))
    source = sources.resume or sources.init
    if source is not None:
        what = "resuming" if sources.resume is not None else "initialised from"
        say(f"{what} {source.path} (step {source.step})")


def report(args: argparse.Namespace, state: TrainState, took: float, logger: MetricsLogger,
           say: Callable[..., None]) -> None:
    """The closing lines (last loss and validation metrics, files written); ``--merge`` folds the adapter."""
    out: Path = args.out
    last_loss = next((r["loss"] for r in reversed(state.history) if "loss" in r), None)
    last_val = next((r for r in reversed(state.history) if "val_loss" in r), None)
    plot = plot_losses(out)
    say(f"done: step {state.step}/{args.max_steps} in {took:.1f} s"
        + (f" | loss {last_loss:.4f}" if last_loss is not None else "")
        + (f" | val_loss {last_val['val_loss']:.4f}" if last_val else "")
        + "".join(f" | {k} {v:.4f}" for k, v in (last_val or {}).items()
                  if k.startswith("val_") and k != "val_loss" and isinstance(v, float)))
    found = checkpoint.latest(out)
    say(f"checkpoint {found}" if found else "no checkpoint written")
    say(f"metrics    {logger.path}")
    say(f"plot       {plot}" if plot else "plot       skipped (pip install matplotlib for loss.png)")
    if args.merge and found is not None:
        say(f"merged     {checkpoint.merge_checkpoint(found, out / 'merged')}  (adapter folded into the base)")


def release_memory(args: argparse.Namespace) -> bool:
    """--release-memory as given, else on exactly when --activation-checkpointing is (a run that recomputes
    blocks to save memory also returns freed memory: glibc's heap kept ~1 GB of holes otherwise)."""
    return args.activation_checkpointing if args.release_memory is None else args.release_memory


def main(argv: list[str] | None = None) -> int:
    """Parse, join the process group, run; every user error (TinyLMError) is one line and exit status 1."""
    args = parse_args(argv)
    if release_memory(args):
        return_freed_memory()
    info = dist.setup(args.device)
    agreed: list[NonFiniteError] = []

    def body() -> int | None:
        try:
            return run(args, info)
        except NonFiniteError as e:
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
