"""Benchmark the attention paths of TinyLM: plain causal rows vs packed rows (flex / dense-mask SDPA).

Prints one table: mask build time, forward time and forward+backward time per step for

- plain causal SDPA (``doc_ids=None``; the packing-free baseline),
- packed rows, SDPA with a dense bool block-diagonal causal mask,
- packed rows, FlexAttention eager and ``torch.compile``-d flex_attention.

On CPU (torch 2.13) FlexAttention has no backward, so its fwd+bwd column reads "n/a".
Usage: ``python bench/attention.py [--preset small] [--batch 4] [--seq 512] [--rounds 4] [--device cpu]``
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ModelConfig, TinyLM  # noqa: E402
from model import attention as attn  # noqa: E402


def packed_doc_ids(batch: int, seq: int, mean_doc: int, pad_frac: float, seed: int) -> torch.Tensor:
    """Rows of documents with lengths ~ U[1, 2*mean_doc], the last ``pad_frac`` of each row padding (-1)."""
    gen = torch.Generator().manual_seed(seed)
    doc_ids = torch.full((batch, seq), -1, dtype=torch.long)
    filled = int(seq * (1 - pad_frac))
    for r in range(batch):
        start, d = 0, 0
        while start < filled:
            n = int(torch.randint(1, 2 * mean_doc + 1, (1,), generator=gen))
            doc_ids[r, start:min(start + n, filled)] = d
            start, d = start + n, d + 1
    return doc_ids


def best_of(cells: dict[str, Callable[[], object]], rounds: int, sync: Callable[[], None],
            clock: Callable[[], float] = time.perf_counter) -> tuple[dict[str, float], dict[str, float]]:
    """First-call seconds (includes any compilation) and best-of-``rounds`` seconds per cell.

    Cells are interleaved round by round and the minimum is kept: other processes on a shared
    2-core machine only ever add time, so the minimum is the least noisy estimate.
    """
    first: dict[str, float] = {}
    for key, fn in cells.items():
        start = clock()
        fn()
        sync()
        first[key] = clock() - start
    best = dict.fromkeys(cells, float("inf"))
    for _ in range(rounds):
        for key, fn in cells.items():
            start = clock()
            fn()
            sync()
            best[key] = min(best[key], clock() - start)
    return first, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds over all cells (after 1 warm-up)")
    ap.add_argument("--mean-doc", type=int, default=96, help="mean document length in packed rows")
    ap.add_argument("--pad-frac", type=float, default=0.05, help="padding fraction at the end of each row")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled-flex row")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: process CPU seconds summed over threads (robust to other processes on a "
                         "shared machine; about threads x wall when the machine is idle)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    device = torch.device(args.device)
    cpu = device.type == "cpu"
    sync = (lambda: None) if cpu else torch.cuda.synchronize
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset)
    model = TinyLM(cfg).to(device).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    doc_ids = packed_doc_ids(args.batch, args.seq, args.mean_doc, args.pad_frac, seed=0).to(device)
    n_segments = int(sum(len(r.unique()) for r in doc_ids))
    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, {args.dtype}, "
          f"preset {args.preset} ({model.num_params() / 1e6:.1f}M), B={args.batch} T={args.seq}, "
          f"{n_segments} document+padding segments, best of {args.rounds} rounds, {args.clock} clock")

    def model_step(backend: str, packed: bool, backward: bool) -> Callable[[], None]:
        def run() -> None:
            cfg.attn_backend = backend
            model.zero_grad(set_to_none=True)
            grad = contextlib.nullcontext() if backward else torch.no_grad()
            amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
            with amp, grad:
                out = model(ids, doc_ids=doc_ids if packed else None)
                if backward:
                    out.logits.mean().backward()
        return run

    shape = (args.batch, cfg.num_attention_heads, args.seq, cfg.head_dim)
    kv_shape = (args.batch, cfg.num_key_value_heads, args.seq, cfg.head_dim)
    q = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(kv_shape, device=device, dtype=dtype, requires_grad=True) for _ in range(2))

    def kernel(mask_fn: Callable[[], attn.AttentionMask], backward: bool) -> Callable[[], None]:
        """One layer's attention call on random q/k/v (mask built once, outside the timing)."""
        mask = mask_fn()

        def run() -> None:
            with contextlib.nullcontext() if backward else torch.no_grad():
                out = attn.attend(q, k, v, mask)
                if backward:
                    out.sum().backward()
        return run

    def dense() -> attn.AttentionMask:
        return attn.dense_document_mask(doc_ids)

    def block() -> attn.AttentionMask:
        return attn.document_block_mask(doc_ids)

    def causal() -> attn.AttentionMask:
        return None

    # row -> (backend, packed, mask builder, flex compiled?)
    rows = {"plain causal SDPA": ("sdpa", False, causal, False),
            "packed SDPA dense mask": ("sdpa", True, dense, False),
            "packed flex (eager)": ("flex", True, block, False)}
    if not args.no_compile:
        rows["packed flex (compiled)"] = ("flex", True, block, True)
    columns = ("mask build ms", "attn fwd ms", "attn fwd+bwd ms", "model fwd s", "model fwd+bwd s")
    results: dict[str, dict[str, str]] = {}
    first_call: dict[str, float] = {}
    for name, (backend, packed, mask_fn, compiled) in rows.items():
        attn.FLEX_COMPILE = compiled
        can_bwd = not (cpu and backend == "flex")  # FlexAttention: no CPU backward in torch 2.13
        cells: dict[str, Callable[[], object]] = {
            "mask build ms": mask_fn,
            "attn fwd ms": kernel(mask_fn, False),
            "model fwd s": model_step(backend, packed, False),
        }
        if can_bwd:
            cells["attn fwd+bwd ms"] = kernel(mask_fn, True)
            cells["model fwd+bwd s"] = model_step(backend, packed, True)
        first, best = best_of(cells, args.rounds, sync, clock)
        first_call[name] = max(first.values())
        results[name] = {c: "n/a" for c in columns}
        for c, seconds in best.items():
            results[name][c] = f"{seconds * 1e3:.1f}" if c.endswith("ms") else f"{seconds:.3f}"
        if not packed:
            results[name]["mask build ms"] = "-"
    attn.FLEX_COMPILE = None

    print(f"\n{'path':<24}" + "".join(f"{c:>17}" for c in columns) + f"{'first call s':>14}")
    for name, cells_out in results.items():
        print(f"{name:<24}" + "".join(f"{cells_out[c]:>17}" for c in columns) + f"{first_call[name]:>14.1f}")
    if cpu:
        print("n/a: FlexAttention has no backward on CPU (torch raises NotImplementedError).")


if __name__ == "__main__":
    main()
