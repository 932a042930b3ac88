#!/usr/bin/env python3
"""GRPO on the "shorter completions score higher" task: each --loss with and without --scale-rewards.

    OUT_DIR=/tmp/study PYTHON=.venv/bin/python SKIP_CHAT=1 SKIP_EVAL=1 SKIP_REPORT=1 bash train.sh --smoke
    OMP_NUM_THREADS=1 .venv/bin/python bench/grpo_study.py --ckpt /tmp/study/sft
    OMP_NUM_THREADS=1 .venv/bin/python bench/grpo_study.py --ckpt /tmp/study/sft --max-new-tokens 128 \\
        --arms dapo/group --arm "lr 1e-2=--loss dapo --lr 1e-2"

The task: the reward of a completion is ``-len(text) / 50`` (:func:`shorter`, a TRL-style reward: minus its
length in units of 50 characters, the text as reward functions see it). Each arm is one real run of
``train/run.py --stage grpo`` from --ckpt on the prompts of --prompts (default: the SFT sample's alpaca
records; their final assistant turn is the unseen ``reference`` column), --steps steps, --lr, --group-size
G, --prompts-per-step P, --max-new-tokens L, --seed; every other flag is the stage's default unless an arm
sets it. Arms: ``--arms LOSS/SCALE,...`` (default every ``--loss`` x ``--scale-rewards group|none``) and
``--arm "LABEL=FLAGS"`` (repeatable, extra train/run.py flags). Runs are deterministic given the seeds;
``--jobs`` runs arms side by side.

The table, per arm, from metrics.jsonl: mean reward of the first 5 and last 5 steps and their difference Δ
(the issue's target: Δ >= 0.2), the mean completion length in tokens (first 5 / last 5), the fraction of
completions cut at --max-new-tokens (first 5 / last 5), the sampling entropy (first step / last step, nats),
the mean grad norm before the clip (--grad-clip 1.0), and the fraction of completions in a group whose
rewards are all equal (zero advantage, no gradient). ``--json FILE`` also writes every arm's per-step
records.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHARS = 50  # the reward's unit: one point per 50 characters
WINDOW = 5  # steps averaged at each end
LOSSES = ("dapo", "grpo", "dr_grpo", "cispo")
SCALES = ("group", "none")


def shorter(prompts: list, completions: list, **_: Any) -> list[float]:
    """Minus the completion's length in characters / 50 (shorter scores higher)."""
    return [-len(c[0]["content"]) / CHARS for c in completions]


def add_task_args(p: argparse.ArgumentParser) -> None:
    """The length task's settings, shared with bench/rl_compare.py: the SFT model, prompts and run shape."""
    p.add_argument("--ckpt", required=True, help="the SFT model to start from")
    p.add_argument("--prompts", default=str(ROOT / "data" / "sample" / "sft" / "alpaca_zh_demo.jsonl"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", default="1e-3")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=1337)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(p)
    p.add_argument("--arms", default=",".join(f"{loss}/{scale}" for loss in LOSSES for scale in SCALES),
                   help="LOSS/SCALE pairs, comma-separated (default: all); empty for none")
    p.add_argument("--arm", action="append", default=[], metavar="LABEL=FLAGS",
                   help="an extra arm: its label and train/run.py flags (repeatable)")
    p.add_argument("--jobs", type=int, default=1, help="arms run at once (default 1)")
    p.add_argument("--json", help="write every arm's per-step records here")
    p.add_argument("--keep", help="keep the run folders under this folder (default: a temporary one)")
    args = p.parse_args()
    if args.steps < 2 * WINDOW:
        p.error(f"--steps must be >= {2 * WINDOW}")
    return args


def arms(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(label, extra flags) per arm."""
    out = []
    for pair in filter(None, args.arms.split(",")):
        loss, _, scale = pair.partition("/")
        if loss not in LOSSES or scale not in SCALES:
            raise SystemExit(f"grpo_study: error: --arms {pair!r}: LOSS/SCALE with LOSS in {LOSSES}, SCALE in {SCALES}")
        out.append((f"{loss} / {scale}", ["--loss", loss, "--scale-rewards", scale]))
    for spec in args.arm:
        label, sep, flags = spec.partition("=")
        if not sep or not label:
            raise SystemExit(f"grpo_study: error: --arm {spec!r}: LABEL=FLAGS")
        out.append((label, shlex.split(flags)))
    return out


def run_arm(args: argparse.Namespace, folder: Path, index: int, flags: list[str]) -> list[dict]:
    """One training run; its per-step metric records (steps with rollouts)."""
    out = folder / f"arm{index}"
    cmd = [sys.executable, str(ROOT / "train" / "run.py"), "--stage", "grpo", "--prompts", args.prompts,
           "--init-from", args.ckpt, "--out", str(out), "--reward", f"{Path(__file__).resolve()}:shorter",
           "--group-size", str(args.group_size), "--prompts-per-step", str(args.prompts_per_step),
           "--max-new-tokens", str(args.max_new_tokens), "--lr", args.lr, "--max-steps", str(args.steps),
           "--seed", str(args.seed), "--log-every", "1", "--save-every", "0", "--no-progress", *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"grpo_study: error: arm {index} failed:\n{shlex.join(cmd)}\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    return [r for r in records if "reward" in r]


def mean(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


def row(label: str, steps: list[dict]) -> str:
    first, last = steps[:WINDOW], steps[-WINDOW:]
    r0, r1 = mean(first, "reward"), mean(last, "reward")
    return (f"| {label} | {r0:.3f} | {r1:.3f} | {r1 - r0:+.3f} | {mean(first, 'completion_len'):.1f} | "
            f"{mean(last, 'completion_len'):.1f} | {mean(first, 'truncated_frac'):.2f} | "
            f"{mean(last, 'truncated_frac'):.2f} | {steps[0]['entropy']:.2f} → {steps[-1]['entropy']:.2f} | "
            f"{mean(steps, 'grad_norm'):.3f} | {mean(steps, 'frac_reward_zero_std'):.2f} |")


def main() -> None:
    args = parse_args()
    todo = arms(args)
    with tempfile.TemporaryDirectory(prefix="tinylm-grpo-study-") as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results = list(pool.map(lambda item: run_arm(args, folder, item[0], item[1][1]), enumerate(todo)))
    print(f"\nGRPO, reward -chars/{CHARS} ({Path(args.ckpt).name}, {args.prompts_per_step} prompts x "
          f"{args.group_size} samples, <= {args.max_new_tokens} new tokens, {args.steps} steps, lr {args.lr}, "
          f"seed {args.seed}; first / last {WINDOW} steps)")
    print("| arm | reward first | reward last | Δ | len first | len last | cut first | cut last | entropy | "
          "grad norm | zero-std |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (label, _), steps in zip(todo, results, strict=True):
        print(row(label, steps))
    if args.json:
        Path(args.json).write_text(json.dumps({label: steps for (label, _), steps in zip(todo, results, strict=True)}),
                                   encoding="utf-8")


if __name__ == "__main__":
    main()
