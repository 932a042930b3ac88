#!/usr/bin/env python3
"""How much a run learns: held-out loss (``bin/eval``'s scoring) of the old defaults vs the new ones
(``train/defaults.py``), pretrain then SFT, at equal tokens and at equal wall-clock; and the LR sweep
that chose the new defaults.

    python bench/learning.py              # the comparison, each arm twice (~40 min on 2 quiet cores)
    python bench/learning.py --quick      # the same, short (a few minutes on quiet cores)
    python bench/learning.py --sweep      # LR sweep at equal tokens, train.sh's model (~15 min on quiet cores)
    python bench/learning.py --step-cost  # seconds per optimizer step, AdamW vs Muon, alternating in one process

Data: ``--data`` (default ``../shared/data``): in every pretrain/ and sft/ file record k goes to the held-out
slice when ``k % 50 == 0`` (as train.sh does), to training otherwise (at most ``train_cap`` records per
file, ``heldout_cap`` held out), packed once into ``--work``. Model: train.sh's (``small`` with
``hidden_size=256 num_hidden_layers=4``), or ``--preset small``.

Arms: ``old`` = AdamW + cosine at train.sh's LRs before the defaults table (pretrain 2e-3, SFT 1e-3);
``new`` = the table's default optimizer, LRs and schedule for the preset; ``muon`` = ``new`` with pretraining
on Muon at the table's Muon row (the candidate default: this comparison decides it). Each arm runs ``repeats`` times
(seeds 1, 2, ...): the table shows the median and the spread (max - min). Equal tokens: both arms take
the same steps. Equal wall-clock: an arm's steps are scaled by (old arm's median step time / its own), so
it gets the old arm's training time; when the factor rounds to the same steps the equal-token run is
reused, and so is any run whose settings another arm already trained (runs are named by their settings).
SFT starts from the same arm's pretrain run (equal-tokens runs for the equal-tokens row, and so on).
Step time is the median of the logged per-step times (``step_time_s``), so start-up and evaluation are out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train import defaults  # noqa: E402
from train.metrics import read_metrics  # noqa: E402

PY = sys.executable
STAGES = ("pretrain", "sft")
# train.sh before the defaults table: AdamW, cosine, these peak LRs
OLD = {"pretrain": {"optimizer": "adamw", "schedule": "cosine", "lr": 2e-3},
       "sft": {"optimizer": "adamw", "schedule": "cosine", "lr": 1e-3}}
MODEL_FLAGS = {"train.sh": ["--model", "small", "--model-arg", "hidden_size=256", "--model-arg", "num_hidden_layers=4"],
               "small": ["--model", "small"]}


@dataclass(frozen=True)
class Mode:
    seq_len: int
    steps: dict[str, int]  # per stage, at equal tokens
    batch_size: int
    train_cap: int  # training records per source file
    heldout_cap: int  # held-out records per source file
    repeats: int


FULL = Mode(512, {"pretrain": 60, "sft": 30}, 8, 4000, 40, 2)
QUICK = Mode(128, {"pretrain": 8, "sft": 4}, 8, 600, 8, 2)
SWEEP = Mode(128, {"pretrain": 20, "sft": 10}, 8, 1500, 12, 1)
# (preset, stage, optimizer) -> the LRs tried (Muon: --muon-lr; its AdamW part keeps the old --lr)
SWEEP_LRS = {("train.sh", "pretrain", "adamw"): [1e-3, 2e-3, 4e-3], ("train.sh", "pretrain", "muon"): [0.02, 0.04],
             ("train.sh", "sft", "adamw"): [1e-3, 2e-3], ("train.sh", "sft", "muon"): [0.02],
             ("small", "pretrain", "adamw"): [5e-4, 1e-3, 2e-3], ("small", "pretrain", "muon"): [0.02, 0.04],
             ("small", "sft", "adamw"): [2e-4, 1e-3, 2e-3]}
SWEEP_STEPS: dict[str, dict[str, int]] = {}  # per preset, when it differs from the mode's steps


def new_arm(stage: str, preset: str, optimizer: str | None = None) -> dict:
    """The defaults table's choice for ``stage`` on ``preset`` (its row for ``optimizer`` when given)."""
    optimizer = optimizer or defaults.OPTIMIZER[stage]
    row = defaults.lookup(stage, optimizer, preset)
    arm = {"optimizer": optimizer, "schedule": defaults.SCHEDULE, "lr": row.lr}
    return {**arm, "muon_lr": row.muon_lr} if optimizer == "muon" else arm


# ---- data ------------------------------------------------------------------------------------------------

def split_file(src: Path, train_out: Path, heldout: list[str], mode: Mode) -> None:
    """Record k of ``src``: held out when k % 50 == 0 (up to the cap), else training (up to the cap)."""
    kept, held = [], []
    with src.open(encoding="utf-8") as f:
        for k, line in enumerate(f):
            if k % 50 == 0:
                if len(held) < mode.heldout_cap:
                    held.append(line)
            elif len(kept) < mode.train_cap:
                kept.append(line)
            if len(kept) >= mode.train_cap and len(held) >= mode.heldout_cap:
                break
    train_out.write_text("".join(kept), encoding="utf-8")
    heldout.extend(held)


def prepare(data: Path, work: Path, mode: Mode) -> dict[str, tuple[Path, Path]]:
    """``{stage: (packed folder, held-out JSONL)}``, built once per ``work`` folder."""
    out = {}
    for stage in STAGES:
        packed, heldout = work / "packed" / stage, work / "heldout" / f"{stage}.jsonl"
        out[stage] = (packed, heldout)
        if (packed / "meta.json").is_file() and heldout.is_file():
            continue
        raw = work / "train" / stage
        raw.mkdir(parents=True, exist_ok=True)
        held: list[str] = []
        for src in sorted((data / stage).glob("*.jsonl")):
            split_file(src, raw / src.name, held, mode)
        heldout.parent.mkdir(parents=True, exist_ok=True)
        heldout.write_text("".join(held), encoding="utf-8")
        subprocess.run([PY, str(ROOT / "preprocess" / "pack.py"), "--stage", stage, "--input", str(raw / "*.jsonl"),
                        "--out", str(packed), "--tokenizer", str(ROOT / "data" / "tokenizer"), "--seq-len",
                        str(mode.seq_len), "--quiet"], check=True, cwd=ROOT)
    return out


# ---- runs --------------------------------------------------------------------------------------------------

def arm_flags(arm: dict) -> list[str]:
    flags = ["--optimizer", arm["optimizer"], "--schedule", arm["schedule"], "--lr", f"{arm['lr']:g}"]
    return flags + (["--muon-lr", f"{arm['muon_lr']:g}"] if "muon_lr" in arm else [])


def train_run(out: Path, stage: str, packed: Path, arm: dict, steps: int, seed: int, mode: Mode, preset: str,
              init: Path | None) -> float:
    """One training run (skipped when ``out`` already finished); returns its median step time in seconds."""
    if not (out / "metrics.jsonl").is_file() or not any(r.get("step") == steps for r in read_metrics(out)):
        source = ["--init-from", str(init)] if init is not None else MODEL_FLAGS[preset]
        cmd = [PY, str(ROOT / "train" / "run.py"), "--stage", stage, "--data", str(packed), "--out", str(out),
               "--resume", *source, "--max-steps", str(steps), "--batch-size", str(mode.batch_size), "--grad-accum",
               "1", "--seed", str(seed), "--log-every", "1", "--eval-every", "0", "--val-rows", "0", "--save-every",
               "0", "--keep-last", "1", "--no-progress", *arm_flags(arm)]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    times = [r["step_time_s"] for r in read_metrics(out) if "step_time_s" in r and r["step"] > 1]
    return statistics.median(times)


def heldout_loss(run: Path, stage: str, heldout: Path, seq_len: int) -> float:
    """``bin/eval``'s held-out loss (nats per supervised token) of ``run``'s latest checkpoint (cached)."""
    results = run / "heldout_eval.jsonl"
    if not results.is_file():
        subprocess.run([PY, str(ROOT / "bin" / "eval"), "--ckpt", str(run), "--data", str(heldout), "--stage", stage,
                        "--seq-len", str(seq_len), "--overlong", "truncate", "--quiet", "--results", str(results)],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads(results.read_text().splitlines()[-1])["metrics"]["loss"]


def median_spread(values: list[float]) -> str:
    return f"{statistics.median(values):.4f} ± {max(values) - min(values):.4f}" if len(values) > 1 \
        else f"{values[0]:.4f}"


# ---- the comparison -----------------------------------------------------------------------------------------

def compare(data: dict[str, tuple[Path, Path]], work: Path, mode: Mode, preset: str) -> list[list[str]]:
    """Rows: stage x budget (equal tokens, equal wall-clock) x arm: steps, step time, held-out loss."""
    arms = {"old": OLD, "new": {s: new_arm(s, preset) for s in STAGES}}
    arms["muon"] = {**arms["new"], "pretrain": new_arm("pretrain", preset, "muon")}
    rows: list[list[str]] = []
    init: dict[tuple[str, str, int], Path | None] = {}
    for stage in STAGES:
        packed, heldout = data[stage]
        step_time: dict[str, float] = {}
        for budget in ("tokens", "wall"):
            for name, arm in arms.items():
                steps = mode.steps[stage]
                if budget == "wall":
                    steps = max(1, round(steps * step_time["old"] / step_time[name]))
                losses, times = [], []
                for seed in range(1, mode.repeats + 1):
                    start = init.get((budget, name, seed)) if stage == "sft" else None
                    slug = describe(arm[stage]).replace(", ", "_").replace(" ", "_")  # equal arms share runs
                    out = work / "runs" / preset / (f"{stage}_{slug}_{steps}_s{seed}"
                                                    + (f"_from_{start.name}" if start is not None else ""))
                    times.append(train_run(out, stage, packed, arm[stage], steps, seed, mode, preset, start))
                    losses.append(heldout_loss(out, stage, heldout, mode.seq_len))
                    if stage == "pretrain":
                        init[(budget, name, seed)] = out
                if budget == "tokens":
                    step_time[name] = statistics.median(times)
                rows.append([stage, f"equal {budget}", name, describe(arm[stage]), str(steps),
                             f"{statistics.median(times):.3f}", median_spread(losses)])
                print(" | ".join(rows[-1]), flush=True)
    return rows


def describe(arm: dict) -> str:
    lrs = f"lr {arm['lr']:g}" + (f", muon_lr {arm['muon_lr']:g}" if "muon_lr" in arm else "")
    return f"{arm['optimizer']} {arm['schedule']} {lrs}"


# ---- the sweep -----------------------------------------------------------------------------------------------

def sweep(data: dict[str, tuple[Path, Path]], work: Path, mode: Mode, presets: list[str]) -> list[list[str]]:
    """Held-out loss after a fixed number of steps for each LR of SWEEP_LRS; SFT arms all start from the
    preset's pretrain run at the old LR (so only the SFT LR differs). Muon arms keep AdamW's part at the old LR."""
    rows = []
    for preset in presets:
        base = None
        for stage in STAGES:
            packed, heldout = data[stage]
            steps = SWEEP_STEPS.get(preset, mode.steps).get(stage)
            for optimizer in ("adamw", "muon"):
                for lr in SWEEP_LRS.get((preset, stage, optimizer), []):
                    arm = {**OLD[stage], "optimizer": optimizer}
                    if optimizer == "muon":
                        arm["muon_lr"] = lr
                    else:
                        arm["lr"] = lr
                    out = work / "sweep" / preset / f"{stage}_{optimizer}_{lr:g}_{steps}"
                    seconds = train_run(out, stage, packed, arm, steps, 1, mode, preset,
                                        base if stage == "sft" else None)
                    loss = heldout_loss(out, stage, heldout, mode.seq_len)
                    rows.append([preset, stage, optimizer, f"{lr:g}", str(steps), f"{seconds:.3f}",
                                 f"{loss:.4f}"])
                    print(" | ".join(rows[-1]), flush=True)
            if stage == "pretrain":
                base = work / "sweep" / preset / f"pretrain_adamw_{OLD['pretrain']['lr']:g}_{steps}"
    return rows


def step_cost(preset: str, seq_len: int, batch: int, repeats: int = 5) -> list[list[str]]:
    """Forward + backward and optimizer step times of one batch, AdamW and Muon alternating in this process
    (so a busy machine slows both alike); medians over ``repeats``."""
    import time

    import torch

    from model import ModelConfig, TinyLM
    from train.optim import OptimConfig, build_optimizers

    flags = MODEL_FLAGS[preset]
    overrides = {k: int(v) for k, v in (a.split("=") for a in flags[3::2])}
    torch.manual_seed(0)
    model = TinyLM(ModelConfig.from_preset(flags[1]).override(overrides))
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1))
    optimizers = {name: build_optimizers(model.named_parameters(), OptimConfig.for_stage(name))
                  for name in ("adamw", "muon")}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in optimizers}
    for _ in range(repeats):
        for name, opt in optimizers.items():
            started = time.perf_counter()
            logits = model(ids[:, :-1]).logits
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
            middle = time.perf_counter()
            opt.step(scaler)
            opt.zero_grad()
            times[name].append((middle - started, time.perf_counter() - middle))
    rows = []
    for name, pairs in times.items():
        fwd, step = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        rows.append([preset, f"{batch} x {seq_len}", name, f"{fwd:.3f}", f"{step:.3f}", f"{step / fwd:.2f}"])
    return rows


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs (a few minutes)")
    p.add_argument("--sweep", action="store_true", help="the LR sweep behind train/defaults.py")
    p.add_argument("--step-cost", action="store_true", help="optimizer step time, AdamW vs Muon, one batch")
    p.add_argument("--preset", choices=sorted(MODEL_FLAGS), default="train.sh", help="model (default train.sh's)")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="raw data with pretrain/, sft/")
    p.add_argument("--work", type=Path, help="work folder (default /tmp/tinylm_learning_<mode>)")
    args = p.parse_args(argv)
    if args.step_cost:
        rows = [r for preset, seq_len in (("train.sh", 128), ("train.sh", 512), ("small", 512))
                for r in step_cost(preset, seq_len, 8)]
        print(table(["preset", "batch", "optimizer", "fwd+bwd s", "optimizer step s", "step / fwd+bwd"], rows))
        return 0
    mode = SWEEP if args.sweep else QUICK if args.quick else FULL
    name = "sweep" if args.sweep else "quick" if args.quick else "full"
    work = args.work or Path(f"/tmp/tinylm_learning_{name}")
    data = prepare(args.data, work, mode)
    print(f"# bench/learning.py ({name}): seq_len {mode.seq_len}, batch {mode.batch_size} rows/step, "
          f"{os.cpu_count()} cpus, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}", flush=True)
    if args.sweep:
        rows = sweep(data, work, mode, [args.preset])
        print(table(["preset", "stage", "optimizer", "lr swept", "steps", "step s", "held-out loss"], rows))
    else:
        rows = compare(data, work, mode, args.preset)
        print(table(["stage", "budget", "arm", "settings", "steps", "step s", "held-out loss (median ± spread)"],
                    rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
