#!/usr/bin/env python3
"""Benchmark preprocess/clean.py and print tables (not a test: numbers depend on the machine).

1. clean throughput (MB of input read per second) and peak RSS of a fresh clean.py process on the
   pretrain set at 1x and 10x, with 1 and 2 workers (``FILE:10``: every record read ten times, so the copies are exact
   duplicates), with --dedup near and exact;
2. the duplicate index's memory per million records: a DuplicateIndex fed a million distinct synthetic
   fingerprints (it stores 64-bit digests, whatever the text), against plain Python sets of the same ints.

    python bench/bench_clean.py                 # ../shared/data/pretrain if present, else data/sample
    python bench/bench_clean.py --data DIR --index-records 200000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_pack import SHARED, table  # noqa: E402

from preprocess.textfilters import DuplicateIndex, Fingerprint, Fingerprinter  # noqa: E402


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


def synthetic_fingerprints(bands: int, n: int) -> Iterator[Fingerprint]:
    """``n`` distinct fingerprints of random 64-bit digests (the index stores digests only, so their memory
    is that of real ones; a real near fingerprint costs a MinHash each)."""
    rng = random.Random(0)
    for _ in range(n):
        yield Fingerprint(rng.getrandbits(64), tuple(rng.getrandbits(64) for _ in range(bands)))


def set_bytes(values: set[int]) -> int:
    """A Python set of ints: the table and every int object."""
    return sys.getsizeof(values) + sum(sys.getsizeof(v) for v in values)


def index_bytes_per_million(bands: int, n: int) -> tuple[float, float]:
    """(bytes of a DuplicateIndex fed ``n`` distinct records, the same for two plain Python sets of the same
    ints), per million records. Counted from the structures: each DigestSet's sorted array and its
    buffer set of ints. A merge briefly holds up to two more copies of the array it merges into."""
    index, exact, band_set = DuplicateIndex(), set(), set()
    plain = min(n, 200_000)  # the plain sets take ~0.9 GB per million: measured on fewer, scaled
    for i, fp in enumerate(synthetic_fingerprints(bands, n)):
        if index.match(fp) is None:
            index.add(fp)
        if i < plain:
            exact.add(fp.digest)
            band_set.update(fp.bands)
    now = sum(d.sorted.nbytes + set_bytes(d.recent) for d in (index.exact, index.bands))
    return now / n * 1_000_000, (set_bytes(exact) + set_bytes(band_set)) / plain * 1_000_000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = SHARED / "pretrain" if SHARED.is_dir() else REPO / "data" / "sample" / "pretrain"
    p.add_argument("--data", type=Path, default=default, help="folder of pretrain JSONL")
    p.add_argument("--index-records", type=int, default=1_000_000, help="records fed to the index for its memory")
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
    shutil.rmtree(work)
    table("1. clean.py --stage pretrain (default filters; time includes process start; 10x = every file at "
          "weight 10, so 9 of every 10 records are exact duplicates)",
          ["size", "dedup", "workers", "input MB", "read", "kept", "removed", "seconds", "MB/s", "peak RSS MB"], rows)

    bands = Fingerprinter(near=True).b
    rows = []
    for label, n_bands in (("exact (one 8-byte digest per record)", 0), (f"near (+ {bands} LSH band digests)", bands)):
        now, plain = index_bytes_per_million(n_bands, args.index_records)
        rows.append([label, f"{now / 1e6:.0f}", f"{plain / 1e6:.0f}"])
    table(f"2. duplicate index memory per million records ({args.index_records:,} distinct records; DigestSet = a "
          "sorted uint64 array + a set of the latest <= 262,144 digests, merged into it when full)",
          ["index", "DigestSet MB per million", "plain Python sets MB per million (before)"], rows)

if __name__ == "__main__":
    main()
