#!/usr/bin/env python3
"""How often bin/serve's batched answers differ from the same requests answered alone, on a trained checkpoint.

    .venv/bin/python bench/serve_agreement.py                      # trains train.sh --smoke's model first
    .venv/bin/python bench/serve_agreement.py --ckpt out/sft --prompts 32 --tokens 96

The policy (serve/batch_decode.py): a request's tokens depend on the rest of the batch only through
floating-point effects, because the CPU kernels for one row and for several rows may round differently;
bitwise identity is not promised. This measures how often that changes a greedy answer. Without --ckpt the
model is trained here first (``bash train.sh --smoke``: tiny preset, pretrain then SFT on data/sample, into
a temporary folder; no clean, no held-out split, no evaluation), and its SFT run is served.

One bin/serve (--max-batch 16, --threads torch threads) on 127.0.0.1 gets --prompts chat requests (temperature
0, max_tokens --tokens, logprobs with 2 alternatives). First each is sent alone (one at a time), twice: the
second pass is the control (alone against alone must agree exactly). Then, per --concurrency C, the prompts
go in groups of C requests sent at the same moment, so they are decoded in one batch (joining at token
boundaries as they arrive). A batched answer "differs" when its token sequence is not the alone one; the table
gives how many differ, the earliest and median first differing position (generated tokens before it), at
each first difference the gap between the alone run's two most likely tokens (log-probability: a small gap
is a near-tie that rounding can flip), and the largest change of a chosen token's log-probability while the
answers still agree (the size of the floating-point effect). Numbers depend on the machine and its kernels.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_serve import HOST, free_port, start_server  # noqa: E402

QUESTIONS = [
    "你好，请介绍一下你自己。", "What is the capital of France?", "请写一首关于春天的诗。", "如何学习编程？",
    "Tell me about the ocean.", "北京有哪些好玩的地方？", "解释一下什么是机器学习。", "给我推荐一本书。",
    "What is 12 times 12?", "怎样保持健康的生活方式？", "请把这句话翻译成英文：今天天气很好。", "为什么天空是蓝色的？",
    "Write a short story about a cat.", "介绍一下长城的历史。", "如何做一道番茄炒蛋？", "What makes a good friend?",
    "请列出三种水果。", "地球为什么会有四季？", "Describe a rainy day.", "你最喜欢的季节是什么？为什么？",
    "如何提高写作能力？", "What is music?", "请解释一下光合作用。", "给我讲一个笑话。",
    "Name three planets.", "学习外语有什么好方法？", "什么是人工智能？", "How do trains work?",
    "请描述一下你理想中的城市。", "上海和北京有什么不同？", "What is a computer?", "写一段关于友谊的话。",
]


def train_smoke(out: Path) -> Path:
    """train.sh --smoke's pretrain + SFT into ``out``; the SFT run folder."""
    env = {**os.environ, "OUT_DIR": str(out), "PYTHON": sys.executable, "CLEAN": "0", "HELDOUT_EVERY": "0",
           "SKIP_EVAL": "1", "SKIP_REPORT": "1", "SKIP_CHAT": "1"}
    subprocess.run(["bash", str(ROOT / "train.sh"), "--smoke"], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return out / "sft"


def answer(port: int, question: str, tokens: int) -> list[tuple[str, float, float]]:
    """The greedy answer's tokens as (token bytes, top-1 minus top-2 log-probability, its log-probability)."""
    body = json.dumps({"messages": [{"role": "user", "content": question}], "temperature": 0,
                       "max_tokens": tokens, "logprobs": True, "top_logprobs": 2})
    conn = http.client.HTTPConnection(HOST, port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    reply = json.loads(conn.getresponse().read())
    conn.close()
    out = []
    for entry in reply["choices"][0]["logprobs"]["content"]:
        top = [t["logprob"] for t in entry["top_logprobs"]]
        out.append((bytes(entry["bytes"]).hex(), top[0] - top[1] if len(top) > 1 else float("inf"), entry["logprob"]))
    return out


def together(port: int, questions: list[str], tokens: int) -> list[list[tuple[str, float]]]:
    """The answers of ``questions`` sent at the same moment, one thread each."""
    results: list = [None] * len(questions)
    go = threading.Barrier(len(questions))

    def client(i: int) -> None:
        go.wait()
        results[i] = answer(port, questions[i], tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    return results


@dataclass
class Agreement:
    differ: int = 0  # answers whose tokens are not the alone ones
    positions: list[int] = field(default_factory=list)  # first differing position of each
    gaps: list[float] = field(default_factory=list)  # the alone top-2 gap at each first difference
    drift: float = 0.0  # largest |logprob(alone) - logprob(other)| of a token where the answers still agree
    tokens: int = 0  # tokens compared


def compare(alone: list, other: list) -> Agreement:
    out = Agreement()
    for a, b in zip(alone, other, strict=True):
        out.tokens += max(len(a), len(b))
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x[0] != y[0]),
                     None if len(a) == len(b) else min(len(a), len(b)))
        same = min(len(a), len(b)) if first is None else first
        out.drift = max([out.drift, *(abs(a[i][2] - b[i][2]) for i in range(same))])
        if first is not None:
            out.differ += 1
            out.positions.append(first)
            out.gaps.append(a[first][1] if first < len(a) else float("nan"))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint file or run folder to serve (default: train train.sh --smoke's)")
    p.add_argument("--work", help="folder for that training run (default: a temporary one; reuse: --ckpt WORK/sft)")
    p.add_argument("--prompts", type=int, default=32, help=f"chat prompts (at most {len(QUESTIONS)}; default 32)")
    p.add_argument("--tokens", type=int, default=64, help="max_tokens per answer (default 64)")
    p.add_argument("--concurrency", default="4,16", help="batched group sizes (default 4,16)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server (default 2)")
    args = p.parse_args()
    questions = QUESTIONS[:args.prompts]
    tmp = tempfile.TemporaryDirectory(prefix="tinylm-agreement-")
    started = time.perf_counter()
    ckpt = Path(args.ckpt) if args.ckpt else train_smoke(Path(args.work or tmp.name))
    trained = time.perf_counter() - started
    port = free_port()
    proc = start_server(ckpt, port, args.threads, 16)
    rows = []
    try:
        answer(port, "warm up", 4)
        alone = [answer(port, q, args.tokens) for q in questions]
        again = [answer(port, q, args.tokens) for q in questions]
        rows.append(("alone, again", compare(alone, again)))
        for c in (int(x) for x in args.concurrency.split(",")):
            batched = []
            for start in range(0, len(questions), c):
                batched += together(port, questions[start:start + c], args.tokens)
            rows.append((f"{c} concurrent", compare(alone, batched)))
    finally:
        proc.terminate()
        proc.wait(30)
    origin = f" (trained here in {trained:.0f} s)" if not args.ckpt else ""
    print(f"bin/serve on {ckpt}{origin}, "
          f"{len(questions)} prompts, greedy, max_tokens {args.tokens}, {args.threads} torch threads, --max-batch 16")
    closest = min(gap for a in alone for _, gap, _ in a)
    print(f"smallest top-2 log-probability gap of any alone token: {closest:.2e}")
    print(f"| {'against alone':<14} | {'differ':>7} | {'first diff. min / median':>24} | "
          f"{'top-2 gap there, median':>23} | {'max |d logprob| agreeing':>24} | {'tokens':>6} |")
    print(f"|{'-' * 16}|{'-' * 9}|{'-' * 26}|{'-' * 25}|{'-' * 26}|{'-' * 8}|")
    for name, r in rows:
        where = f"{min(r.positions)} / {statistics.median(r.positions):g}" if r.positions else "-"
        gap = f"{statistics.median(r.gaps):.2e}" if r.gaps else "-"
        print(f"| {name:<14} | {f'{r.differ}/{len(questions)}':>7} | {where:>24} | {gap:>23} | {r.drift:>24.2e} | "
              f"{r.tokens:>6} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
