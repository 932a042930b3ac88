#!/usr/bin/env python3
"""Training throughput of the real loop on this machine: pretrain, and SFT with the packed loader vs a
MiniMind-style pad-to-max loader (one conversation per row, right-padded to seq_len), eager vs compiled.

    python bench/train_throughput.py                   # small model, seq 512, all six cases (~10 min on 2 cores)
    python bench/train_throughput.py --no-compile      # eager only
    python bench/train_throughput.py --model tiny --steps 3

Every case runs in a fresh process (so peak RSS and compile caches are its own) through
``train.loop.train`` with ``--batch-size x --grad-accum`` rows of ``seq_len`` per step; the first
``--warmup`` steps (compilation, allocator warm-up) are not timed. tokens/s counts every position fed to
the model (padding included); supervised/s counts positions with loss weight > 0, the useful work of SFT.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from model import ModelConfig, TinyLM  # noqa: E402
from train.checkpoint import Checkpoint  # noqa: E402
from train.data import Batch, BatchLoader, PackedDataset, Split, permute  # noqa: E402
from train.dist import DistInfo  # noqa: E402
from train.loop import LoopConfig, train  # noqa: E402
from train.metrics import MetricsLogger  # noqa: E402
from train.optim import OptimConfig  # noqa: E402
from train.stages import build_stage  # noqa: E402
from train.weights_policy import FullWeights  # noqa: E402

CASES = [("pretrain", "packed", False), ("pretrain", "packed", True), ("sft", "packed", False),
         ("sft", "padded", False), ("sft", "packed", True), ("sft", "padded", True)]


class PaddedLoader:
    """MiniMind's SFT batches: conversation k of a shuffled order in row k, right-padded to seq_len, no
    packing, plain causal attention (padding comes last, so it never reaches a real token)."""

    def __init__(self, dataset: PackedDataset, micro_batch: int, seed: int = 0):
        self.dataset, self.micro_batch, self.seed = dataset, micro_batch, seed
        self.docs = [(s, int(lo), int(hi)) for s, shard in enumerate(dataset.shards)
                     for lo, hi in zip(shard.doc_offsets[:-1], shard.doc_offsets[1:], strict=True)]
        self.split = SimpleNamespace(dataset=dataset, val_rows=0)

    def global_batch(self, accum: int) -> int:
        return self.micro_batch * accum

    def collate(self, samples: np.ndarray) -> Batch:
        b, t = len(samples), self.dataset.seq_len
        inputs, targets = np.zeros((b, t), np.int64), np.zeros((b, t), np.int64)
        weights = np.zeros((b, t), np.float32)
        order = permute(samples % len(self.docs), len(self.docs), key=self.seed + 1)
        for i, d in enumerate(order):
            s, lo, hi = self.docs[int(d)]
            tokens, mask = self.dataset.shards[s].tokens[lo:hi], self.dataset.shards[s].weights[lo:hi]
            n = len(tokens)
            inputs[i, :n], targets[i, :n - 1], weights[i, :n - 1] = tokens, tokens[1:], mask[1:]
        return Batch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(weights))

    def steps(self, start_sample: int, accum: int):
        g = self.global_batch(accum)
        step = 0
        while True:
            first = start_sample + step * g
            yield [self.collate(np.arange(first + m * self.micro_batch, first + (m + 1) * self.micro_batch))
                   for m in range(accum)]
            step += 1


def run_case(args: argparse.Namespace) -> dict:
    """One case in this process; returns its measurements."""
    stage = build_stage(args.stage)
    dataset = stage.open_dataset(str(args.data))
    cfg = ModelConfig.from_preset(args.model)
    torch.manual_seed(0)
    model = TinyLM(cfg)
    if args.loader == "padded":
        loader = PaddedLoader(dataset, args.batch_size)
    else:
        loader = BatchLoader(Split(dataset, 0), args.batch_size, prefetch=2)
    steps = args.warmup + args.steps
    loop = LoopConfig(max_steps=steps, grad_accum=args.grad_accum, optim=OptimConfig.for_stage("adamw", lr=1e-4),
                      min_lr=5e-5, warmup_steps=1, schedule="cosine", decay_frac=0.2, grad_clip=1.0, dtype="float32",
                      compile=args.compile, eval_every=0, save_every=0, keep_last=1, log_every=1, stop_after=None,
                      progress=False, skip_nonfinite=0, stop_on_divergence=False)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        logger = MetricsLogger(Path(tmp), enabled=False)
        t0 = time.perf_counter()
        template = Checkpoint(model={}, model_config=cfg, stage=stage.name)  # save_every=0: never written
        state = train(model, stage, FullWeights(), loader, loop, info, Path(tmp), logger, template)
        total = time.perf_counter() - t0
    records = [r for r in state.history if "loss" in r]
    timed = records[args.warmup:]
    seconds = sum(r["step_time_s"] for r in timed)
    tokens = len(timed) * loader.global_batch(args.grad_accum) * dataset.seq_len
    supervised = timed[-1]["supervised_seen"] - records[args.warmup - 1]["supervised_seen"]
    return {"stage": args.stage, "loader": args.loader, "compile": args.compile,
            "tokens_per_s": tokens / seconds, "supervised_per_s": supervised / seconds,
            "supervised_frac": supervised / tokens, "step_s": seconds / len(timed),
            "first_steps_s": sum(r["step_time_s"] for r in records[:args.warmup]), "total_s": total,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "params_m": model.num_params() / 1e6, "loss_last": records[-1]["loss"]}


def pack(stage: str, out: Path, seq_len: int) -> Path:
    sample = {"pretrain": "pretrain", "sft": "sft"}[stage]
    subprocess.run([sys.executable, str(ROOT / "preprocess" / "pack.py"), "--stage", stage, "--input",
                    str(ROOT / "data" / "sample" / sample / "*.jsonl"), "--out", str(out), "--seq-len",
                    str(seq_len), "--quiet"], check=True)
    return out


def table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (f"train throughput: model {args.model} ({rows[0]['params_m']:.1f}M params), seq {args.seq_len}, "
            f"{args.batch_size}x{args.grad_accum} rows/step, fp32, {torch.get_num_threads()} threads, "
            f"{args.steps} timed steps after {args.warmup}")
    cols = ["stage", "loader", "mode", "tokens/s", "supervised/s", "supervised %", "s/step", "first steps s",
            "peak RSS MB"]
    lines = [head, "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([
            r["stage"], r["loader"], "compiled" if r["compile"] else "eager", f"{r['tokens_per_s']:,.0f}",
            f"{r['supervised_per_s']:,.0f}", f"{100 * r['supervised_frac']:.1f}", f"{r['step_s']:.2f}",
            f"{r['first_steps_s']:.1f}", f"{r['peak_rss_mb']:,.0f}"]) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps per case (compile happens here)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled cases")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    # one case (internal: the parent runs every case in a fresh child process)
    p.add_argument("--case", nargs=3, metavar=("STAGE", "LOADER", "COMPILE"), help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.warmup < 1:
        p.error("--warmup must be >= 1")
    if args.case:
        args.stage, args.loader, args.compile = args.case[0], args.case[1], args.case[2] == "1"
        print(json.dumps(run_case(args)))
        return 0

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = {s: pack(s, Path(tmp) / s, args.seq_len) for s in ("pretrain", "sft")}
        for stage, loader, compiled in CASES:
            if compiled and args.no_compile:
                continue
            cmd = [sys.executable, __file__, "--case", stage, loader, str(int(compiled)), "--data", str(data[stage]),
                   "--model", args.model, "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
                   "--grad-accum", str(args.grad_accum), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            print(f"running {stage} / {loader} / {'compiled' if compiled else 'eager'} ...", file=sys.stderr,
                  flush=True)
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(table(rows, args))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
