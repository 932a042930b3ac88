#!/usr/bin/env python3
"""RL step-time split: generation (rollouts) vs training, from the loop's own metrics.

    .venv/bin/python bench/bench_grpo.py                                  # small preset, random weights, CPU
    .venv/bin/python bench/bench_grpo.py --model tiny --steps 4
    .venv/bin/python bench/bench_grpo.py --ckpt out/reason --max-new-tokens 128

Runs ``train/run.py --stage grpo`` (the real loop) for --steps steps on the prompts of --prompts (default the
GSM8K sample) with the gsm8k + format rewards, from --ckpt or from a random model of --model saved to a
temporary folder, and reads metrics.jsonl: per step ``rollout_s`` (batched KV-cache generation of P x G
completions, scoring and advantages), ``train_s`` (forward + backward + optimizer step over the same
completions), ``rollout_tokens_per_s`` and ``completion_len``. The table shows the median over the steps
after the first (warm-up), one row per --rollout-dtypes arm (float32; bfloat16 decode matmuls).
A random model rarely stops, so its completions run to --max-new-tokens: the generation share is an upper
bound for a trained model that answers briefly. Numbers depend on the machine and on what else runs on it;
the generation share is a ratio measured in one process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core.tokenizer import load_tokenizer  # noqa: E402
from model import ModelConfig, TinyLM  # noqa: E402
from train.checkpoint import Checkpoint  # noqa: E402
from train.metrics import read_metrics  # noqa: E402
from train.run import main as train_main  # noqa: E402

KEYS = ("rollout_s", "train_s", "rollout_tokens_per_s", "completion_len")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="start from this checkpoint (default: random weights of --model)")
    p.add_argument("--model", default="small", help="preset for random weights (default small)")
    p.add_argument("--prompts", default=str(ROOT / "data" / "sample" / "reasoning" / "gsm8k_en_think.jsonl"))
    p.add_argument("--steps", type=int, default=3, help="RL steps; the first is warm-up (default 3)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--rollout-dtypes", default="float32,bfloat16",
                   help="comma-separated --rollout-dtype arms, one run each (default float32,bfloat16)")
    return p.parse_args()


def run(args: argparse.Namespace, tmp: Path, rollout_dtype: str) -> list[dict]:
    init = args.ckpt
    if init is None:
        torch.manual_seed(0)
        init = str(tmp / "init")
        Checkpoint.of(TinyLM(ModelConfig.from_preset(args.model)), load_tokenizer(), stage="sft").save(init)
    out = tmp / f"run-{rollout_dtype}"
    code = train_main(["--stage", "grpo", "--prompts", args.prompts, "--init-from", init, "--out", str(out),
                       "--reward", "gsm8k", "--reward", "format@0.5", "--group-size", str(args.group_size),
                       "--prompts-per-step", str(args.prompts_per_step), "--max-new-tokens", str(args.max_new_tokens),
                       "--grad-accum", str(args.grad_accum), "--max-steps", str(args.steps), "--log-every", "1",
                       "--save-every", "0", "--no-progress", "--rollout-dtype", rollout_dtype])
    if code != 0:
        raise SystemExit(code)
    return [r for r in read_metrics(out) if "rollout_s" in r]


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="tinylm-bench-grpo-") as tmp:
        for dtype in args.rollout_dtypes.split(","):
            records = run(args, Path(tmp), dtype)
            timed = records[1:] or records
            rows[dtype] = {k: statistics.median(r[k] for r in timed) for k in KEYS}
    print(f"\nRL step split ({args.ckpt or args.model + ' random'}, {args.prompts_per_step} prompts x "
          f"{args.group_size} samples, <= {args.max_new_tokens} new tokens, {torch.get_num_threads()} threads, "
          f"median of {len(timed)} step(s))")
    print("| --rollout-dtype | completions/step | completion_len | rollout_s | train_s | generation share | "
          "rollout tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for dtype, med in rows.items():
        step = med["rollout_s"] + med["train_s"]
        print(f"| {dtype} | {args.prompts_per_step * args.group_size} | {med['completion_len']:.1f} | "
              f"{med['rollout_s']:.2f} | {med['train_s']:.2f} | {100 * med['rollout_s'] / step:.0f}% | "
              f"{med['rollout_tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
