#!/usr/bin/env python3
"""/health latency of bin/serve while hostile or heavy requests are in flight.

    .venv/bin/python bench/bench_serve_hostile.py                    # this tree's bin/serve
    .venv/bin/python bench/bench_serve_hostile.py --repo /tmp/old    # another checkout's bin/serve (before/after)

One server (random weights, preset --model, one torch thread) on 127.0.0.1; /health is polled
sequentially (one connection per poll, --gap seconds apart) in four situations:
- idle: nothing else runs (--polls polls);
- big body: a client POSTs a --body-mb MB chat request (one huge user message, valid JSON) as a normal
  client does (whole body, then read the answer); polls run from its first byte until its answer;
- 1 MB prompt: the same with a body just under the default 1 MiB limit (0.96 MB of text: it is read,
  parsed and refused as too long for the context);
- stalled body: a client sends headers with Content-Length 100000 and 100 bytes, then nothing;
- generation: one streaming request with max_tokens --tokens and temperature 0 is being generated.
Every loop is bounded in count and time, and only 127.0.0.1 is contacted. Numbers depend on the
machine and on what else runs on it.
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
MAX_POLLS = 2000  # hard cap per situation


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def health(port: int) -> float:
    """Seconds for one GET /health on a fresh connection (raises unless it answers 200)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=300)
    conn.request("GET", "/health")
    resp = conn.getresponse()
    resp.read()
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"/health answered {resp.status}")
    return time.perf_counter() - t0


def poll_while(port: int, busy: threading.Event | None, polls: int, gap: float, limit_s: float) -> list[float]:
    """Poll /health at least ``polls`` times, and on while ``busy`` is set (bounded by MAX_POLLS, limit_s)."""
    out: list[float] = []
    deadline = time.monotonic() + limit_s
    while len(out) < MAX_POLLS and time.monotonic() < deadline:
        if len(out) >= polls and not (busy is not None and busy.is_set()):
            break
        out.append(health(port))
        time.sleep(gap)
    return out


def in_background(fn) -> tuple[threading.Thread, threading.Event, dict]:
    """Run ``fn(result_dict)`` in a thread; the event is set while it runs."""
    busy, result = threading.Event(), {}
    busy.set()

    def run() -> None:
        try:
            fn(result)
        except OSError as e:
            result["error"] = f"{type(e).__name__}: {e}"
        finally:
            busy.clear()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, busy, result


def big_body(port: int, mb: float):
    content = "hello world " * int(mb * 1e6 / 12)  # 12 bytes each
    body = json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 8}).encode()

    def send(result: dict) -> None:
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection(HOST, port, timeout=300)
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        result.update(status=resp.status, seconds=time.perf_counter() - t0, bytes=len(body))
    return send


def stalled_body(port: int, hold: threading.Event):
    def send(result: dict) -> None:
        with socket.create_connection((HOST, port), timeout=60) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000\r\n\r\n" + b" " * 100)
            hold.wait(60)
        result["status"] = "held"
    return send


def generation(port: int, tokens: int):
    body = json.dumps({"messages": [{"role": "user", "content": "Tell me a story."}], "temperature": 0,
                       "max_tokens": tokens, "stream": True})

    def send(result: dict) -> None:
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection(HOST, port, timeout=300)
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        chunks = resp.read().count(b"data: ")
        conn.close()
        result.update(status=resp.status, seconds=time.perf_counter() - t0, chunks=chunks)
    return send


def row(name: str, lat: list[float], note: str) -> str:
    lat = sorted(lat)
    p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
    return (f"| {name:<14} | {len(lat):>5} | {1e3 * statistics.median(lat):>8.1f} | {1e3 * p95:>8.1f} | "
            f"{1e3 * lat[-1]:>8.1f} | {note} |")


def outcome(result: dict) -> str:
    """'answer STATUS after S s' of a background request (or its connection error)."""
    if "status" not in result:
        return f"no answer: {result.get('error')}"
    return f"answer {result['status']} after {result['seconds']:.2f} s"


def start_server(repo: Path, ckpt: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(repo / "bin" / "serve"), "--ckpt", str(ckpt), "--port", str(port),
                             "--threads", "1"], stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while True:
        try:
            health(port)
            return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("bin/serve did not start") from None
            time.sleep(0.3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=ROOT, help="checkout whose bin/serve runs (default: this one)")
    p.add_argument("--model", default="small", help="model preset for the random weights (default small)")
    p.add_argument("--body-mb", type=float, default=10.0, help="size of the big body in MB (default 10)")
    p.add_argument("--tokens", type=int, default=200, help="max_tokens of the generation (default 200)")
    p.add_argument("--polls", type=int, default=40, help="minimum /health polls per situation (default 40)")
    p.add_argument("--gap", type=float, default=0.02, help="seconds between polls (default 0.02)")
    args = p.parse_args()
    torch.manual_seed(0)
    model = TinyLM(ModelConfig.from_preset(args.model))
    info = load_tokenizer()
    tmp = tempfile.TemporaryDirectory(prefix="tinylm-bench-serve-")
    ckpt = Checkpoint.of(model, info).save(tmp.name)
    port = free_port()
    proc = start_server(args.repo.resolve(), ckpt, port)
    rows = []
    try:
        rows.append(row("idle", poll_while(port, None, args.polls, args.gap, 60), ""))

        thread, busy, result = in_background(big_body(port, args.body_mb))
        lat = poll_while(port, busy, args.polls, args.gap, 300)
        thread.join(300)
        rows.append(row(f"{args.body_mb:g} MB body", lat, outcome(result)))

        thread, busy, result = in_background(big_body(port, 0.96))
        lat = poll_while(port, busy, args.polls, args.gap, 300)
        thread.join(300)
        rows.append(row("1 MB prompt", lat, outcome(result)))

        hold = threading.Event()
        thread, busy, result = in_background(stalled_body(port, hold))
        time.sleep(0.2)
        lat = poll_while(port, None, args.polls, args.gap, 60)
        hold.set()
        thread.join(60)
        rows.append(row("stalled body", lat, "100 of 100000 bytes sent, connection held open"))

        thread, busy, result = in_background(generation(port, args.tokens))
        lat = poll_while(port, busy, args.polls, args.gap, 300)
        thread.join(300)
        rows.append(row("generation", lat, f"{args.model}, max_tokens {args.tokens}: {outcome(result)}"))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        tmp.cleanup()
    print(f"\n/health latency of {args.repo.resolve()}/bin/serve (one torch thread; ms; sequential polls "
          f"{args.gap:g} s apart)\n")
    print("| situation      | polls |  p50 ms  |  p95 ms  |  max ms  | note |")
    print("|----------------|-------|----------|----------|----------|------|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
