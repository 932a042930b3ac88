#!/usr/bin/env python3
"""Benchmark preprocess/clean.py and print tables (not a test: numbers depend on the machine).

1. clean throughput (MB of input read per second) and peak RSS of a fresh clean.py process on the
   pretrain set at 1x and 10x, with 1 and 2 workers (``FILE:10``: every record read ten times, so the copies are exact
   duplicates), with --dedup near and exact;
2. the duplicate index's memory per million records (tracemalloc over a DuplicateIndex fed distinct
   synthetic 200-character records; the near index is measured on fewer and scaled).

    python bench/bench_clean.py                 # ../shared/data/pretrain if present, else data/sample
    python bench/bench_clean.py --data DIR --near-records 20000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_pack import SHARED, table  # noqa: E402

from preprocess.textfilters import DuplicateIndex, Fingerprinter, normalise  # noqa: E402


def run_clean(inputs: list[str], out: Path, dedup: str, workers: int) -> tuple[float, float, dict]:
    """(seconds, peak RSS MB of the main process, report) of one ``clean.py --stage pretrain`` process."""
    report = out.with_suffix(".report.json")
    cmd = [sys.executable, str(REPO / "preprocess" / "clean.py"), "--stage", "pretrain", "--input", *inputs,
           "--out", str(out), "--report", str(report), "--dedup", dedup, "--workers", str(workers), "--quiet"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"clean.py failed: {' '.join(cmd)}")
    return seconds, usage.ru_maxrss / 1024, json.loads(report.read_text())


def index_bytes_per_million(near: bool, n: int) -> float:
    """Bytes tracemalloc sees the index allocate for ``n`` distinct records, scaled to a million."""
    rng = random.Random(0)
    keys = [normalise("".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(200))) for _ in range(n)]
    fingerprint = Fingerprinter(near=near)
    tracemalloc.start()
    index = DuplicateIndex()
    before = tracemalloc.get_traced_memory()[0]
    for key in keys:  # a fingerprint is made inside the traced region: what the index keeps of it counts
        if index.match(fp := fingerprint(key)) is None:
            index.add(fp)
    size = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return size / n * 1_000_000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = SHARED / "pretrain" if SHARED.is_dir() else REPO / "data" / "sample" / "pretrain"
    p.add_argument("--data", type=Path, default=default, help="folder of pretrain JSONL")
    p.add_argument("--near-records", type=int, default=20_000, help="records for the near index's memory")
    p.add_argument("--exact-records", type=int, default=200_000, help="records for the exact index's memory")
    args = p.parse_args()
    files = [str(f) for f in sorted(args.data.glob("*.jsonl"))]
    mb = sum(Path(f).stat().st_size for f in files) / 1e6
    print(f"data {args.data} ({len(files)} files, {mb:.1f} MB), {os.cpu_count()} cores")

    work = Path(tempfile.mkdtemp(prefix="tinylm-bench-clean-"))
    rows = []
    for label, scale, dedup, workers in (("1x", 1, "near", 1), ("1x", 1, "near", 2), ("1x", 1, "exact", 2),
                                         ("10x", 10, "near", 2)):
        inputs = files if scale == 1 else [f"{f}:{scale}" for f in files]
        seconds, rss, report = run_clean(inputs, work / f"{label}_{dedup}.jsonl", dedup, workers)
        c = report["counts"]
        rows.append([label, dedup, str(workers), f"{mb * scale:.0f}", f"{c['read']:,}", f"{c['kept']:,}",
                     f"{sum(c['removed'].values()):,}", f"{seconds:.1f}", f"{mb * scale / seconds:.2f}", f"{rss:.0f}"])
        (work / f"{label}_{dedup}.jsonl").unlink()
    table("1. clean.py --stage pretrain (default filters; time includes process start; 10x = every file at "
          "weight 10, so 9 of every 10 records are exact duplicates)",
          ["size", "dedup", "workers", "input MB", "read", "kept", "removed", "seconds", "MB/s", "peak RSS MB"], rows)

    near = index_bytes_per_million(True, args.near_records)
    exact = index_bytes_per_million(False, args.exact_records)
    table(f"2. duplicate index memory per million kept records (tracemalloc; near measured on {args.near_records:,}, "
          f"exact on {args.exact_records:,} distinct 200-character records, scaled)",
          ["index", "MB per million records"], [["exact (8-byte digests in a set)", f"{exact / 1e6:.0f}"],
                                                ["near (+ 9 LSH band digests, 128 perms)", f"{near / 1e6:.0f}"]])


if __name__ == "__main__":
    main()
