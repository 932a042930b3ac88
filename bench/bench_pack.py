#!/usr/bin/env python3
"""Benchmark the data path and print tables (not a test: numbers depend on the machine).

1. pack.py throughput (MB/s of input, tokens/s) against the raw ``tokenizers`` ``encode_batch`` rate on
   the same texts and cores (the ceiling: pack.py must also parse, validate, render, pack and write);
2. loader batches/s (micro-batch x seq_len) and peak RSS for a dataset at 1x and 10x size;
3. packing efficiency (real tokens / row slots) against padding every record to the row length.

    python bench/bench_pack.py                 # ../shared/data if present, else data/sample
    python bench/bench_pack.py --data DIR --workers 2
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.chat_template import CONTROL, render_pieces, render_text  # noqa: E402
from core.tokenizer import DEFAULT_TOKENIZER, load_tokenizer  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def raw_texts(stage: str, files: list[Path]) -> tuple[list[str], list[str]]:
    """(one rendered text per record, the text pieces pack.py tokenizes separately: mask boundaries and
    control tokens, which it inserts as ids)."""
    rows = [json.loads(line) for f in files for line in f.open(encoding="utf-8") if line.strip()]
    if stage == "pretrain":
        texts = [r["text"] for r in rows]
        return texts, texts
    return ([render_text(r["conversations"]) for r in rows],
            [p.text for r in rows for p in render_pieces(r["conversations"]) if p.kind != CONTROL])


def time_encode_batch(texts: list[str], tokenizer_dir: str, literal: bool = False) -> tuple[float, int]:
    """Seconds and tokens of one ``encode_batch`` call (``literal``: the tokenizer content is encoded with)."""
    info = load_tokenizer(tokenizer_dir)
    tok = info.literal if literal else info.tokenizer
    tok.encode_batch(texts[:200], add_special_tokens=False)  # warm-up
    start = time.perf_counter()
    n = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return time.perf_counter() - start, n


def time_pack(stage: str, inputs: list[str], out: Path, workers: int, tokenizer_dir: str,
              seq_len: int) -> tuple[float, dict]:
    cmd = [sys.executable, str(REPO / "preprocess" / "pack.py"), "--stage", stage, "--input", *inputs,
           "--out", str(out), "--workers", str(workers), "--tokenizer", tokenizer_dir, "--seq-len", str(seq_len),
           "--quiet", "--overwrite"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start, json.loads((out / "meta.json").read_text())


LOADER_PROBE = """
import sys, time
sys.path.insert(0, {repo!r})
from train.data import BatchLoader, PackedDataset, Split
ds = PackedDataset({folder!r})
loader = BatchLoader(Split(ds, 0), micro_batch={batch}, seed=0, prefetch=0)
it = loader.steps(0, accum=1)
next(it)
start = time.perf_counter()
for _ in range({steps}):
    next(it)
rate = {steps} / (time.perf_counter() - start)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
kb = lambda key: int(status[key].split()[0]) / 1024
print(ds.n_rows, rate, kb("VmHWM"), kb("RssAnon"))
"""


def loader_probe(folder: Path, batch: int, steps: int) -> tuple[int, float, float, float]:
    """(rows, batches/s, peak RSS MB, anonymous RSS MB at the end) of a fresh process reading ``folder``.

    Peak RSS includes the touched pages of the memory-mapped shards (file-backed, reclaimable page cache);
    anonymous RSS is the process's own heap, which must not grow with the dataset."""
    code = LOADER_PROBE.format(repo=str(REPO), folder=str(folder), batch=batch, steps=steps)
    rows, rate, rss, anon = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                           text=True).stdout.split()
    return int(rows), float(rate), float(rss), float(anon)


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=SHARED if SHARED.is_dir() else REPO / "data" / "sample",
                   help="folder with pretrain/ and sft/ JSONL")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    print(f"data {args.data}, tokenizer {args.tokenizer}, {args.workers} worker(s), {os.cpu_count()} cores")

    work = Path(tempfile.mkdtemp(prefix="tinylm-bench-"))
    rows, metas = [], {}
    for stage in ("pretrain", "sft"):
        files = sorted((args.data / stage).glob("*.jsonl"))
        mb = sum(f.stat().st_size for f in files) / 1e6
        whole, segments = raw_texts(stage, files)
        raw_s, raw_tokens = time_encode_batch(whole, args.tokenizer)
        seg_s, _ = time_encode_batch(segments, args.tokenizer, literal=True)
        pack_s, meta = time_pack(stage, [str(f) for f in files], work / stage, args.workers, args.tokenizer,
                                 args.seq_len)
        metas[stage] = meta
        tokens = meta["counts"]["tokens"]
        rows.append([stage, f"{mb:.1f}", f"{raw_tokens / raw_s:,.0f}", f"{mb / raw_s:.2f}",
                     f"{mb / seg_s:.2f}", f"{tokens / pack_s:,.0f}", f"{mb / pack_s:.2f}", f"{raw_s / pack_s:.0%}",
                     f"{seg_s / pack_s:.0%}"])
    table("1. pack.py vs raw tokenizers.encode_batch on the same records and cores (pack.py time includes "
          "process start, reading, validation, packing and writing; 'segments' = the same texts split at the "
          "loss-mask boundaries and control tokens, which pack.py tokenizes separately with the literal tokenizer)",
          ["stage", "input MB", "encode_batch tok/s", "encode MB/s", "segments MB/s", "pack.py tok/s", "pack MB/s",
           "pack/raw", "pack/segments"], rows)

    sft_files = sorted((args.data / "sft").glob("*.jsonl"))
    time_pack("sft", [f"{f}:10" for f in sft_files], work / "sft10", args.workers, args.tokenizer, args.seq_len)
    rows = []
    for label, folder in (("1x", work / "sft"), ("10x", work / "sft10")):
        n_rows, rate, rss, anon = loader_probe(folder, args.batch, args.steps)
        size = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
        rows.append([label, f"{n_rows:,}", f"{size:.1f}", f"{rate:,.0f}", f"{rss:.0f}", f"{anon:.0f}"])
    table(f"2. loader: {args.steps} batches of {args.batch} x {args.seq_len} sft rows, one process, no prefetch "
          "thread (peak RSS includes the touched pages of the mapped shards, which are page cache)",
          ["size", "rows", "shards MB", "batches/s", "peak RSS MB", "anonymous RSS MB"], rows)

    rows = []
    for stage, meta in metas.items():
        c, pk = meta["counts"], meta["packing"]
        rows.append([stage, f"{c['tokens']:,}", f"{c['documents']:,}", f"{c['rows']:,}", f"{pk['efficiency']:.1%}",
                     f"{pk['pad_to_max_efficiency']:.1%}", f"{c['truncated']:,}", f"{sum(c['dropped'].values()):,}"])
    table(f"3. packing efficiency at seq_len {args.seq_len} (real tokens / row slots)",
          ["stage", "tokens", "documents", "rows", "packed", "pad-to-max", "truncated", "dropped"], rows)
    print(f"\n(peak RSS of this driver: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
          f"scratch in {work})")


if __name__ == "__main__":
    main()
