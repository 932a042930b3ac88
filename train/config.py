"""The run configuration of ``train/run.py``: the command line parsed in one place into one frozen, typed
object, nested by owner (run, model, optimizer, hardware, logging, and the chosen stage's own options).

Each owner is an :class:`~train.options.Options` dataclass whose fields are the flags: default, range and
help are written once, there, and ``--help`` is generated from them. Learning rates, warmup and weight
decay have no field default: a flag that is not given takes the row of ``train/defaults.py`` (or, on
resume, what the run recorded) in :func:`loop_config`. Cross-flag rules (which stage reads which flag,
LoRA flags without a rank, checkpoints aligned with rollout reuse) are argparse errors (exit 2); a stage's
own consistency checks (``--pass-k`` <= ``--group-size``) raise :class:`~train.options.OptionError`.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.dtypes import dtype_flag
from core.dtypes import metavar as dtype_metavar
from model import ModelConfig
from model.lora import ALL_TARGETS, LoRAConfig
from train import defaults
from train.checkpoint import PRE_DECAY, Checkpoint
from train.loop import LoopConfig, resolve_dtype
from train.optim import OPTIMIZERS, OptimConfig
from train.options import Options, UsageError, add_flags, flag_name, given, option
from train.schedule import KINDS, recorded_kind
from train.stages import STAGES, Stage

DEFAULT_MODEL = "small"
STAGE_HELP = ("pretrain: next-token loss on document windows; sft: loss on assistant tokens of packed conversations; "
              "reason: sft on <think>/<answer> data, tag tokens up-weighted by the mask; dpo: preference loss on "
              "(chosen, rejected) pairs; distill: CE + KL to a --teacher; grpo: RL on the model's own rollouts of "
              "--prompts, scored by --reward functions; ppo: the same rollouts, with a value head and GAE")


@dataclass(frozen=True)
class RunOptions(Options):
    stage: str = option("", STAGE_HELP, choices=tuple(sorted(STAGES)), required=True)
    data: Path | None = option(None, "packed dataset folder (preprocess/pack.py --stage STAGE --out DIR); every "
                               "stage but grpo / ppo", metavar="DIR", type=Path)
    prompts: Path | None = option(None, "--stage grpo / ppo: prompt records ({conversations: [...]} ending with a "
                                  "user turn, or any chat / reasoning record: a final assistant turn becomes the "
                                  "'reference' column)", metavar="FILE.jsonl", type=Path)
    out: Path = option(Path(), "run folder (checkpoints, metrics)", metavar="DIR", type=Path, required=True)
    resume: bool = option(False, "continue from the latest checkpoint in --out (starts fresh if there is none)",
                          action="store_true")
    init_from: Path | None = option(None, "start from this checkpoint's weights and model config (a file, or a run "
                                    "folder: its latest checkpoint), e.g. SFT from the pretrain run; or a "
                                    "transformers folder (Llama, Qwen3), or a MiniMind .pth state dict whose shape "
                                    "--model / --model-arg give", metavar="CKPT", type=Path)
    seed: int = option(1337, "model init and data order seed (default {default})", kind=int, low=0, high=2**32 - 1)
    no_verify: bool = option(False, "skip the sha256 check of every shard file when the dataset is opened (sizes, "
                             "headers, counts and token ids are still checked)", action="store_true")

    @property
    def source(self) -> Path | None:
        """What the run reads: --data, or --prompts for an RL stage."""
        return self.data or self.prompts


@dataclass(frozen=True)
class ModelOptions(Options):
    model: str | None = option(None, "preset: tiny (0.5M), tiny-moe, small (26M, default), small-moe, base (104M); "
                               "with --init-from / --resume the checkpoint's config is used instead",
                               metavar="PRESET")
    model_arg: tuple[str, ...] = option((), "override a ModelConfig field, repeatable (e.g. num_hidden_layers=4, "
                                        "dropout=0.1); also applied on top of an --init-from config",
                                        metavar="KEY=VALUE", action="append")
    lora: LoRAConfig | None = None  # from the LoRA flags (LoRAOptions)
    merge: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "model_arg", tuple(self.model_arg))


@dataclass(frozen=True)
class LoRAOptions(Options):
    lora_rank: int | None = option(None, "train rank-R adapters on a frozen --init-from base instead of all weights; "
                                   "checkpoints then hold only the adapter (and name the base)", metavar="R",
                                   kind=int, low=1)
    lora_alpha: float | None = option(None, "adapter scaling ALPHA / R (default ALPHA = R, i.e. scaling 1)",
                                      metavar="ALPHA", kind=float, low=0, low_open=True)
    lora_targets: str | None = option(None, "comma-separated projections to adapt (default all: "
                                      f"{','.join(ALL_TARGETS)})", metavar="NAMES")
    merge: bool = option(False, "after training, fold the adapter into the base: a dense checkpoint in OUT/merged "
                         "(same as bin/merge --ckpt OUT --out OUT/merged)", action="store_true")

    def config(self) -> LoRAConfig | None:
        """The adapter shape (ValueError: unknown targets), or None without --lora-rank."""
        if self.lora_rank is None:
            return None
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()) if self.lora_targets \
            else ALL_TARGETS
        return LoRAConfig(self.lora_rank, float(self.lora_rank) if self.lora_alpha is None else self.lora_alpha,
                          targets)


_TABLE = "(default: the table below)"
STEP_FLAGS = ("max_steps", "stop_after", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay",
              "grad_clip", "skip_nonfinite", "stop_on_divergence")


@dataclass(frozen=True)
class OptimizerOptions(Options):
    """Steps, batch and the optimizer; None = not given: the defaults table (or the resumed run) decides."""

    max_steps: int = option(200, "optimizer steps (default {default})", metavar="N", kind=int, low=1)
    stop_after: int | None = option(None, "end after step N (with a checkpoint) while keeping the --max-steps "
                                    "schedule, e.g. for time-sliced jobs; continue later with --resume",
                                    metavar="N", kind=int, low=1)
    batch_size: int = option(8, "micro-batch rows per process (default {default})", metavar="B", kind=int, low=1)
    grad_accum: int = option(2, "micro-batches per step; global batch = B x A x processes rows (default {default})",
                             metavar="A", kind=int, low=1)
    lr: float | None = option(None, "peak learning rate of AdamW (under --optimizer muon: of the AdamW part) "
                              + _TABLE, kind=float, low=0, low_open=True)
    min_lr: float | None = option(None, "final learning rate of the decay (default lr / 10; the Muon LR decays by "
                                  "the same factor)", kind=float, low=0)
    warmup_steps: int | None = option(None, "linear warmup steps (default: the table's share of --max-steps; a "
                                      "resumed run keeps its own)", kind=int, low=0)
    weight_decay: float | None = option(None, "AdamW decay of matrices " + _TABLE, kind=float, low=0)
    grad_clip: float = option(1.0, "max global grad norm, 0 = off (default {default})", kind=float, low=0)
    skip_nonfinite: int = option(0, "a nan/inf loss or gradient norm stops the run at once (default); allow up to "
                                 "N such steps to be skipped instead (no update, counted in metrics.jsonl), then "
                                 "stop", metavar="N", kind=int, low=0)
    stop_on_divergence: bool = option(False, "stop with an error (exit 1) when the loss rises far above its start "
                                      "(the divergence warning's rule); default: warn once and go on",
                                      action="store_true")
    optimizer: str | None = option(None, "adamw: AdamW on every weight; muon: torch.optim.Muon on the hidden "
                                   "matrices (attention, MLP), AdamW on embeddings, head, norms, biases, router (LoRA "
                                   "adapters: always AdamW)", choices=OPTIMIZERS)
    muon_lr: float | None = option(None, "Muon peak learning rate " + _TABLE, metavar="LR", kind=float, low=0,
                                   low_open=True)
    muon_momentum: float | None = option(None, "Muon (Nesterov) momentum " + _TABLE, metavar="M", kind=float, low=0,
                                         high=1)
    muon_weight_decay: float | None = option(None, "Muon decoupled weight decay " + _TABLE, metavar="WD", kind=float,
                                             low=0)
    schedule: str | None = option(None, "cosine: warmup then cosine decay to --min-lr; wsd: warmup, stable, then "
                                  "linear decay over the last --decay-frac of the steps; --resume --max-steps N "
                                  f"(larger) extends a WSD run from {PRE_DECAY}, its checkpoint where the decay "
                                  f"began, without a second warmup (default {defaults.SCHEDULE})", choices=KINDS)
    decay_frac: float | None = option(None, f"wsd: fraction of --max-steps that decays (default {defaults.DECAY_FRAC})",
                                      metavar="F", kind=float, low=0, low_open=True, high=1)


@dataclass(frozen=True)
class HardwareOptions(Options):
    device: str = option("auto", "auto (cuda:LOCAL_RANK, else mps, else cpu), cpu, cuda, ...", cli_default="auto")
    dtype: str = option("auto", "autocast dtype; auto = bfloat16 on CUDA (float16 + GradScaler if bfloat16 is "
                        "unsupported), float32 on CPU (bfloat16 autocast is slow on CPUs without AVX512-BF16); "
                        "fp32, bf16, fp16 are accepted too", type=dtype_flag(extra=("auto",)),
                        metavar=dtype_metavar(extra=("auto",)))
    compile: bool | None = option(None, "torch.compile the model (default: on for CUDA, off for CPU, where the "
                                  "compile time outweighs the gain)", action=argparse.BooleanOptionalAction)
    activation_checkpointing: bool = option(False, "keep only each block's input for backward and recompute the "
                                            "block there: much less memory for ~1/3 more compute; same loss and "
                                            "gradients (any stage, LoRA, DDP, compile)", action="store_true")
    release_memory: bool | None = option(None, "glibc: serve allocations >= 1 MiB by mmap so freed activations go "
                                         "back to the OS at once (costs page faults, so more time per step); "
                                         "default: on with --activation-checkpointing (both trade time for "
                                         "memory), off otherwise", action=argparse.BooleanOptionalAction)
    fsdp: bool = option(False, "under torchrun: shard each block's weights, gradients and AdamW states over the "
                        "processes (FSDP2) instead of a whole copy per process (DDP), for models whose training "
                        "state does not fit one GPU; checkpoints are gathered into the ordinary format. Needs "
                        "--optimizer adamw; not with --lora-rank or --stage grpo / ppo", action="store_true")

    @property
    def returns_memory(self) -> bool:
        """--release-memory as given, else on exactly when --activation-checkpointing is (a run that recomputes
        blocks to save memory also returns freed memory to the OS)."""
        return self.activation_checkpointing if self.release_memory is None else self.release_memory


@dataclass(frozen=True)
class LoggingOptions(Options):
    eval_every: int = option(100, "validation loss and bits-per-byte every N steps and at the end; 0 = never "
                             "(default {default})", metavar="N", kind=int, low=0)
    val_rows: int | None = option(None, "rows held out for validation (default min(64, 5%% of rows); 0 = none)",
                                  metavar="R", kind=int, low=0)
    save_every: int = option(100, "checkpoint every N steps (and always at the end); 0 = only at the end (default "
                             "{default})", metavar="N", kind=int, low=0)
    keep_last: int = option(2, "checkpoints kept, 0 = all (default {default})", metavar="K", kind=int, low=0)
    log_every: int = option(10, "metrics line every N steps (default {default})", metavar="N", kind=int, low=1)
    tensorboard: bool = option(False, "also log to OUT/tensorboard (needs tensorboard)", action="store_true")
    wandb: str | None = option(None, "also log to Weights & Biases project PROJECT (default tinylm; needs wandb)",
                               metavar="PROJECT", nargs="?", const="tinylm")
    no_progress: bool = option(False, "no tqdm bar", action="store_true")
    sample_every: int = option(0, "every N steps and at the end, log greedy answers to a few fixed prompts to "
                               "metrics.jsonl (bin/report shows them); 0 = never (default {default})", metavar="N",
                               kind=int, low=0)


@dataclass(frozen=True)
class RunConfig:
    """Everything the command line says, by owner; ``record`` is the flat flag dict every checkpoint stores."""

    run: RunOptions
    model: ModelOptions
    optim: OptimizerOptions
    hardware: HardwareOptions
    logging: LoggingOptions
    stage: Options
    record: dict[str, Any]


GROUPS = (("run", RunOptions, None), ("model", ModelOptions, None), ("optimisation", OptimizerOptions, STEP_FLAGS),
          ("optimizer and schedule (defaults: the table below; a resumed run keeps its own)", OptimizerOptions,
           tuple(f.name for f in dataclasses.fields(OptimizerOptions) if f.name not in STEP_FLAGS)))


def parser(description: str) -> argparse.ArgumentParser:
    """The argparse parser: every group's flags from its dataclass (stage groups from each stage's Options)."""
    p = argparse.ArgumentParser(prog="train/run.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="defaults by stage x optimizer x preset (train/defaults.py; train.sh reads the "
                                       "same table; preset '*' is any other --model):\n" + defaults.table_text())
    for title, cls, names in GROUPS:
        add_flags(p.add_argument_group(title), cls, names=names)
    added: set[str] = set()  # a flag several stages take (the RL flags of grpo and ppo) is added once
    for stage in STAGES.values():
        own = tuple(f.name for f in dataclasses.fields(stage.Options) if f.name not in added)
        if own:
            add_flags(p.add_argument_group(stage.Options.title), stage.Options, names=own)
            added.update(own)
    add_flags(p.add_argument_group("LoRA (any stage)"), LoRAOptions)
    add_flags(p.add_argument_group("hardware"), HardwareOptions)
    add_flags(p.add_argument_group("evaluation, checkpoints, logging"), LoggingOptions)
    return p


def parse_args(argv: list[str] | None = None, description: str | None = None) -> RunConfig:
    """The run configuration of ``argv``: argparse errors exit 2; a stage's option conflict raises OptionError."""
    p = parser(description or "")
    return _configure(p, p.parse_args(argv))


def _configure(p: argparse.ArgumentParser, ns: argparse.Namespace) -> RunConfig:
    """Check the cross-flag rules, then build each owner's options (the only place a Namespace is read)."""
    values = vars(ns)
    stage_cls = STAGES[ns.stage]
    if stage_cls.rollouts and (ns.prompts is None or ns.data is not None):
        p.error(f"--stage {ns.stage} trains on rollouts of --prompts FILE.jsonl (and takes no --data)")
    if not stage_cls.rollouts and (ns.data is None or ns.prompts is not None):
        p.error(f"--stage {ns.stage} reads --data DIR (--prompts is for the RL stages: grpo, ppo)")
    takes = {name: {f.name for f in dataclasses.fields(cls.Options)} for name, cls in STAGES.items()}
    for other in STAGES.values():
        for flag in given(values, other.Options):
            if flag not in takes[ns.stage]:
                users = [name for name, own in takes.items() if flag in own]
                p.error(f"{flag_name(flag)} applies to --stage {' / '.join(users)} only, not --stage {ns.stage}")
    reuse = getattr(ns, "rollout_reuse", None) or 1
    for name in ("save_every", "stop_after"):
        if getattr(ns, name) is not None and getattr(ns, name) % reuse:
            p.error(f"{flag_name(name)} must be a multiple of --rollout-reuse {reuse} (a checkpoint between two reuses "
                    "of one rollout batch could not be resumed exactly)")
    if ns.fsdp and stage_cls.rollouts:
        p.error(f"--fsdp with --stage {ns.stage} is not supported: each process generates rollouts of its own "
                "length token by token, and a sharded model needs every process in each forward; use DDP "
                "(torchrun without --fsdp)")
    lora = LoRAOptions(**given(values, LoRAOptions))
    if ns.fsdp and ns.sample_every:
        p.error("--sample-every with --fsdp is not supported: one process cannot generate with a sharded model")
    if ns.fsdp and lora.lora_rank is not None:
        p.error("--fsdp with --lora-rank is not supported: an adapter run trains a small fraction of the weights; "
                "run it with DDP (torchrun without --fsdp)")
    if lora.lora_rank is not None and ns.stage == "ppo":
        p.error("--lora-rank with --stage ppo is not supported: the value head trains beside the policy's weights "
                "and is saved with them; train all weights")
    if lora.lora_rank is None:
        for name in given(values, LoRAOptions):
            p.error(f"{flag_name(name)} needs --lora-rank")
    try:
        lora_config = lora.config()
    except ValueError as e:
        p.error(str(e))
    run = RunOptions(**given(values, RunOptions))
    model = ModelOptions(**given(values, ModelOptions), lora=lora_config, merge=lora.merge)
    optim = OptimizerOptions(**given(values, OptimizerOptions))
    hardware = HardwareOptions(**given(values, HardwareOptions))
    logging = LoggingOptions(**given(values, LoggingOptions))
    stage = stage_cls.Options(**given(values, stage_cls.Options))
    built = {**values}
    for part in (run, model, optim, hardware, logging, lora, stage):
        built.update({k: v for k, v in part.values().items() if k in values})
    record = {k: list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v for k, v in built.items()}
    return RunConfig(run, model, optim, hardware, logging, stage, record)


def effective_optimizer(name: str, lora: LoRAConfig | None) -> str:
    """What ``name`` trains with: LoRA adapters are always AdamW (``train/optim.py``)."""
    return "adamw" if lora is not None else name


def model_config(config: RunConfig, vocab_size: int | None, init: Checkpoint | None) -> ModelConfig:
    """The checkpoint's config (``--init-from``) or the preset, with ``--model-arg`` applied; a fresh model
    takes the dataset's vocabulary size (None: RL prompts, not tokenized yet: the preset's) unless it is
    overridden."""
    overrides = list(config.model.model_arg)
    try:
        if init is not None:
            return init.model_config.override(overrides)
        cfg = ModelConfig.from_preset(config.model.model or DEFAULT_MODEL)
        if vocab_size is not None and not any(item.split("=", 1)[0].strip() == "vocab_size" for item in overrides):
            cfg = cfg.override({"vocab_size": vocab_size})
        return cfg.override(overrides)
    except ValueError as e:
        raise UsageError(str(e)) from None


def loop_config(config: RunConfig, stage: Stage, device: torch.device, resume: Checkpoint | None = None) -> LoopConfig:
    """The loop's settings: a flag given wins; then (resumed run) the optimizer, schedule kind, warmup and
    decay fraction the run recorded; then the defaults table's row (``train/defaults.py``)."""
    o, log = config.optim, config.logging
    training = resume.training if resume is not None else None
    record = (training.schedule or {}) if training is not None else {}
    optimizer = effective_optimizer(o.optimizer or (training.optimizer_name if training is not None
                                                    else defaults.OPTIMIZER[stage.name]), config.model.lora)
    fsdp = config.hardware.fsdp
    dtype = resolve_dtype(config.hardware.dtype, device)
    if fsdp and dtype == "float16":
        raise UsageError("--fsdp computes in bfloat16 or float32, not float16 (no sharded GradScaler): pass "
                         "--dtype bf16 or fp32")
    if fsdp and optimizer == "muon":
        raise UsageError("--fsdp shards the hidden matrices that Muon orthogonalises whole: pass --optimizer adamw")
    row = defaults.lookup(stage.name, optimizer, config.model.model)
    lr = row.lr if o.lr is None else o.lr
    warmup = record.get("warmup_steps", max(1, int(row.warmup_frac * o.max_steps)))
    optim = OptimConfig(optimizer, lr, row.weight_decay if o.weight_decay is None else o.weight_decay,
                        row.muon_lr if o.muon_lr is None else o.muon_lr,
                        row.muon_momentum if o.muon_momentum is None else o.muon_momentum,
                        row.muon_weight_decay if o.muon_weight_decay is None else o.muon_weight_decay)
    return LoopConfig(
        max_steps=o.max_steps, grad_accum=o.grad_accum, optim=optim,
        min_lr=lr / 10 if o.min_lr is None else o.min_lr,
        warmup_steps=warmup if o.warmup_steps is None else o.warmup_steps,
        schedule=o.schedule or (recorded_kind(record) if training is not None else defaults.SCHEDULE),
        decay_frac=record.get("decay_frac", defaults.DECAY_FRAC) if o.decay_frac is None else o.decay_frac,
        grad_clip=o.grad_clip, dtype=dtype,
        compile=device.type == "cuda" if config.hardware.compile is None else config.hardware.compile,
        eval_every=log.eval_every, save_every=log.save_every, keep_last=log.keep_last, log_every=log.log_every,
        sample_every=log.sample_every,
        stop_after=o.stop_after, progress=not log.no_progress, skip_nonfinite=o.skip_nonfinite,
        stop_on_divergence=o.stop_on_divergence, fsdp=fsdp)
