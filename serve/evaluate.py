"""Evaluate a checkpoint on any JSONL of any stage, and answer a file of prompts (``bin/eval``).

Held-out metrics: the JSONL files are packed into a temporary folder with ``preprocess/pack.py``'s own
``pack()`` (same rendering, masks and rows as training, with the checkpoint's tokenizer), every row of
that folder becomes a validation row, and ``train.loop.evaluate`` runs the stage's ``eval_sums`` /
``eval_metrics`` over them: the numbers are computed exactly as the training run's ``val_*`` lines.
Cross-entropy stages (pretrain, sft, reason) give ``loss`` (nats per supervised token, weighted by the
mask), ``perplexity = exp(loss)``, ``bpb`` (bits per UTF-8 byte of the supervised tokens) and
``tokens``; dpo gives the DPO loss, margin and accuracy against a reference model.

Prompts (``preprocess/prompts.py``, the reader the RL stage uses): each record is ``{"prompt": str,
"system"?: str}`` or ``{"conversations": [{role, content}, ...]}`` (a final assistant turn is kept as
``reference`` and not shown to the model), JSONL / .jsonl.zst / Parquet; answers are generated (greedy by
default) and written, one line per prompt, to a JSONL file that appears only when complete. Each evaluation
appends one JSON line to the results file.

Rewards (``--prompts FILE --reward SPEC``): instead of answers, the prompts (RL prompt records,
``preprocess/prompts.py``) are scored as the RL stage's ``--eval-prompts`` evaluation scores them, with the
same code (``train.passk.pass_sums``) and the same per-sample seeds: sampled pass@1 and pass@k, greedy
pass@1 and the mean sampled reward, a sample succeeding when its total reward >= the threshold.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from core.files import append_line, atomic_write_text, check_file_target
from model.generate import generate
from preprocess.options import RecordOptions
from preprocess.prompts import REFERENCE, read_prompts
from serve.source_args import ToolError
from train import dist
from train.config import RunOptions
from train.data import PackedDataset, Split
from train.loading import LoadedModel
from train.loop import evaluate
from train.metrics import token_byte_lengths
from train.passk import PassConfig, pass_metrics, pass_sums
from train.prompt_set import PromptSet, tokenize
from train.reward_model import parse_spec, reward_models
from train.rewards import load_rewards
from train.rollout import ROLLOUT_DTYPES, RolloutConfig
from train.stages import StageContext, build_stage
from train.stages.grpo import GRPOOptions

EVAL_STAGES = ("pretrain", "sft", "reason", "dpo")
RESULTS_FILE = "eval_results.jsonl"


class AllRows(Split[PackedDataset]):
    """Every row of a dataset is a validation row (no training rows)."""

    def __init__(self, dataset: PackedDataset) -> None:  # Split itself refuses val_rows == n_rows
        self.dataset, self.val_rows, self.n_train = dataset, dataset.n_rows, 0


_RECORD_DEFAULTS = RecordOptions()


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one (``cuda``, else ``mps``), else ``cpu``; a named device must be a device
    torch knows and, for CUDA, present (ToolError naming ``--device`` otherwise)."""
    try:
        device = dist.resolve_device(name)
    except (RuntimeError, ValueError):
        raise ToolError(f"--device {name!r}: not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise ToolError(f"--device {name}: no such CUDA device here (--device auto picks what there is)")
    return device


@dataclass
class DataOptions:
    """How ``bin/eval`` packs ``--data``: the stage, rows, batch and pack.py's own record options
    (their defaults are :class:`~preprocess.options.RecordOptions`'s, so eval and training never diverge)."""

    stage: str
    seq_len: int
    batch_size: int = 8
    overlong: str = _RECORD_DEFAULTS.overlong
    skip_bad: bool = _RECORD_DEFAULTS.skip_bad
    tag_weight: int = _RECORD_DEFAULTS.tag_weight
    ref: str | None = None  # dpo: the reference checkpoint
    max_record_chars: int = _RECORD_DEFAULTS.max_record_chars
    parse_special: bool = _RECORD_DEFAULTS.parse_special
    chat_template: str | None = _RECORD_DEFAULTS.chat_template
    drop_empty_think: float = _RECORD_DEFAULTS.drop_empty_think
    add_system_prompt: float = _RECORD_DEFAULTS.add_system_prompt
    augment_seed: int = _RECORD_DEFAULTS.augment_seed
    hold_out_every: int = _RECORD_DEFAULTS.hold_out_every
    held_out_only: bool = _RECORD_DEFAULTS.held_out_only

    def record_options(self) -> RecordOptions:
        return RecordOptions(**{f.name: getattr(self, f.name) for f in fields(RecordOptions)})


def default_stage(loaded: LoadedModel) -> str | None:
    """The checkpoint's own stage when it is one that packed data can be evaluated for."""
    stage = loaded.checkpoint.stage
    return stage if stage in EVAL_STAGES else None


def default_seq_len(loaded: LoadedModel) -> int:
    """The row length the checkpoint was loaded on, else 512 (capped by the model's context)."""
    seq = (loaded.checkpoint.data.seq_len if loaded.checkpoint.data else None) or 512
    return min(int(seq), loaded.config.max_position_embeddings)


def pack_jsonl(files: list[str], stage: str, tokenizer: Path, out: Path, opts: DataOptions, quiet: bool) -> dict:
    """Pack ``files`` for ``stage`` into ``out`` with ``preprocess.pack.pack`` (pack.py's own pipeline and
    record options); its warnings go to stderr; returns the meta.json. Pack's errors (TinyLMError, one
    line naming the file) pass through unchanged."""
    from preprocess.pack import PackOptions, pack

    for f in files:
        if not Path(f).is_file():
            raise ToolError(f"{f}: no such data file")
    result = pack(PackOptions(stage, list(files), out, str(tokenizer), opts.seq_len, workers=1, quiet=True,
                              records=opts.record_options()))
    for warning in result.warnings:
        print(f"bin/eval: warning: {warning}", file=sys.stderr)
    return result.meta


def held_out_metrics(loaded: LoadedModel, files: list[str], opts: DataOptions, device: torch.device,
                     quiet: bool = False) -> dict[str, Any]:
    """Pack ``files`` and evaluate every row with the stage's eval sums; returns the results record part."""
    if opts.stage not in EVAL_STAGES:
        raise ToolError(f"--stage {opts.stage}: must be one of {', '.join(EVAL_STAGES)}")
    if opts.seq_len > loaded.config.max_position_embeddings:
        raise ToolError(f"--seq-len {opts.seq_len} > the model's max_position_embeddings "
                        f"{loaded.config.max_position_embeddings}")
    model = loaded.model.to(device)
    with tempfile.TemporaryDirectory(prefix="tinylm-eval-") as tmp:
        meta = pack_jsonl(files, opts.stage, loaded.tokenizer.path, Path(tmp) / "packed", opts, quiet)
        if opts.stage == "dpo":
            ref = opts.ref or _recorded_reference(loaded)
            if ref is None:
                raise ToolError("dpo evaluation needs a reference model: --ref CKPT (usually the SFT run)")
            stage = build_stage("dpo", online_ref=True, ref_from=ref)
        else:
            table = torch.from_numpy(token_byte_lengths(loaded.tokenizer.path, loaded.config.vocab_size))
            stage = build_stage(opts.stage, byte_lengths=table)
        dataset = stage.open_dataset(str(Path(tmp) / "packed"), loaded.tokenizer.fingerprint)
        if dataset.n_rows == 0:
            raise ToolError(f"{', '.join(files)}: no rows of {opts.seq_len} tokens (too little data for "
                            f"--seq-len {opts.seq_len})")
        stage.setup(StageContext(dataset=dataset, device=device, say=lambda *a, **k: None, moe=loaded.config.is_moe))
        for extra in stage.extra_models().values():
            extra.to(device).eval()
        loader = stage.loader(AllRows(dataset), opts.batch_size, 0, 1, 0, False)
        started = time.perf_counter()
        raw = evaluate(model, stage, loader, device, contextlib.nullcontext())
        metrics = {k.removeprefix("val_"): v for k, v in raw.items()}
        if opts.stage != "dpo":
            metrics["perplexity"] = math.exp(metrics["loss"]) if metrics["loss"] < 700 else float("inf")
        counts = meta.get("counts", {})
        return {"data": [str(f) for f in files], "stage": opts.stage, "seq_len": opts.seq_len,
                "rows": int(dataset.n_rows), "records": {k: v for k, v in counts.items() if k != "tokens"},
                "metrics": metrics, "eval_seconds": round(time.perf_counter() - started, 3)}


def _recorded_reference(loaded: LoadedModel) -> str | None:
    """The run's DPO reference, else the checkpoint it started from."""
    record = loaded.checkpoint.reference or loaded.checkpoint.init_from
    return record.path if record is not None else None


# ---- prompts -------------------------------------------------------------------------------------------

def answer_prompts(loaded: LoadedModel, prompts_file: str | Path, answers: Path, device: torch.device,
                   max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0,
                   quiet: bool = False) -> dict[str, Any]:
    """Answer every prompt; write ``answers`` (JSONL, atomically); returns the results record part. Every
    prompt is tokenized first: one the tokenizer refuses or that fills the model's context is refused
    (``file:line`` and the lengths) before anything is generated."""
    prompts = read_prompts(prompts_file)
    info = loaded.tokenizer
    all_ids = [tokenize(p, info, loaded.config.max_position_embeddings) for p in prompts]
    model = loaded.model.to(device)
    stops = loaded.stop_ids
    generator = torch.Generator(device=device).manual_seed(seed)
    lines, new_tokens, started = [], 0, time.perf_counter()
    for p, ids in tqdm(list(zip(prompts, all_ids, strict=True)), desc="answer", unit="prompt", disable=quiet,
                       dynamic_ncols=True):
        out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, stop_ids=stops,
                       generator=generator)
        new_tokens += len(out)
        record = {"conversations": p.turns, "answer": info.tokenizer.decode(out, skip_special_tokens=True).strip(),
                  "answer_tokens": len(out)}
        if p.columns.get(REFERENCE) is not None:
            record["reference"] = p.columns[REFERENCE]
        lines.append(json.dumps(record, ensure_ascii=False))
    atomic_write_text(check_file_target(answers, "answers file"), "".join(line + "\n" for line in lines))
    return {"prompts": str(prompts_file), "answers": str(answers), "n_prompts": len(prompts),
            "answer_tokens": new_tokens, "temperature": temperature, "max_new_tokens": max_new_tokens,
            "answer_seconds": round(time.perf_counter() - started, 3)}


@dataclass(frozen=True)
class RewardOptions:
    """``bin/eval --reward``: the reward specs, samples per prompt, k, success threshold and sampling."""

    specs: tuple[str, ...]
    samples: int = GRPOOptions.group_size
    k: int | None = None  # default: samples
    threshold: float = GRPOOptions.success_threshold
    temperature: float = GRPOOptions.rollout_temperature
    top_k: int | None = None
    max_new_tokens: int = GRPOOptions.max_new_tokens
    seed: int = RunOptions.seed  # train/run.py's default: the same samples as a run's --eval-prompts evaluation
    batch: int = GRPOOptions.prompts_per_step  # prompts per generation batch
    rollout_dtype: str = GRPOOptions.rollout_dtype  # the decode matmuls' precision
    reward_models: tuple[str, ...] = ()  # --reward-model DIR[@W] (train/reward_model.py)
    reward_norm: str = GRPOOptions.reward_norm
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.rollout_dtype not in ROLLOUT_DTYPES:
            raise ToolError(f"--rollout-dtype is one of {', '.join(ROLLOUT_DTYPES)}, got {self.rollout_dtype!r}")
        for spec in self.reward_models:
            parse_spec(spec)  # a folder that is not a reward model fails before the policy is loaded


def reward_metrics(loaded: LoadedModel, prompts_file: str | Path, opts: RewardOptions, device: torch.device,
                   quiet: bool = False) -> dict[str, Any]:
    """pass@1 / pass@k (sampled), greedy pass@1 and mean reward of the prompts; the results record part."""
    rewards = load_rewards(list(opts.specs)) if opts.specs or not opts.reward_models else []
    rewards += reward_models(opts.reward_models, device, opts.trust_remote_code, opts.reward_norm)
    k = opts.k or opts.samples
    if not 1 <= k <= opts.samples:
        raise ToolError(f"--pass-k {k} must be in [1, --samples {opts.samples}]")
    prompts = PromptSet(prompts_file)
    prompts.attach(loaded.tokenizer, opts.max_new_tokens, loaded.config.max_position_embeddings)
    model = loaded.model.to(device)
    cfg = RolloutConfig(opts.samples, opts.batch, opts.max_new_tokens, opts.temperature, opts.top_k,
                        GRPOOptions.rollout_reuse, GRPOOptions.scale_rewards, GRPOOptions.mask_truncated, opts.seed,
                        ROLLOUT_DTYPES[opts.rollout_dtype])
    passing = PassConfig(opts.samples, k, opts.threshold)
    totals: dict[str, float] = {}
    started = time.perf_counter()
    chunks = range(0, prompts.n_rows, opts.batch)
    for lo in tqdm(chunks, desc="reward", unit="batch", disable=quiet, dynamic_ncols=True):
        sums = pass_sums(model, prompts, range(lo, min(lo + opts.batch, prompts.n_rows)), loaded.tokenizer, rewards,
                         cfg, passing)
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return {"prompts": str(prompts_file), "rewards": [r.spec for r in rewards], "samples": opts.samples,
            "success_threshold": opts.threshold, "temperature": opts.temperature,
            "max_new_tokens": opts.max_new_tokens, "rollout_dtype": opts.rollout_dtype,
            "reward_metrics": pass_metrics(totals, k, prefix=""),
            "reward_seconds": round(time.perf_counter() - started, 3)}


# ---- results -------------------------------------------------------------------------------------------

def append_result(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line, whole or not at all (``core.files.append_line``: a full disk leaves the file as
    it was); FileWriteError names the file."""
    check_file_target(path, "results file")
    append_line(path, json.dumps(record, ensure_ascii=False, allow_nan=True))


def run_eval(loaded: LoadedModel, data: list[str] | None, opts: DataOptions | None, prompts: str | None,
             answers: Path | None, results: Path, device: torch.device, gen: dict[str, Any] | None = None,
             quiet: bool = False, say: Callable[[str], None] = print,
             rewards: RewardOptions | None = None) -> dict[str, Any]:
    """Held-out metrics and/or prompt answers for one checkpoint; appends and returns the results record.

    The output paths are checked first (their folders created, a folder in a file's place refused), so an
    unwritable ``results`` / ``answers`` fails before the evaluation runs, not after."""
    check_file_target(results, "results file")
    if prompts and answers is not None:
        check_file_target(answers, "answers file")
    record: dict[str, Any] = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "ckpt": loaded.checkpoint.path, "step": loaded.checkpoint.step,
                              "ckpt_stage": loaded.checkpoint.stage}
    if data:
        assert opts is not None
        record.update(held_out_metrics(loaded, data, opts, device, quiet))
    if prompts and rewards is not None:
        record.update(reward_metrics(loaded, prompts, rewards, device, quiet))
    elif prompts:
        answers = answers or loaded.run_folder / f"answers_{Path(prompts).stem}.jsonl"
        record.update(answer_prompts(loaded, prompts, answers, device, quiet=quiet, **(gen or {})))
    append_result(results, record)
    return record
