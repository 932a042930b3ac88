"""The checkpoints a run starts from: the one it resumes (the same run: stage, model, adapter, optimizer and
schedule are checked against the configuration), its ``--init-from``, a LoRA run's frozen base, and a WSD
run extended to a longer ``--max-steps`` (continued from its pre-decay checkpoint; the later, decayed
checkpoints are moved aside, still loadable).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.files import make_dir
from train import checkpoint, loading
from train.checkpoint import Checkpoint
from train.config import DEFAULT_MODEL, RunConfig, effective_optimizer, model_config
from train.data import PackedDataset
from train.loading import SourceOptions
from train.options import UsageError
from train.schedule import Schedule, recorded_kind
from train.weights import CheckpointError


@dataclass
class Sources:
    """The checkpoints a run starts from: the one it resumes, its --init-from, and a LoRA run's frozen base."""

    resume: Checkpoint | None = None
    init: Checkpoint | None = None
    base: Checkpoint | None = None
    superseded: list[Path] = field(default_factory=list)  # later checkpoints a WSD extension replaces


def resolve(config: RunConfig, dataset: PackedDataset, say: Callable[..., None]) -> Sources:
    """Load and check the source checkpoints: same tokenizer as the data; a resumed run is the same run."""
    run, lora = config.run, config.model.lora
    fingerprint = dataset.meta.get("tokenizer", {}).get("fingerprint")  # None: prompts, tokenized by the model's
    found = checkpoint.latest(run.out)
    if found is not None and not run.resume:
        raise UsageError(f"{run.out} already holds checkpoints (latest {found.name}); "
                         "pass --resume to continue that run, or choose another --out")
    if run.resume and found is None:
        say(f"note: --resume but no checkpoint in {run.out}: starting fresh")
    if found is not None:
        resume, later = extension_source(config, load_resume(found))
        if fingerprint is not None:
            resume.check_tokenizer(fingerprint, str(run.data))
        check_resume_compatible(config, resume)
        base = loading.load_base(resume) if resume.lora is not None else None
        return Sources(resume=resume, base=base, superseded=later)
    if run.init_from is None:
        if run.prompts is not None:
            raise UsageError(f"--stage {config.run.stage} improves a trained model: give it with --init-from CKPT "
                             "(e.g. the reason or sft run)")
        if lora is not None:
            raise UsageError("--lora-rank trains adapters on a frozen base: give it with --init-from CKPT")
        return Sources()
    # the shape of a bare state dict (a MiniMind .pth), which holds no config
    shape = model_config(config, dataset.meta.get("tokenizer", {}).get("vocab_size"), None) \
        if config.model.model or config.model.model_arg else None
    init = loading.load(run.init_from, options=SourceOptions(shape))
    if fingerprint is not None:
        init.check_tokenizer(fingerprint, str(run.data))
    if config.model.model is not None and init.model_config is not shape:
        say(f"note: --model {config.model.model} ignored: the model config comes from {init.path}")
    return Sources(init=init, base=init if lora is not None else None)


def load_resume(path: Path) -> Checkpoint:
    """The latest checkpoint of --out for --resume; a damaged one is refused with what to do about it."""
    try:
        return loading.load(path, resume=True)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (it is the latest checkpoint in --out: move it away to resume from the one "
                              "before)") from None


def check_resume_compatible(config: RunConfig, ckpt: Checkpoint) -> None:
    """A resumed run must be the same run: stage, model, data, adapter and schedule kind (the tokenizer is
    checked separately; the optimizer by the loop, when it restores the optimizer state)."""
    old = dict(ckpt.args or {})
    stage, lora = config.run.stage, config.model.lora
    if ckpt.stage != stage:
        raise UsageError(f"{ckpt.path}: a {ckpt.stage} run, but --stage {stage}; choose another --out or drop --resume")
    init_from = config.run.init_from
    now_values = {"model": config.model.model or DEFAULT_MODEL, "model_arg": list(config.model.model_arg),
                  "init_from": None if init_from is None else str(init_from)}
    old["model"] = old.get("model") or DEFAULT_MODEL
    for key, now in now_values.items():
        if key in old and old[key] != now and not (key == "init_from" and now is None):
            raise UsageError(f"{ckpt.path}: --{key.replace('_', '-')} was {old[key]!r}, now {now!r}; "
                             "a resumed run keeps its model — choose another --out or drop --resume")
    if ckpt.lora is not None and lora is None:
        raise UsageError(f"{ckpt.path}: a LoRA run (rank {ckpt.lora.rank}); resume it with the same --lora-* flags")
    if ckpt.lora != lora:
        raise UsageError(f"{ckpt.path}: LoRA config {ckpt.lora}, now {lora}; a resumed run keeps its adapter shape")
    optimizer = config.optim.optimizer
    if optimizer is not None and effective_optimizer(optimizer, lora) != ckpt.training.optimizer_name:
        raise UsageError(f"{ckpt.path}: trained with --optimizer {ckpt.training.optimizer_name}, now "
                         f"{optimizer}; a resumed run keeps its optimizer")
    kind = recorded_kind(ckpt.training.schedule)
    if config.optim.schedule is not None and config.optim.schedule != kind:
        raise UsageError(f"{ckpt.path}: trained with --schedule {kind}, now {config.optim.schedule}; a resumed run "
                         "keeps its schedule")


def extension_source(config: RunConfig, latest: Checkpoint) -> tuple[Checkpoint, list[Path]]:
    """``--resume --max-steps N`` on a WSD run recorded with another max_steps: the checkpoint to continue from
    and the later checkpoints (decayed under the old length) it supersedes. A run still before both decay starts
    continues from its latest; one whose decay began continues from its ``pre_decay.pt`` (weights at the old
    decay start, which do not depend on max_steps); a length whose decay would start before that is refused."""
    o, out = config.optim, config.run.out
    record = latest.training.schedule or {}
    if recorded_kind(record) != "wsd" or o.max_steps == record.get("max_steps"):
        return latest, []
    old = Schedule(**record)
    new = dataclasses.replace(old, max_steps=o.max_steps,
                              warmup_steps=old.warmup_steps if o.warmup_steps is None else o.warmup_steps,
                              decay_frac=old.decay_frac if o.decay_frac is None else o.decay_frac)
    if latest.step <= old.decay_start:
        source = latest
    else:
        pre = out / checkpoint.PRE_DECAY
        if not pre.is_file():
            raise UsageError(f"{out}: the decay of this WSD run began at step {old.decay_start} and "
                             f"{checkpoint.PRE_DECAY} is missing: it cannot be extended to --max-steps {o.max_steps}")
        source = load_resume(pre)
    if new.decay_start < source.step:
        raise UsageError(f"--max-steps {o.max_steps}: its decay would start at step {new.decay_start}, before step "
                         f"{source.step} of {source.path}; give a larger --max-steps")
    later = [p for p in checkpoint.list_checkpoints(out) if checkpoint.step_of(p) > source.step]
    return source, later


def supersede(out: Path, later: list[Path], old_max: int, say: Callable[..., None]) -> None:
    """Move the checkpoints an extension replaces into ``out/decayed_<old max_steps>/`` (still loadable there)."""
    if not later:
        return
    folder = make_dir(out / f"decayed_{old_max}", "superseded checkpoints folder")
    for path in later:
        path.replace(folder / path.name)
    say(f"extending: {len(later)} checkpoint(s) of the {old_max}-step schedule moved to {folder}")
