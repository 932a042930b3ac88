"""The GPU check's recipe rows: ``RECIPE=minimind3-mini bash train.sh`` for a fixed number of steps on a slice of
realistic data, and (given a MiniMind checkout) MiniMind's own pretrain trainer on the same file, GPU and minutes.

Contract: :func:`recipe_rows` returns table rows ``(check, status, value, note)`` as ``bench/gpu_check.py``
prints them; it never raises for a failed run (the row says FAIL with the last line of its output). Figures
come from the runs' own logs: tinylm's ``metrics.jsonl`` (tokens/s and MFU as the loop measured them, after the
first steps that include compilation; ``max_memory_gb`` when the loop logged it), MiniMind's ``Epoch:[…](step/
iters), loss: …`` lines, timestamped as they arrive (its tokens/s counts padded slots: batch x max_seq_len).

The slice: ``--recipe-data DIR`` holding ``pretrain_t2t_mini.jsonl`` and ``sft_t2t_mini.jsonl`` (make one from
any JSONL with :func:`make_slice`, e.g. from ``../shared/data`` into a git-ignored folder that the device run
carries), else one assembled from the shipped ``data/sample``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
Row = tuple[str, str, str, str]
_MINIMIND_LOG = re.compile(r"\((\d+)/(\d+)\), loss: ([0-9.]+)")


def make_slice(out: Path, pretrain: list[Path], sft: list[Path], max_bytes: int) -> Path:
    """``out/pretrain_t2t_mini.jsonl`` and ``out/sft_t2t_mini.jsonl``: whole lines of the given files, in order,
    up to ``max_bytes / 2`` each (so a slice stays within what a device run carries)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, files in (("pretrain_t2t_mini.jsonl", pretrain), ("sft_t2t_mini.jsonl", sft)):
        budget = max_bytes // 2
        with (out / name).open("wb") as dst:
            for file in files:
                for line in file.open("rb"):
                    if len(line) > budget:
                        break
                    dst.write(line if line.endswith(b"\n") else line + b"\n")
                    budget -= len(line)
    return out


def sample_slice(out: Path) -> Path:
    sample = ROOT / "data" / "sample"
    return make_slice(out, sorted((sample / "pretrain").glob("*.jsonl")),
                      sorted((sample / "sft").glob("*.jsonl")) + sorted((sample / "tools").glob("*.jsonl")),
                      max_bytes=1 << 30)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()] if path.exists() else []


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def stage_rows(name: str, run: Path, wall: float) -> list[Row]:
    """One row of throughput and one of the loss curve from a finished run's ``metrics.jsonl``."""
    records = _records(run / "metrics.jsonl")
    steps = [r for r in records if "loss" in r and "tokens_per_s" in r]
    if not steps:
        return [(f"recipe:{name}", "FAIL", "-", f"no step records in {run / 'metrics.jsonl'}")]
    timed = steps[max(1, len(steps) // 5):] or steps  # the first steps include torch.compile
    speed = _median([r["tokens_per_s"] for r in timed])
    mfu = [r["mfu"] for r in timed if "mfu" in r]
    memory = max((r["max_memory_gb"] for r in records if "max_memory_gb" in r), default=None)
    value = f"{speed:,.0f} tok/s" + (f", MFU {_median(mfu):.1%}" if mfu else "")
    note = f"{steps[-1]['step']} steps in {wall:.0f} s" + (f", peak {memory:.1f} GB" if memory else "")
    val = [r for r in records if "val_loss" in r]
    curve = " ".join(f"{r['step']}:{r['loss']:.2f}" for r in steps[:: max(1, len(steps) // 8)])
    if steps[-1] is not steps[:: max(1, len(steps) // 8)][-1]:
        curve += f" {steps[-1]['step']}:{steps[-1]['loss']:.2f}"
    val_note = f"val {val[-1]['val_loss']:.3f} at step {val[-1]['step']}" if val else "no validation"
    return [(f"recipe:{name}", "ok", value, note), (f"recipe:{name}:loss", "ok", curve, val_note)]


def run_recipe(slice_dir: Path, out: Path, cuda: bool, steps: tuple[int, int], timeout: int) -> tuple[list[Row], float]:
    """The minimind3-mini recipe on ``slice_dir``: pretrain then SFT for ``steps``; rows and pretrain seconds."""
    env = {**os.environ, "RECIPE": "minimind3-mini", "MINIMIND_DATA": str(slice_dir), "OUT_DIR": str(out),
           "PYTHON": sys.executable, "PRETRAIN_STEPS": str(steps[0]), "SFT_STEPS": str(steps[1]),
           "SKIP_CHAT": "1", "SKIP_EVAL": "1", "PYTHONUNBUFFERED": "1",
           "PRETRAIN_ARGS": f"--log-every 5 --eval-every {steps[0]}",
           "SFT_ARGS": f"--log-every 5 --eval-every {steps[1]}"}
    if not cuda:  # CPU mode: the same commands at toy scale
        env.update(MODEL="tiny", SEQ_LEN="128", RECIPE_ROWS_PRETRAIN="8", RECIPE_ROWS_SFT="8", MICRO_BATCH="8")
    start = time.perf_counter()
    try:
        proc = subprocess.run(["bash", str(ROOT / "train.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return [("recipe", "FAIL", "-", f"train.sh ran past {timeout} s")], 0.0
    wall = time.perf_counter() - start
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["?"])[-1]
        return [("recipe", "FAIL", "-", " ".join(last.split())[:160])], 0.0
    rows: list[Row] = []
    seconds = {}
    for stage in ("pretrain", "sft"):
        run = out / "minimind3-mini" / stage
        records = _records(run / "metrics.jsonl")
        seconds[stage] = sum(r.get("step_time_s", 0.0) for r in records if "loss" in r)
        rows += stage_rows(stage, run, seconds[stage])
    final = out / "minimind3-mini" / "final"
    rows.append(("recipe:final", "ok" if final.exists() else "FAIL", str(final.name),
                 f"train.sh in {wall:.0f} s wall (packing and start-up included)"))
    return rows, seconds["pretrain"]


def run_minimind(checkout: Path, slice_dir: Path, seconds: float, cuda: bool, work: Path,
                 startup_limit: float = 300.0) -> list[Row]:
    """MiniMind's ``trainer/train_pretrain.py`` on the same pretrain file for ``seconds``, its defaults otherwise
    (hidden 768, 8 layers, batch 32; max_seq_len 768 as tinylm's rows), counted from its first logged step, then
    stopped; a copy of the checkout is used so that its ``../out`` and ``../checkpoints`` land in ``work``. It needs
    MiniMind's own requirements (transformers, datasets) importable by this Python."""
    copy = work / "minimind"
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git", "out", "checkpoints"))
    batch, seq = (32, 768) if cuda else (4, 128)
    shape = ["--hidden_size", "768", "--num_hidden_layers", "8"] if cuda else ["--hidden_size", "64",
                                                                                "--num_hidden_layers", "2"]
    cmd = [sys.executable, "train_pretrain.py", "--data_path", str(slice_dir / "pretrain_t2t_mini.jsonl"),
           "--save_dir", str(work / "minimind_out"), "--epochs", "1", "--batch_size", str(batch),
           "--accumulation_steps", "4" if cuda else "1", "--max_seq_len", str(seq), "--log_interval", "5",
           "--save_interval", "100000000", "--from_weight", "none", "--use_compile", "1" if cuda else "0",
           "--device", "cuda:0" if cuda else "cpu", "--dtype", "bfloat16" if cuda else "float32", *shape]
    seen: list[tuple[float, int, float]] = []
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=copy / "trainer", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    tail: list[str] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            tail = (tail + [line.strip()])[-3:]
            match = _MINIMIND_LOG.search(line)
            if match:
                seen.append((time.perf_counter() - start, int(match.group(1)), float(match.group(3))))
            # its training time is matched from its first logged step (start-up and data loading excluded)
            if seen and time.perf_counter() - start > seen[0][0] + seconds:
                break
            if not seen and time.perf_counter() - start > startup_limit:
                break
    finally:
        proc.kill()
        proc.wait()
    if len(seen) < 2:
        return [("minimind:pretrain", "FAIL", "-", " ".join(" | ".join(tail).split())[:160])]
    (t0, s0, _), (t1, s1, _) = seen[len(seen) // 5], seen[-1]
    slots = batch * seq * (s1 - s0) / max(t1 - t0, 1e-9)  # per micro-batch step (MiniMind logs micro-steps)
    curve = " ".join(f"{s}:{loss:.2f}" for _, s, loss in seen[:: max(1, len(seen) // 8)])
    return [("minimind:pretrain", "ok", f"{slots:,.0f} padded tok/s",
             f"{seen[-1][1]} micro-steps of {batch}x{seq}, {seen[-1][0] - seen[0][0]:.0f} s after its first log "
             "(tinylm's pretrain time)"),
            ("minimind:pretrain:loss", "ok", curve, "its own loss (padding excluded), same file")]


def recipe_rows(cuda: bool, data: Path | None, minimind: Path | None, work: Path, steps: tuple[int, int],
                timeout: int) -> list[Row]:
    slice_dir = data if data else sample_slice(work / "slice")
    rows, pretrain_seconds = run_recipe(slice_dir, work / "runs", cuda, steps, timeout)
    if minimind is not None:
        if pretrain_seconds <= 0:
            rows.append(("minimind:pretrain", "skip", "-", "tinylm's recipe failed: no time to match"))
        else:
            rows += run_minimind(minimind, slice_dir, pretrain_seconds, cuda, work)
    return rows
