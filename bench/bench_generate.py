#!/usr/bin/env python3
"""Generation speed: KV cache vs none vs transformers' LlamaForCausalLM.generate, and bin/serve under load.

    .venv/bin/python bench/bench_generate.py                       # small preset, random weights, CPU
    .venv/bin/python bench/bench_generate.py --ckpt out/sft        # trained weights (prompt is still random ids)
    .venv/bin/python bench/bench_generate.py --model tiny --new-tokens 32 --requests 4

Decode tokens/s: every row of a batch gets the same random prompt of --prompt-len ids; greedy decoding
with no stop token runs --new-tokens steps. Decode time = time(N new tokens) - time(1 new token), i.e.
prefill excluded; tokens/s = batch * (N - 1) / decode time; best of --repeat. transformers gets the
same weights (our state dict loads strictly into LlamaForCausalLM) and ``generate(do_sample=False,
use_cache=True)`` with the same prompt, forced to N tokens.

Server: bin/serve on a checkpoint of the same weights; --clients threads each send --requests
non-streaming requests (max_tokens --server-tokens, temperature 0); requests/s and latency p50/p95.
Numbers depend on the machine and on what else runs on it.
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

from core.tokenizer import TokenizerInfo, load_tokenizer  # noqa: E402
from model import ModelConfig, TinyLM  # noqa: E402
from model.export_hf import export_hf  # noqa: E402
from model.generate import generate_batch  # noqa: E402
from serve.export import tokenizer_files  # noqa: E402
from train.checkpoint import Checkpoint  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_rate(run, batch: int, n: int, repeat: int) -> float:
    """batch * (n - 1) / (time(n tokens) - time(1 token)), best of ``repeat``."""
    run(1)  # warm-up
    t1 = min(timed(lambda: run(1)) for _ in range(repeat))
    tn = min(timed(lambda: run(n)) for _ in range(repeat))
    return batch * (n - 1) / max(tn - t1, 1e-9)


def hf_model(model: TinyLM, info: TokenizerInfo, folder: Path):
    """transformers' ``LlamaForCausalLM`` loaded from ``bin/export --format hf`` output of ``model``."""
    import transformers

    export_hf(model.state_dict(), model.config, tokenizer_files(info), folder)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()


def bench_decode(model: TinyLM, info: TokenizerInfo, args: argparse.Namespace,
                 scratch: Path) -> list[tuple[str, int, float]]:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(7, model.config.vocab_size, (args.prompt_len,), generator=g).tolist()
    rows = []
    hf = hf_model(model, info, scratch / "hf") if args.hf else None
    for batch in (1, 8):
        prompts = [prompt] * batch
        for name, cache in (("tinylm, KV cache", True), ("tinylm, no cache", False)):
            rate = decode_rate(lambda n, c=cache, p=prompts: generate_batch(model, p, max_new_tokens=n, use_cache=c),
                               batch, args.new_tokens, args.repeat)
            rows.append((name, batch, rate))
            print(f"  {name:<32} batch {batch}: {rate:8.1f} tok/s", file=sys.stderr, flush=True)
        if hf is not None:
            ids = torch.tensor(prompts)

            def run(n: int, ids: torch.Tensor = ids) -> None:
                with torch.inference_mode():
                    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)

            rate = decode_rate(run, batch, args.new_tokens, args.repeat)
            rows.append(("transformers generate (cache)", batch, rate))
            print(f"  {'transformers generate (cache)':<32} batch {batch}: {rate:8.1f} tok/s", file=sys.stderr,
                  flush=True)
    return rows


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
    p.add_argument("--repeat", type=int, default=2, help="best of this many timings (default 2)")
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
        from serve.loading import load_model

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
    rows = bench_decode(model, info, args, Path(tmp.name))
    print(f"\nDecode throughput ({weights}; CPU {args.threads} threads; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, prefill excluded)\n")
    print(f"| {'implementation':<30} | batch | decode tok/s |")
    print(f"|{'-' * 32}|-------|--------------|")
    for name, batch, rate in rows:
        print(f"| {name:<30} | {batch:>5} | {rate:>12.1f} |")
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
