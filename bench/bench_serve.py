#!/usr/bin/env python3
"""Throughput and time-to-first-token of bin/serve under concurrent streaming clients (continuous batching).

    .venv/bin/python bench/bench_serve.py                                 # small preset, 1/4/8/16 clients
    .venv/bin/python bench/bench_serve.py --clients 1,8 --tokens 64 --threads 2

One server (random weights of preset --model, drawn wide so that answers are visible text; --threads torch
threads; --max-batch rows) on 127.0.0.1.
Per row of the table, C clients (threads, one HTTP connection each) send at the same moment one streaming
chat request each (different short prompts, temperature 0, max_tokens --tokens, usage included); the table
gives the aggregate completion tokens per second (all tokens / wall time from the first send to the last
[DONE]) and the p50/p95 time to the first chunk with answer text (content, reasoning or a call). The
"8 one at a time" row sends the same 8 requests sequentially (what a one-request-at-a-time server gives
them); its TTFT columns are full answer times. Only 127.0.0.1 is contacted; numbers depend on the machine
and on what else runs on it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core.tokenizer import load_tokenizer  # noqa: E402
from model import ModelConfig, TinyLM  # noqa: E402
from train.checkpoint import Checkpoint  # noqa: E402

HOST = "127.0.0.1"
WORDS = ["apple", "river", "mountain", "music", "science", "history", "ocean", "garden", "winter", "city",
         "language", "numbers", "stars", "forest", "bread", "train"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int, threads: int, max_batch: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "bin" / "serve"), "--ckpt", str(ckpt), "--port", str(port),
                             "--threads", str(threads), "--max-batch", str(max_batch)],
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while True:
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("bin/serve did not start") from None
            time.sleep(0.3)


def stream_one(port: int, prompt: str, tokens: int) -> tuple[float, float, int]:
    """(seconds to the first content chunk, seconds to [DONE], completion tokens) of one streaming request."""
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": tokens,
                       "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    first, used = None, 0
    for line in resp:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage") and not chunk["choices"]:
            used = chunk["usage"]["completion_tokens"]
        elif first is None and chunk["choices"] and any(chunk["choices"][0]["delta"].get(k)
                                                         for k in ("content", "reasoning_content", "tool_calls")):
            first = time.perf_counter() - t0
    end = time.perf_counter() - t0
    conn.close()
    return (first if first is not None else end), end, used


def concurrent(port: int, clients: int, tokens: int) -> tuple[float, list[float]]:
    """(aggregate tokens/s, TTFTs) of ``clients`` simultaneous streaming requests."""
    results: list[tuple[float, float, int]] = [(0.0, 0.0, 0)] * clients
    go = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        go.wait()
        results[i] = stream_one(port, f"Tell me about {WORDS[i % len(WORDS)]}.", tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(900)
    wall = time.perf_counter() - t0
    return sum(r[2] for r in results) / wall, [r[0] for r in results]


def one_at_a_time(port: int, clients: int, tokens: int) -> tuple[float, list[float]]:
    """(aggregate tokens/s, full answer times) of the same requests sent one after another."""
    t0 = time.perf_counter()
    results = [stream_one(port, f"Tell me about {WORDS[i % len(WORDS)]}.", tokens) for i in range(clients)]
    return sum(r[2] for r in results) / (time.perf_counter() - t0), [r[1] for r in results]


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="model preset for the random weights (default small)")
    p.add_argument("--clients", default="1,4,8,16", help="concurrent client counts (default 1,4,8,16)")
    p.add_argument("--tokens", type=int, default=128, help="max_tokens per request (default 128)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server (default 2)")
    p.add_argument("--max-batch", type=int, default=16, help="bin/serve --max-batch (default 16)")
    p.add_argument("--sequential", type=int, default=8, help="requests of the one-at-a-time row (0: none; 8)")
    args = p.parse_args()
    torch.manual_seed(0)
    model = TinyLM(ModelConfig.from_preset(args.model, initializer_range=0.3))  # wide weights: visible text
    tmp = tempfile.TemporaryDirectory(prefix="tinylm-bench-serve-")
    ckpt = Checkpoint.of(model, load_tokenizer()).save(tmp.name)
    port = free_port()
    proc = start_server(ckpt, port, args.threads, args.max_batch)
    rows = []
    try:
        stream_one(port, "warm up", 4)
        if args.sequential:
            rate, times = one_at_a_time(port, args.sequential, args.tokens)
            rows.append((f"{args.sequential} one at a time", rate, statistics.median(times), p95(times)))
        for clients in (int(c) for c in args.clients.split(",")):
            rate, ttft = concurrent(port, clients, args.tokens)
            rows.append((f"{clients} concurrent", rate, statistics.median(ttft), p95(ttft)))
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"bin/serve, preset {args.model}, {args.threads} torch threads, --max-batch {args.max_batch}, "
          f"max_tokens {args.tokens}, streaming clients on {HOST}")
    print(f"| {'clients':<20} | {'tokens/s':>9} | {'p50 TTFT s':>10} | {'p95 TTFT s':>10} |")
    print(f"|{'-' * 22}|{'-' * 11}|{'-' * 12}|{'-' * 12}|")
    for name, rate, p50, p95_ in rows:
        print(f"| {name:<20} | {rate:>9.1f} | {p50:>10.3f} | {p95_:>10.3f} |")
    print("(the one-at-a-time row's TTFT columns are full answer times)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
