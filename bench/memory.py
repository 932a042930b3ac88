"""Peak memory and step time of one training step: old code path vs new, with and without checkpointing.

Each arm runs in a fresh subprocess (so peak RSS, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, is the
arm's own): build the model, take the first ``--batch`` rows of a packed SFT folder as ONE micro-batch,
and run ``--steps`` optimizer steps (``stage.loss`` + backward + AdamW, as ``train/loop.py`` does).
Arms (``--arms``, comma-separated; default all):

- ``before``: the code of commit ``--base`` (default: git main's e2d95ce), exported with ``git archive``
  into a temporary folder and imported from there (full [B, T, V] logits, dense packed mask);
- ``default``: this checkout as ``train/run.py`` runs it by default (glibc's default malloc);
- ``release``: this checkout as ``train/run.py --release-memory`` runs it (``train.memory.return_freed_memory()``
  first: freed memory returned to the OS at once);
- ``ckpt``: this checkout with per-block activation checkpointing and glibc's default malloc
  (``--activation-checkpointing --no-release-memory``);
- ``ckpt+release``: both (``--activation-checkpointing`` alone: it implies ``--release-memory``).

Arms alternate for ``--repeats`` rounds; the table prints medians (and the spread of step times): wall
seconds and the process's CPU seconds per step (``time.process_time``; less sensitive to other load
than wall time, but a shared machine still slows both). Peak RSS is robust to other load.
Usage: ``python bench/memory.py [--preset small] [--model-arg k=v ...] [--batch 16] [--seq 512] [--arms ...]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"before": (False, False), "default": (False, False), "release": (False, True), "ckpt": (True, False),
        "ckpt+release": (True, True)}
"""arm -> (activation checkpointing, return freed memory); "before" runs the --base commit's code."""

CHILD = r"""
import json, resource, sys, time
root, folder, preset, overrides, batch, steps, ckpt, malloc, ab = sys.argv[1:10]
sys.path.insert(0, root)
if malloc == "1":  # what train/run.py does first
    from train.memory import return_freed_memory
    assert return_freed_memory()
import numpy as np
import torch
from model import ModelConfig, TinyLM
from train.data import PackedDataset
from train.stages import StepNorm, build_stage

torch.manual_seed(0)
dataset = PackedDataset(folder, verify=False)
cfg = ModelConfig.from_preset(preset).override(json.loads(overrides))
model = TinyLM(cfg).train()
if ckpt == "1":
    model.activation_checkpointing = True
stage = build_stage("sft")
mb = dataset.collate(np.arange(int(batch)))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
norm = StepNorm(stage.count(mb).float().clamp(min=1.0), 1)
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times, cpu, losses, labels = [], [], [], []
if ab == "1":
    import model.lean_autograd as lean
for i in range(int(steps)):
    if ab == "1":  # lean, plain, plain, lean, ...
        lean.ENABLED = i % 4 in (0, 3)
        labels.append("lean" if lean.ENABLED else "plain")
    start, start_cpu = time.perf_counter(), time.process_time()
    loss, _ = stage.loss(model, mb, norm)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
    losses.append(loss.item())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_kb": peak, "base_kb": base_rss, "times": times, "cpu": cpu, "losses": losses, "labels": labels,
                  "params": model.num_params(), "tokens": int(mb.input_ids.numel()),
                  "supervised": int(stage.count(mb))}))
"""


def export_commit(commit: str, dest: Path) -> Path:
    """The files of ``commit`` under ``dest`` (``git archive | tar -x``): importable old code, no worktree."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def pack_sft(seq: int, dest: Path) -> Path:
    """The shipped SFT sample packed at ``seq`` (rows of whole conversations) into ``dest``."""
    subprocess.run([sys.executable, str(ROOT / "preprocess" / "pack.py"), "--stage", "sft", "--out", str(dest),
                    "--seq-len", str(seq), "--workers", "1", "--quiet"], check=True, cwd=ROOT,
                   stderr=subprocess.DEVNULL)
    return dest


def run_arm(root: Path, folder: Path, args: argparse.Namespace, ckpt: bool, malloc: bool,
            steps: int | None = None, ab: bool = False) -> dict:
    """One fresh process: its peak RSS, step times and losses (JSON on its last stdout line). ``ab``: the
    steps alternate lean / plain autograd (``model.lean_autograd.ENABLED``), labelled in ``labels``."""
    overrides = json.dumps(args.model_arg)
    out = subprocess.run([sys.executable, "-c", CHILD, str(root), str(folder), args.preset, overrides,
                          str(args.batch), str(steps or args.steps), "1" if ckpt else "0", "1" if malloc else "0",
                          "1" if ab else "0"], check=True, capture_output=True, text=True, cwd=root)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="ModelConfig override, repeatable (train.sh: hidden_size=256 num_hidden_layers=4)")
    ap.add_argument("--batch", type=int, default=16, help="rows of the one micro-batch")
    ap.add_argument("--seq", type=int, default=512, help="packed row length")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per arm (time: median of them)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds over all arms (alternating)")
    ap.add_argument("--base", default="e2d95ce", help="commit of the 'before' arm")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    ap.add_argument("--ab", type=int, default=0, metavar="ROUNDS",
                    help="instead: step time of lean vs plain autograd in ONE process (default malloc), ROUNDS "
                         "rounds of lean, plain, plain, lean steps after one warm-up step of each")
    args = ap.parse_args()
    if args.ab:
        with tempfile.TemporaryDirectory(prefix="tinylm_mem_") as tmp:
            result = run_arm(ROOT, pack_sft(args.seq, Path(tmp) / "sft"), args, False, False, 4 * args.ab + 2, True)
        print_ab(result, args)
        return
    names = args.arms.split(",")
    unknown = sorted(set(names) - set(ARMS))
    if unknown or not names:
        ap.error(f"unknown arm(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(ARMS)}")

    with tempfile.TemporaryDirectory(prefix="tinylm_mem_") as tmp:
        old = export_commit(args.base, Path(tmp) / "before") if "before" in names else ROOT
        folder = pack_sft(args.seq, Path(tmp) / "sft")
        results: dict[str, list[dict]] = {name: [] for name in names}
        for _ in range(args.repeats):
            for name in names:
                ckpt, malloc = ARMS[name]
                results[name].append(run_arm(old if name == "before" else ROOT, folder, args, ckpt, malloc))
    print_table(results, args)


def print_ab(result: dict, args: argparse.Namespace) -> None:
    """Median wall and CPU seconds of the lean and the plain steps of one process (warm-up steps dropped)."""
    print(f"preset {args.preset} {' '.join(args.model_arg)}, one micro-batch {args.batch} x {args.seq}, "
          f"{args.ab} rounds of lean / plain / plain / lean steps in one process (after 1 warm-up step each)")
    rows = {}
    for arm in ("plain", "lean"):
        picked = [i for i, label in enumerate(result["labels"]) if label == arm and i >= 2]
        rows[arm] = (statistics.median(result["times"][i] for i in picked),
                     statistics.median(result["cpu"][i] for i in picked), len(picked))
    print(f"\n{'autograd':<10}{'steps':>7}{'step s':>9}{'x plain':>9}{'cpu s':>8}{'x plain':>9}")
    for arm, (wall, cpu, n) in rows.items():
        print(f"{arm:<10}{n:>7}{wall:>9.2f}{wall / rows['plain'][0]:>9.3f}{cpu:>8.2f}{cpu / rows['plain'][1]:>9.3f}")


def print_table(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    """One row per arm: median peak RSS, wall and CPU seconds per step, each also relative to the first arm."""
    first_name = next(iter(results))
    first = results[first_name][0]
    print(f"preset {args.preset} {' '.join(args.model_arg)} ({first['params'] / 1e6:.1f}M params), one micro-batch "
          f"{args.batch} x {args.seq} ({first['supervised']:,} of {first['tokens']:,} positions supervised), "
          f"{args.steps} steps per arm, {args.repeats} fresh processes per arm, base {args.base}")

    def medians(runs: list[dict]) -> tuple[float, float, float, list[float]]:
        wall = [statistics.median(r["times"]) for r in runs]
        return (statistics.median(r["peak_kb"] for r in runs), statistics.median(wall),
                statistics.median(statistics.median(r["cpu"]) for r in runs), wall)

    ref_peak, ref_wall, ref_cpu, _ = medians(results[first_name])
    print(f"\n{'arm':<14}{'peak RSS GB':>13}{'x ' + first_name:>12}{'step s':>9}{'spread s':>15}"
          f"{'x ' + first_name:>12}{'cpu s':>8}{'x ' + first_name:>12}{'loss step 1':>13}")
    for name, runs in results.items():
        peak, wall, cpu, spread = medians(runs)
        print(f"{name:<14}{peak / 1e6:>13.2f}{peak / ref_peak:>12.2f}{wall:>9.2f}"
              f"{f'{min(spread):.2f}-{max(spread):.2f}':>15}{wall / ref_wall:>12.2f}{cpu:>8.2f}{cpu / ref_cpu:>12.2f}"
              f"{runs[0]['losses'][0]:>13.4f}")
    print("peak RSS: ru_maxrss of the arm's own process (GB = 1e6 kB); step s: wall, cpu s: process CPU time, "
          "medians; both vary with other load.")


if __name__ == "__main__":
    main()
