#!/usr/bin/env python3
"""Generation speed: KV cache vs none vs transformers' LlamaForCausalLM.generate, and bin/serve under load.

    .venv/bin/python bench/bench_generate.py                       # small preset, random weights, CPU
    .venv/bin/python bench/bench_generate.py --ckpt out/sft        # trained weights (prompt is still random ids)
    .venv/bin/python bench/bench_generate.py --model tiny --new-tokens 32 --requests 4
    .venv/bin/python bench/bench_generate.py --no-server --threads 1 --clock cpu   # on a loaded machine

Decode tokens/s at each of --batches (default 1, 8, 32): every row of a batch gets the same random
prompt of --prompt-len ids; greedy decoding with no stop token runs --new-tokens steps. Decode time =
time(N new tokens) - time(1 new token), i.e. prefill excluded, each time the median of its rounds;
tokens/s = batch * (N - 1) / decode time.
The arms (tinylm's ``generate_batch`` with the KV cache, optionally without it or with bfloat16 decode
matmuls, and transformers' ``LlamaForCausalLM.generate(do_sample=False, use_cache=True)`` forced to N
tokens, on the same weights: our state dict loads strictly into it) alternate within each of --repeat
rounds and the median per arm is used, so a machine whose load drifts slows every arm alike. On a busy
machine, ``--threads 1 --clock cpu`` times this thread's CPU time instead of wall time.

Server: bin/serve on a checkpoint of the same weights; --clients threads each send --requests
non-streaming requests (max_tokens --server-tokens, temperature 0); requests/s and latency p50/p95.
Numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import copy
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
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core.tokenizer import TokenizerInfo, load_tokenizer  # noqa: E402
from model import ModelConfig, TinyLM  # noqa: E402
from model.export_hf import export_hf  # noqa: E402
from model.generate import generate_batch  # noqa: E402
from serve.export import tokenizer_files  # noqa: E402
from train.checkpoint import Checkpoint  # noqa: E402

OURS, OURS_BF16 = "tinylm, KV cache", "tinylm, bf16 matmuls"
THEIRS, THEIRS_BF16 = "transformers generate (cache)", "transformers, bf16 weights"


def clock(kind: str) -> Callable[[], float]:
    """``time.perf_counter`` (wall) or ``time.thread_time`` (CPU time of this thread: immune to time
    slicing on a busy machine, meaningful with --threads 1 only)."""
    return time.perf_counter if kind == "wall" else time.thread_time


def timed(run: Callable[[int], object], n: int, now: Callable[[], float]) -> float:
    t0 = now()
    run(n)
    return now() - t0


def decode_rate(t1: list[float], tn: list[float], batch: int, n: int) -> float:
    """batch * (n - 1) / (median time(n tokens) - median time(1 token)): decode tokens/s, prefill excluded;
    NaN when noise made the difference non-positive (raise --repeat or --new-tokens)."""
    decode = statistics.median(tn) - statistics.median(t1)
    return batch * (n - 1) / decode if decode > 0 else float("nan")


def hf_model(model: TinyLM, info: TokenizerInfo, folder: Path):
    """transformers' ``LlamaForCausalLM`` loaded from ``bin/export --format hf`` output of ``model``."""
    import transformers

    export_hf(model.state_dict(), model.config, tokenizer_files(info), folder)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()


def decode_arms(model: TinyLM, hf, args: argparse.Namespace) -> dict[str, Callable[[list[list[int]], int], object]]:
    """name -> run(prompts, new_tokens): greedy, no stop token, exactly new_tokens tokens per row."""
    arms: dict[str, Callable[[list[list[int]], int], object]] = {
        OURS: lambda p, n: generate_batch(model, p, max_new_tokens=n)}
    if args.no_cache_arm:
        arms["tinylm, no cache"] = lambda p, n: generate_batch(model, p, max_new_tokens=n, use_cache=False)
    if args.bf16_arm:
        arms[OURS_BF16] = lambda p, n: generate_batch(model, p, max_new_tokens=n,
                                                                    matmul_dtype=torch.bfloat16)
    if hf is not None:
        arms[THEIRS] = partial(run_hf, hf)
        if args.bf16_arm:  # the like-for-like peer of bf16 matmuls: transformers with its weights in bf16
            arms[THEIRS_BF16] = partial(run_hf, copy.deepcopy(hf).to(torch.bfloat16))
    return arms


def run_hf(hf, prompts: list[list[int]], n: int) -> None:
    """transformers' greedy ``generate`` of exactly ``n`` new tokens per row, with its KV cache."""
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)


def bench_decode(model: TinyLM, info: TokenizerInfo, args: argparse.Namespace,
                 scratch: Path) -> dict[int, dict[str, float]]:
    """Decode tok/s per batch size and arm from median times; arms alternate within each of ``--repeat`` rounds."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(7, model.config.vocab_size, (args.prompt_len,), generator=g).tolist()
    hf = hf_model(model, info, scratch / "hf") if args.hf else None
    arms, now = decode_arms(model, hf, args), clock(args.clock)
    out: dict[int, dict[str, float]] = {}
    for batch in args.batches:
        prompts = [prompt] * batch
        times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in arms}
        for run in arms.values():
            run(prompts, 2)  # warm-up
        for _ in range(args.repeat):
            for name, run in arms.items():
                for n, into in zip((1, args.new_tokens), times[name], strict=True):
                    into.append(timed(lambda k, r=run, p=prompts: r(p, k), n, now))
        out[batch] = {name: decode_rate(t1, tn, batch, args.new_tokens) for name, (t1, tn) in times.items()}
        print(f"  batch {batch}: " + ", ".join(f"{k} {v:.1f}" for k, v in out[batch].items()) + " tok/s",
              file=sys.stderr, flush=True)
    return out


def print_decode_table(rates: dict[int, dict[str, float]]) -> None:
    """tok/s per arm, then tinylm / transformers in float32 and, with both bf16 arms, in bf16."""
    names = list(next(iter(rates.values())))
    pairs = [(title, a, b) for title, a, b in (("tinylm / transformers", OURS, THEIRS),
                                               ("bf16: tinylm / transformers", OURS_BF16, THEIRS_BF16))
             if a in names and b in names]
    heads = names + [title for title, _, _ in pairs]
    print("| batch | " + " | ".join(heads) + " |")
    print("|------:|" + "|".join("-" * (len(n) + 1) + ":" for n in heads) + "|")
    for batch, row in rates.items():
        cells = [f"{row[n]:>{len(n)}.1f}" for n in names]
        cells += [f"{row[a] / row[b]:>{len(title) - 1}.2f}x" for title, a, b in pairs]
        print(f"| {batch:>5} | " + " | ".join(cells) + " |")


def bench_server(ckpt: Path, args: argparse.Namespace) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "bin" / "serve"), "--ckpt", str(ckpt), "--port", str(port),
                             "--threads", str(torch.get_num_threads())], stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("bin/serve did not start") from None
                time.sleep(0.3)
        body = json.dumps({"messages": [{"role": "user", "content": "Tell me a story about a small robot."}],
                           "temperature": 0, "max_tokens": args.server_tokens})
        latencies: list[float] = []
        tokens = [0]
        lock = threading.Lock()

        def client() -> None:
            for _ in range(args.requests):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                t0 = time.perf_counter()
                conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
                reply = json.loads(conn.getresponse().read())
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    tokens[0] += reply["usage"]["completion_tokens"]

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        lat = sorted(latencies)
        return {"requests": len(lat), "rps": len(lat) / wall, "tok_s": tokens[0] / wall,
                "p50": statistics.median(lat), "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))]}
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="model preset for random weights (default small)")
    p.add_argument("--ckpt", help="use this checkpoint's weights instead of random ones")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5, help="alternating rounds, median reported (default 5)")
    p.add_argument("--batches", type=lambda t: [int(x) for x in t.split(",")], default=[1, 8, 32],
                   help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or this thread's CPU time (robust on a loaded machine; with --threads 1)")
    p.add_argument("--no-cache-arm", action="store_true", help="also time tinylm without the KV cache")
    p.add_argument("--bf16-arm", action="store_true",
                   help="also time tinylm with bfloat16 decode matmuls (Generation(matmul_dtype=torch.bfloat16)) and "
                        "transformers with its weights in bfloat16")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers")
    p.add_argument("--clients", type=int, default=8, help="concurrent server clients (default 8)")
    p.add_argument("--requests", type=int, default=4, help="requests per client (default 4)")
    p.add_argument("--server-tokens", type=int, default=32, help="max_tokens per server request (default 32)")
    p.add_argument("--no-server", dest="server", action="store_false", help="skip the server benchmark")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="tinylm-bench-")
    if args.ckpt:
        from train.loading import load_model

        lm = load_model(args.ckpt)
        model, info, ckpt = lm.model, lm.tokenizer, Path(lm.checkpoint.path)
        weights = f"trained weights {ckpt}"
    else:
        torch.manual_seed(0)
        model = TinyLM(ModelConfig.from_preset(args.model)).eval()
        info = load_tokenizer()
        ckpt = Checkpoint.of(model, info).save(tmp.name)
        weights = f"random weights, preset {args.model}"
    print(f"{weights}: {model.num_params() / 1e6:.1f}M params; CPU, {args.threads} threads, torch "
          f"{torch.__version__}; prompt {args.prompt_len} ids, {args.new_tokens} new tokens, greedy",
          file=sys.stderr, flush=True)
    rates = bench_decode(model, info, args, Path(tmp.name))
    print(f"\nDecode throughput, tok/s ({weights}; CPU {args.threads} threads; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy, prefill excluded; medians of {args.repeat} alternating rounds, "
          f"{args.clock} clock)\n")
    print_decode_table(rates)
    if args.server:
        s = bench_server(ckpt, args)
        print(f"\nbin/serve: {args.clients} concurrent clients x {args.requests} requests, max_tokens "
              f"{args.server_tokens}, temperature 0 (one generation worker, requests queued)\n")
        print("| requests | requests/s | completion tok/s | latency p50 s | latency p95 s |")
        print("|----------|------------|------------------|---------------|---------------|")
        print(f"| {s['requests']:>8} | {s['rps']:>10.2f} | {s['tok_s']:>16.1f} | {s['p50']:>13.2f} | "
              f"{s['p95']:>13.2f} |")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
