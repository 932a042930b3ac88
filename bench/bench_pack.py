#!/usr/bin/env python3
"""Benchmark the data path and print tables (not a test: numbers depend on the machine).

1. pack.py end to end (a fresh process: start-up, reading, validation, rendering, tokenizing, packing,
   writing) against the raw ``tokenizers`` ``encode_batch`` rate on the same texts and cores (a fresh process
   whose timer covers only its ``encode_batch`` calls, on ``RAYON_NUM_THREADS=--workers`` threads), on a
   small (5 MB) and a large (>= 250 MB, generated: the pretrain set repeated with every copy's texts rotated,
   so no two records are equal) pretrain input, a 5 MB sft input, and the whole pretrain and sft sets
   (their files interleaved a line at a time into one). The arms run alternately, ``--repeats``
   times, and the medians are printed, with each arm's CPU seconds (all its processes and threads) and
   peak RSS (its largest process); the generated file is deleted afterwards. The project's modules are
   byte-compiled first, as any second run of a tool finds them (PYTHONDONTWRITEBYTECODE stops Python
   writing them, and each run would compile them again);
2. loader batches/s (micro-batch x seq_len) and peak RSS for a dataset at 1x and 10x size;
3. packing efficiency (real tokens / row slots) against padding every record to the row length.

    python bench/bench_pack.py                 # ../shared/data if present, else data/sample
    python bench/bench_pack.py --data DIR --workers 2 --large-mb 250 --repeats 3
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.chat_template import render_text  # noqa: E402
from core.tokenizer import DEFAULT_TOKENIZER  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def record_text(stage: str, row: dict) -> str:
    """What the raw arm tokenizes for a record: its text, or its whole rendered conversation."""
    return row["text"] if stage == "pretrain" else render_text(row["conversations"])


RAW_PROBE = """
import json, os, sys, time
sys.path.insert(0, {repo!r})
from bench_pack import record_text
from core.tokenizer import load_tokenizer
tok = load_tokenizer({tokenizer!r}).tokenizer
seconds = cpu = 0.0
tokens = 0
def encode(texts):
    global seconds, cpu, tokens
    start, start_cpu = time.perf_counter(), time.process_time()
    tokens += sum(len(e.ids) for e in tok.{method}(texts, add_special_tokens=False))
    seconds += time.perf_counter() - start
    cpu += time.process_time() - start_cpu
batch = []
for path in {files!r}:
    for line in open(path, encoding="utf-8"):
        if line.strip():
            batch.append(record_text({stage!r}, json.loads(line)))
            if len(batch) == {batch}:
                encode(batch)
                batch = []
encode(batch)
print(seconds, cpu, tokens)
"""


@dataclass
class Run:
    """One arm's run: wall seconds, CPU seconds (user + system of all its processes and threads), peak RSS
    MB of its largest process, tokens."""

    seconds: float
    cpu: float
    rss: float
    tokens: int


def waited(cmd: list[str], env: dict | None = None) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak RSS MB, stdout) of a fresh process and the children it waited for."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, out


def raw_run(stage: str, files: list[Path], tokenizer_dir: str, threads: int, method: str = "encode_batch") -> Run:
    """The raw arm: ``method`` over the records' texts in batches of 10,000, timed around the calls only."""
    code = RAW_PROBE.format(repo=str(REPO), tokenizer=tokenizer_dir, files=[str(f) for f in files], stage=stage,
                            method=method, batch=10_000)
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO / "bench")}
    _, _, rss, out = waited([sys.executable, "-c", code], env)
    seconds, cpu, tokens = out.split()
    return Run(float(seconds), float(cpu), rss, int(tokens))


def pack_run(stage: str, inputs: list[str], out: Path, workers: int, tokenizer_dir: str, seq_len: int) -> Run:
    """The pack arm: one whole ``pack.py`` process (timed from its start to its exit), output removed after."""
    cmd = [sys.executable, str(REPO / "preprocess" / "pack.py"), "--stage", stage, "--input", *inputs,
           "--out", str(out), "--workers", str(workers), "--tokenizer", tokenizer_dir, "--seq-len", str(seq_len),
           "--quiet", "--overwrite"]
    seconds, cpu, rss, _ = waited(cmd)
    tokens = json.loads((out / "meta.json").read_text())["counts"]["tokens"]
    shutil.rmtree(out)
    return Run(seconds, cpu, rss, tokens)


def head_file(files: list[Path], mb: float, dest: Path) -> Path:
    """The first ``mb`` MB of whole lines of ``files`` (taken in turn, a line at a time) in one file."""
    budget = mb * 1e6  # inf: every line
    handles = [f.open("rb") for f in files]
    with dest.open("wb") as out:
        while budget > 0 and handles:
            for h in list(handles):
                line = h.readline()
                if not line:
                    handles.remove(h)
                elif line.strip():
                    out.write(line)
                    budget -= len(line)
    for h in handles:
        h.close()
    return dest


def generated_file(files: list[Path], mb: float, dest: Path) -> Path:
    """At least ``mb`` MB of pretrain records: copy k of the set has every text rotated by k * 7 characters,
    so the copies are distinct records (not exact duplicates) that tokenize like the original."""
    texts = [json.loads(line)["text"] for f in files for line in f.open(encoding="utf-8") if line.strip()]
    written, copy = 0, 0
    with dest.open("w", encoding="utf-8") as out:
        while written < mb * 1e6:
            for t in texts:
                k = copy * 7 % len(t)
                line = json.dumps({"text": t[k:] + t[:k]}, ensure_ascii=False) + "\n"
                out.write(line)
                written += len(line.encode("utf-8"))
            copy += 1
    return dest


def compare_arms(stage: str, path: Path, args: argparse.Namespace, work: Path, repeats: int) -> list[str]:
    """Alternate raw, fast, pack runs ``repeats`` times on one file; one table row of medians."""
    runs: dict[str, list[Run]] = {"raw": [], "fast": [], "pack": []}
    for _ in range(repeats):
        runs["raw"].append(raw_run(stage, [path], args.tokenizer, args.workers))
        runs["fast"].append(raw_run(stage, [path], args.tokenizer, args.workers, "encode_batch_fast"))
        runs["pack"].append(pack_run(stage, [str(path)], work / "packed", args.workers, args.tokenizer,
                                     args.seq_len))
    med = {arm: Run(*(statistics.median(getattr(r, f) for r in rs) for f in ("seconds", "cpu", "rss", "tokens")))
           for arm, rs in runs.items()}
    raw, fast, pack = med["raw"], med["fast"], med["pack"]
    ratios = [statistics.median(r.seconds / p.seconds for r, p in zip(runs["raw"], runs["pack"], strict=True)),
              statistics.median(r.cpu / p.cpu for r, p in zip(runs["raw"], runs["pack"], strict=True))]
    mb = path.stat().st_size / 1e6
    return [stage, f"{mb:.0f}", str(repeats), f"{pack.tokens:,.0f}", f"{raw.seconds:.1f}", f"{fast.seconds:.1f}",
            f"{pack.seconds:.1f}",
            f"{raw.tokens / raw.seconds:,.0f}", f"{pack.tokens / pack.seconds:,.0f}", f"{ratios[0]:.2f}",
            f"{fast.seconds / pack.seconds:.2f}", f"{raw.cpu:.1f}", f"{pack.cpu:.1f}", f"{ratios[1]:.2f}",
            f"{raw.rss:.0f}", f"{pack.rss:.0f}"]


def throughput_table(args: argparse.Namespace, work: Path) -> None:
    """Section 1: pack.py against raw encode_batch on the small and large inputs."""
    pretrain = sorted((args.data / "pretrain").glob("*.jsonl"))
    sft = sorted((args.data / "sft").glob("*.jsonl"))
    cases = [("pretrain", head_file(pretrain, 5, work / "pretrain_5mb.jsonl"), args.repeats),
             ("sft", head_file(sft, 5, work / "sft_5mb.jsonl"), args.repeats),
             ("pretrain", head_file(pretrain, float("inf"), work / "pretrain_all.jsonl"), args.repeats),
             ("sft", head_file(sft, float("inf"), work / "sft_all.jsonl"), args.repeats)]
    if args.large_mb:
        cases.append(("pretrain", generated_file(pretrain, args.large_mb, work / "pretrain_large.jsonl"),
                      args.large_repeats))
    rows = []
    for stage, path, repeats in cases:
        rows.append(compare_arms(stage, path, args, work, repeats))
        path.unlink()
    table(f"1. pack.py end to end vs raw tokenizers encode_batch, same texts, {args.workers} worker process(es) vs "
          f"{args.workers} encode_batch thread(s); medians of 'runs' alternating runs; raw = encode_batch, "
          "fast = encode_batch_fast (ids without offsets: what pack.py calls); pack/raw = the median over runs of raw "
          "seconds / pack seconds (the rate ratio), pack/fast = median fast s / median pack s; CPU = user + system "
          "seconds of every process and thread of the arm",
          ["stage", "input MB", "runs", "tokens", "raw s", "fast s", "pack s", "raw tok/s", "pack tok/s", "pack/raw",
           "pack/fast", "raw CPU s", "pack CPU s", "CPU raw/pack (median per run)", "raw peak RSS MB",
           "pack peak RSS MB"], rows)


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
    p.add_argument("--large-mb", type=float, default=250, help="size of the generated large input (0: skip it)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each arm (medians are printed)")
    p.add_argument("--large-repeats", type=int, default=2, help="alternating runs on the large input")
    p.add_argument("--skip-throughput", action="store_true", help="only the loader and packing tables")
    args = p.parse_args()
    print(f"data {args.data}, tokenizer {args.tokenizer}, {args.workers} worker(s), {os.cpu_count()} cores")
    for package in ("core", "preprocess"):  # the bytecode any second run finds; with PYTHONDONTWRITEBYTECODE
        compileall.compile_dir(REPO / package, quiet=1)  # (CI, containers) each pack.py run would compile it

    work = Path(tempfile.mkdtemp(prefix="tinylm-bench-"))
    if not args.skip_throughput:
        throughput_table(args, work)
    metas = {}
    for stage in ("pretrain", "sft"):
        files = sorted((args.data / stage).glob("*.jsonl"))
        _, metas[stage] = time_pack(stage, [str(f) for f in files], work / stage, args.workers, args.tokenizer,
                                    args.seq_len)

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
    shutil.rmtree(work)
    print(f"\n(peak RSS of this driver: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
