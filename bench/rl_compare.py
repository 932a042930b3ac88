#!/usr/bin/env python3
"""GRPO vs PPO on one task: reward against steps and wall time; and rollout tokens/s with tool execution.

    OUT_DIR=/tmp/study PYTHON=.venv/bin/python SKIP_CHAT=1 SKIP_EVAL=1 SKIP_REPORT=1 bash train.sh --smoke
    OMP_NUM_THREADS=1 .venv/bin/python bench/rl_compare.py --ckpt /tmp/study/sft
    OMP_NUM_THREADS=1 .venv/bin/python bench/rl_compare.py --ckpt /tmp/study/sft --arms "" \\
        --arm "ppo, lam 1=ppo --lam 1" --tools-steps 0

The task is ``bench/grpo_study.py``'s: reward ``-len(text) / 50`` ("shorter completions score higher"), the SFT
sample's prompts, --steps steps from --ckpt at --lr, --group-size G, --prompts-per-step P, --max-new-tokens L,
--seed. Arms: ``--arms`` (comma-separated stages, default ``grpo,ppo``: each stage's defaults) and ``--arm
"LABEL=STAGE FLAGS"`` (repeatable: extra train/run.py flags). Each arm is one real ``train/run.py`` run; the
tables, from its metrics.jsonl: the mean reward of the first and last 5 steps and their difference Δ (issue 25's
target: Δ >= 0.2), the run's wall time (process start to end) and the time inside its steps (rollouts +
training, from ``rollout_s`` + ``train_s``); then the mean reward of each block of 5 steps with the time in
steps at its end.

Tools: ``--tools-steps`` N (default 3; 0: none) steps of each stage with ``--tools builtin`` on calculator
questions (``preprocess/make_calculator.py``, 8 per step, group 4, --tools-new-tokens) from --tools-ckpt
(default: a synthetic tiny model that calls ``random_number`` after every generation prompt, so every rollout
runs tools; a real SFT model of a few steps rarely calls one), and the same run without tools: the rollouts'
generated tokens per second (``rollout_tokens_per_s``: the model's own sampled ids over the rollout wall time,
tool execution, the re-prefill of each continuation and the stage's rollout-time forward passes included) and
the tool rounds run per completion. Measured on a shared machine: the tables say so.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 5
STUDY = ROOT / "bench" / "grpo_study.py"  # its shorter() is the reward
sys.path.insert(0, str(ROOT / "bench"))

from grpo_study import add_task_args  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(p)
    p.add_argument("--arms", default="grpo,ppo", help="stages run with their defaults, comma-separated")
    p.add_argument("--arm", action="append", default=[], metavar="LABEL=STAGE FLAGS",
                   help="an extra arm: its label, stage and train/run.py flags (repeatable)")
    p.add_argument("--jobs", type=int, default=1, help="arms run at once (default 1)")
    p.add_argument("--tools-steps", type=int, default=3, help="steps of the tool-throughput runs (0: none)")
    p.add_argument("--tools-ckpt", help="the model of the tool runs (default: caller, a synthetic tiny model "
                   "that calls random_number after every generation prompt, built as tests/test_agentic.py does)")
    p.add_argument("--tools-new-tokens", type=int, default=64)
    p.add_argument("--keep", help="keep the run folders under this folder (default: a temporary one)")
    args = p.parse_args()
    if args.steps < 2 * WINDOW:
        p.error(f"--steps must be >= {2 * WINDOW}")
    return args


def arms(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(label, stage, extra flags) per arm."""
    out = [(stage, stage, []) for stage in filter(None, args.arms.split(","))]
    for spec in args.arm:
        label, sep, rest = spec.partition("=")
        words = shlex.split(rest)
        if not sep or not label or not words:
            raise SystemExit(f"rl_compare: error: --arm {spec!r}: LABEL=STAGE FLAGS")
        out.append((label, words[0], words[1:]))
    return out


def train(out: Path, stage: str, flags: list[str]) -> tuple[list[dict], float]:
    """One train/run.py run: its per-step records and its wall time."""
    cmd = [sys.executable, str(ROOT / "train" / "run.py"), "--stage", stage, "--out", str(out), "--log-every", "1",
           "--save-every", "0", "--no-progress", *flags]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"rl_compare: error: a run failed:\n{shlex.join(cmd)}\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    return [r for r in records if "reward" in r], wall


def task_flags(args: argparse.Namespace) -> list[str]:
    return ["--prompts", args.prompts, "--init-from", args.ckpt, "--reward", f"{STUDY}:shorter",
            "--group-size", str(args.group_size), "--prompts-per-step", str(args.prompts_per_step),
            "--max-new-tokens", str(args.max_new_tokens), "--lr", args.lr, "--max-steps", str(args.steps),
            "--seed", str(args.seed)]


def mean(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


def step_time(records: list[dict]) -> list[float]:
    """The time inside the steps (rollouts + training) at the end of each step."""
    total, out = 0.0, []
    for r in records:
        total += r["rollout_s"] + r["train_s"]
        out.append(total)
    return out


def task_tables(args: argparse.Namespace, todo: list[tuple[str, str, list[str]]],
                results: list[tuple[list[dict], float]]) -> None:
    print(f"\nreward -chars/50 vs steps ({Path(args.ckpt).name}, {args.prompts_per_step} prompts x {args.group_size} "
          f"samples, <= {args.max_new_tokens} new tokens, {args.steps} steps, lr {args.lr}, seed {args.seed}; "
          "measured under load on a shared 2-core CPU)")
    print("| arm | reward first 5 | reward last 5 | Δ | wall s | in steps s | s / step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (label, _, _), (steps, wall) in zip(todo, results, strict=True):
        r0, r1 = mean(steps[:WINDOW], "reward"), mean(steps[-WINDOW:], "reward")
        inside = step_time(steps)[-1]
        print(f"| {label} | {r0:.3f} | {r1:.3f} | {r1 - r0:+.3f} | {wall:.1f} | {inside:.1f} | "
              f"{inside / len(steps):.2f} |")
    blocks = range(0, args.steps, WINDOW)
    print("\nmean reward per block of steps (time in steps at the block's end, s)")
    print("| arm | " + " | ".join(f"steps {b + 1}-{b + WINDOW}" for b in blocks) + " |")
    print("|---|" + "---:|" * len(blocks))
    for (label, _, _), (steps, _) in zip(todo, results, strict=True):
        times = step_time(steps)
        cells = [f"{mean(steps[b:b + WINDOW], 'reward'):.3f} ({times[min(b + WINDOW, len(steps)) - 1]:.0f})"
                 for b in blocks]
        print(f"| {label} | " + " | ".join(cells) + " |")


def caller(folder: Path) -> Path:
    """tests/test_agentic.py's synthetic tiny model that calls ``random_number`` after every generation prompt."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from test_agentic import caller_checkpoint

    from core.tokenizer import load_tokenizer
    caller_checkpoint(folder, load_tokenizer(ROOT / "data" / "tokenizer"))
    return folder


def tool_table(args: argparse.Namespace, folder: Path) -> None:
    """Rollout tokens/s with and without --tools builtin, per stage, on calculator questions."""
    data = folder / "calculator"
    subprocess.run([sys.executable, str(ROOT / "preprocess" / "make_calculator.py"), "--out", str(data), "--train",
                    "1", "--heldout", "1", "--grpo", str(8 * (args.tools_steps + 1)), "--quiet"], check=True)
    prompts = folder / "tool_prompts.jsonl"  # the questions alone: --tools builtin offers the built-in set
    records = [json.loads(line) for line in (data / "grpo.jsonl").read_text(encoding="utf-8").splitlines()]
    prompts.write_text("".join(json.dumps({"conversations": r["conversations"], "gt": r["gt"]}) + "\n"
                               for r in records), encoding="utf-8")
    ckpt = str(caller(folder / "caller")) if args.tools_ckpt in (None, "caller") else args.tools_ckpt
    name = "synthetic caller" if args.tools_ckpt in (None, "caller") else Path(ckpt).name
    base = ["--prompts", str(prompts), "--init-from", ckpt, "--reward", "tool_format", "--group-size", "4",
            "--prompts-per-step", "8", "--max-new-tokens", str(args.tools_new_tokens), "--lr", "1e-4",
            "--max-steps", str(args.tools_steps), "--seed", str(args.seed), "--rollout-temperature", "1.5"]
    print(f"\nrollout tokens/s with tool execution ({name}, calculator questions, 8 x 4 samples, <= "
          f"{args.tools_new_tokens} new tokens, T 1.5, {args.tools_steps} steps; measured under load on a shared "
          "2-core CPU)")
    print("| stage | tools | rollout tokens/s | tool rounds / completion | model tokens / completion | "
          "rollout s / step |")
    print("|---|---|---:|---:|---:|---:|")
    for stage in ("grpo", "ppo"):
        for tools in ((), ("--tools", "builtin", "--max-tool-rounds", "2")):
            steps, _ = train(folder / f"tools_{stage}_{len(tools)}", stage, [*base, *tools])
            rounds = f"{mean(steps, 'tool_rounds'):.2f}" if tools else "-"
            print(f"| {stage} | {'builtin' if tools else 'none'} | {mean(steps, 'rollout_tokens_per_s'):.0f} | "
                  f"{rounds} | {mean(steps, 'completion_len'):.1f} | {mean(steps, 'rollout_s'):.2f} |")


def main() -> None:
    args = parse_args()
    todo = arms(args)
    with tempfile.TemporaryDirectory(prefix="tinylm-rl-compare-") as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results = list(pool.map(lambda item: train(folder / f"arm{item[0]}", item[1][1],
                                                       [*task_flags(args), *item[1][2]]), enumerate(todo)))
        if todo:
            task_tables(args, todo, results)
        if args.tools_steps > 0:
            tool_table(args, folder)


if __name__ == "__main__":
    main()
