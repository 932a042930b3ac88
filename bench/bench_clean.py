#!/usr/bin/env python3
"""Benchmark preprocess/clean.py and print tables (not a test: numbers depend on the machine).

1. clean throughput (MB of input read per second) and peak RSS of a fresh clean.py process on the
   pretrain set at 1x and 10x, with 1 and 2 workers (``FILE:10``: every record read ten times, so the copies are exact
   duplicates), with --dedup near and exact;
2. the duplicate index's memory per million records: a DuplicateIndex fed a million distinct synthetic
   fingerprints (it stores 64-bit digests, whatever the text), against plain Python sets of the same ints;
3. with ``--large-mb N``: clean.py on the generated inputs of ``--large-shapes`` (``bench/minimind_shapes.py``,
   the same files bench_pack.py packs: pretrain records, MiniMind-3's sft_t2t records read by ``--stage sft``),
   with ``--dedup near`` and ``exact``: seconds, MB/s and peak RSS of the largest process (exact, ``wait4``) and of
   main + workers summed (sampled), and the time scaled linearly to ``--extrapolate-gb``. The generated copies
   of a record differ by a rotation of their texts, so near dedup removes most copies after the first and
   its index holds only the records it keeps; exact dedup keeps them all (every record in the index and the
   output).

    python bench/bench_clean.py                 # ../shared/data/pretrain if present, else data/sample
    python bench/bench_clean.py --data DIR --index-records 200000
    python bench/bench_clean.py --only-large --large-mb 1024 --large-shapes pretrain,sft_t2t
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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_pack import SHARED, TreeMemory, shapes, table  # noqa: E402
from minimind_shapes import SHAPES, STAGE, generate  # noqa: E402

from core.numbers import number  # noqa: E402
from preprocess.textfilters import DuplicateIndex, Fingerprint, Fingerprinter  # noqa: E402


@dataclass
class CleanRun:
    """One clean.py process: wall seconds, peak RSS MB of its largest process (``wait4``: the main process or
    one reaped worker), the sampled peak RSS and PSS MB of all its processes together, its report."""

    seconds: float
    rss: float
    rss_all: float
    pss_all: float
    report: dict


def run_clean(inputs: list[str], out: Path, dedup: str, workers: int, stage: str = "pretrain") -> CleanRun:
    """One ``clean.py --stage STAGE`` process, timed from its start to its exit."""
    report = out.with_suffix(".report.json")
    cmd = [sys.executable, str(REPO / "preprocess" / "clean.py"), "--stage", stage, "--input", *inputs,
           "--out", str(out), "--report", str(report), "--dedup", dedup, "--workers", str(workers), "--quiet"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    memory = TreeMemory(proc.pid)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    memory.stop()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"clean.py failed: {' '.join(cmd)}")
    return CleanRun(seconds, usage.ru_maxrss / 1024, memory.rss, memory.pss, json.loads(report.read_text()))


def large_table(args: argparse.Namespace) -> None:
    """Section 3: clean.py on each generated large input, near and exact dedup."""
    work = Path(tempfile.mkdtemp(prefix="tinylm-bench-clean-large-"))
    rows, lines = [], []
    for shape in args.large_shapes:
        path = generate(shape, args.large_data, args.large_mb, work / f"{shape}_large.jsonl")
        mb = path.stat().st_size / 1e6
        for dedup in ("near", "exact"):
            out = work / f"{shape}_{dedup}.jsonl"
            run = run_clean([str(path)], out, dedup, args.workers, STAGE[shape])
            c = run.report["counts"]
            out_mb = out.stat().st_size / 1e6
            out.unlink()
            rows.append([shape, STAGE[shape], dedup, f"{mb:,.0f}", f"{c['read']:,}", f"{c['kept']:,}",
                         f"{sum(c['removed'].values()):,}", f"{sum(c['skipped'].values()):,}", f"{out_mb:,.0f}",
                         f"{run.seconds:,.1f}", f"{mb / run.seconds:.2f}", f"{run.rss:.0f}", f"{run.rss_all:.0f}",
                         f"{run.pss_all:.0f}"])
            seconds = args.extrapolate_gb * 1e3 / (mb / run.seconds)
            lines.append(f"  {shape}, --dedup {dedup}: {args.extrapolate_gb:g} GB at {mb / run.seconds:.2f} MB/s -> "
                         f"~{seconds / 3600:.1f} h ({seconds / 60:,.0f} min)")
        path.unlink()
    shutil.rmtree(work)
    table(f"3. clean.py on generated inputs ({args.workers} worker(s), default filters, one run each; peak RSS: "
          "'largest' = the largest single process, exact, from wait4; 'all' = main + workers summed, sampled "
          "every 0.1 s; PSS = the same sum with shared pages split between their processes)",
          ["shape", "stage", "dedup", "input MB", "read", "kept", "removed", "skipped", "output MB", "seconds",
           "MB/s", "peak RSS MB largest", "peak RSS MB all", "peak PSS MB all"], rows)
    print(f"\nExtrapolation (linear in input size, not a measurement; the duplicate index grows with the records "
          f"kept, see table 2) to a {args.extrapolate_gb:g} GB input of the same shape:")
    print("\n".join(lines))


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
    p.add_argument("--index-records", type=number(int, 1), default=1_000_000,
                   help="records fed to the index for its memory")
    p.add_argument("--large-mb", type=number(float, 0), default=0,
                   help="size of each generated large input of section 3 (default 0: no section 3)")
    p.add_argument("--large-shapes", type=shapes, default=SHAPES,
                   help=f"comma-separated shapes of the generated inputs (of {', '.join(SHAPES)}; default both)")
    p.add_argument("--large-data", type=Path, default=SHARED if SHARED.is_dir() else REPO / "data" / "sample",
                   help="folder with pretrain/, sft/ and reasoning/ JSONL the large inputs are made from")
    p.add_argument("--workers", type=number(int, 1), default=len(os.sched_getaffinity(0)),
                   help="clean.py --workers of section 3 (default: every usable core)")
    p.add_argument("--extrapolate-gb", type=number(float, 0, low_open=True), default=14,
                   help="input size in GB section 3's times are scaled to (default 14)")
    p.add_argument("--only-large", action="store_true", help="only section 3")
    args = p.parse_args()
    if args.only_large:
        if not args.large_mb:
            p.error("--only-large needs --large-mb N")
        large_table(args)
        return
    files = [str(f) for f in sorted(args.data.glob("*.jsonl"))]
    mb = sum(Path(f).stat().st_size for f in files) / 1e6
    print(f"data {args.data} ({len(files)} files, {mb:.1f} MB), {os.cpu_count()} cores")

    work = Path(tempfile.mkdtemp(prefix="tinylm-bench-clean-"))
    rows = []
    for label, scale, dedup, workers in (("1x", 1, "near", 1), ("1x", 1, "near", 2), ("1x", 1, "exact", 2),
                                         ("10x", 10, "near", 2)):
        inputs = files if scale == 1 else [f"{f}:{scale}" for f in files]
        run = run_clean(inputs, work / f"{label}_{dedup}.jsonl", dedup, workers)
        seconds, rss, c = run.seconds, run.rss, run.report["counts"]
        rows.append([label, dedup, str(workers), f"{mb * scale:.0f}", f"{c['read']:,}", f"{c['kept']:,}",
                     f"{sum(c['removed'].values()):,}", f"{seconds:.1f}", f"{mb * scale / seconds:.2f}", f"{rss:.0f}"])
        (work / f"{label}_{dedup}.jsonl").unlink()
    shutil.rmtree(work)
    table("1. clean.py --stage pretrain (default filters; time includes process start; 10x = every file at "
          "weight 10, so 9 of every 10 records are exact duplicates)",
          ["size", "dedup", "workers", "input MB", "read", "kept", "removed", "seconds", "MB/s",
           "peak RSS MB (largest process)"], rows)

    bands = Fingerprinter(near=True).b
    rows = []
    for label, n_bands in (("exact (one 8-byte digest per record)", 0), (f"near (+ {bands} LSH band digests)", bands)):
        now, plain = index_bytes_per_million(n_bands, args.index_records)
        rows.append([label, f"{now / 1e6:.0f}", f"{plain / 1e6:.0f}"])
    table(f"2. duplicate index memory per million records ({args.index_records:,} distinct records; DigestSet = a "
          "sorted uint64 array + a set of the latest <= 262,144 digests, merged into it when full)",
          ["index", "DigestSet MB per million", "plain Python sets MB per million (before)"], rows)
    if args.large_mb:
        large_table(args)

if __name__ == "__main__":
    main()
