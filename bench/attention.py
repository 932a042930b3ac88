"""Benchmark the attention paths of TinyLM: plain causal rows vs packed rows (flex / dense-mask SDPA).

Prints one table: mask build time, forward time and forward+backward time per step for

- plain causal SDPA (``doc_ids=None``; the packing-free baseline),
- packed rows, SDPA with the dense additive block-diagonal causal mask (the CPU training path),
- packed rows, one SDPA ``is_causal`` call per document (``attn_backend="docs"``, the CPU default),
- packed rows, FlexAttention eager and ``torch.compile``-d flex_attention.

Rows have the same B x T, so the last column (model fwd+bwd time / plain causal's) is the per-position
cost of packing. The model step is a training step: the head and cross-entropy at every position
(``select``, chunked). Cells alternate round by round and the table prints medians: other processes on
a shared machine add time to both arms alike. On CPU (torch 2.13) FlexAttention has no backward, so
its fwd+bwd columns read "n/a".
Usage: ``python bench/attention.py [--preset small] [--batch 4] [--seq 512] [--rounds 5] [--device cpu]``
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ModelConfig, TinyLM  # noqa: E402
from model import attention as attn  # noqa: E402
from model.head import selected_cross_entropy  # noqa: E402


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


def median_of(cells: dict[str, Callable[[], object]], rounds: int, sync: Callable[[], None],
              clock: Callable[[], float] = time.perf_counter) -> tuple[dict[str, float], dict[str, float]]:
    """First-call seconds (includes any compilation) and the median over ``rounds`` seconds per cell.

    Cells alternate round by round (every cell once per round), so slow phases of a shared machine
    fall on all of them alike.
    """
    first: dict[str, float] = {}
    for key, fn in cells.items():
        start = clock()
        fn()
        sync()
        first[key] = clock() - start
    times: dict[str, list[float]] = {key: [] for key in cells}
    for _ in range(rounds):
        for key, fn in cells.items():
            start = clock()
            fn()
            sync()
            times[key].append(clock() - start)
    return first, {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds over all cells (after 1 warm-up)")
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
    targets = ids.roll(-1, dims=1).reshape(-1)
    every = torch.arange(ids.numel(), device=device)
    doc_ids = packed_doc_ids(args.batch, args.seq, args.mean_doc, args.pad_frac, seed=0).to(device)
    n_segments = int(sum(len(r.unique()) for r in doc_ids))
    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, {args.dtype}, "
          f"preset {args.preset} ({model.num_params() / 1e6:.1f}M), B={args.batch} T={args.seq}, "
          f"{n_segments} document+padding segments, median of {args.rounds} alternating rounds, {args.clock} clock")

    def model_step(backend: str, packed: bool, backward: bool) -> Callable[[], None]:
        def run() -> None:
            cfg.attn_backend = backend
            model.zero_grad(set_to_none=True)
            grad = contextlib.nullcontext() if backward else torch.no_grad()
            amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
            with amp, grad:
                out = model(ids, doc_ids=doc_ids if packed else None, select=every)
                loss = selected_cross_entropy(out.hidden, out.weight, targets).mean()
                if backward:
                    loss.backward()
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
        return attn.build_attention_mask(doc_ids, "sdpa", dtype)

    def segments() -> attn.AttentionMask:
        return attn.document_split(doc_ids)

    def block() -> attn.AttentionMask:
        return attn.document_block_mask(doc_ids)

    def causal() -> attn.AttentionMask:
        return None

    # row -> (backend, packed, mask builder, flex compiled?)
    rows = {"plain causal SDPA": ("sdpa", False, causal, False),
            "packed SDPA dense mask": ("sdpa", True, dense, False),
            "packed SDPA per document": ("docs", True, segments, False),
            "packed flex (eager)": ("flex", True, block, False)}
    if not args.no_compile:
        rows["packed flex (compiled)"] = ("flex", True, block, True)
    columns = ("mask build ms", "attn fwd ms", "attn fwd+bwd ms", "model fwd s", "model fwd+bwd s")
    cells: dict[tuple[str, str], Callable[[], object]] = {}
    for name, (backend, packed, mask_fn, compiled) in rows.items():
        can_bwd = not (cpu and backend == "flex")  # FlexAttention: no CPU backward in torch 2.13
        row = {"attn fwd ms": kernel(mask_fn, False), "model fwd s": model_step(backend, packed, False)}
        if packed:
            row["mask build ms"] = mask_fn
        if can_bwd:
            row["attn fwd+bwd ms"] = kernel(mask_fn, True)
            row["model fwd+bwd s"] = model_step(backend, packed, True)
        cells.update({(name, c): with_flex_compile(fn, compiled) for c, fn in row.items()})
    first, median = median_of(cells, args.rounds, sync, clock)  # all rows alternate, round by round

    plain = median[("plain causal SDPA", "model fwd+bwd s")]
    print(f"\n{'path':<26}" + "".join(f"{c:>17}" for c in columns) + f"{'first call s':>14}{'x plain':>9}")
    for name in rows:
        out = []
        for c in columns:
            seconds = median.get((name, c))
            out.append("-" if seconds is None and c == "mask build ms" else "n/a" if seconds is None
                       else f"{seconds * 1e3:.1f}" if c.endswith("ms") else f"{seconds:.3f}")
        ratio = median.get((name, "model fwd+bwd s"))
        print(f"{name:<26}" + "".join(f"{v:>17}" for v in out)
              + f"{max(v for (n, _), v in first.items() if n == name):>14.1f}"
              + (f"{ratio / plain:>9.3f}" if ratio is not None else f"{'n/a':>9}"))
    print("x plain: model fwd+bwd time / plain causal's at the same B x T (per-position cost of packing).")
    if cpu:
        print("n/a: FlexAttention has no backward on CPU (torch raises NotImplementedError).")


def with_flex_compile(fn: Callable[[], object], compiled: bool) -> Callable[[], object]:
    """``fn`` run with ``attn.FLEX_COMPILE`` set for its row (restored after)."""
    def run() -> object:
        attn.FLEX_COMPILE = compiled
        try:
            return fn()
        finally:
            attn.FLEX_COMPILE = None
    return run


if __name__ == "__main__":
    main()
