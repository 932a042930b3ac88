#!/usr/bin/env python3
"""Benchmark the data path and print tables (not a test: numbers depend on the machine).

1. pack.py end to end (a fresh process: start-up, reading, validation, rendering, tokenizing, packing,
   writing) against the raw ``tokenizers`` ``encode_batch`` rate on the same texts and cores (a fresh process
   whose timer covers only its ``encode_batch`` calls, on ``RAYON_NUM_THREADS=--workers`` threads), on a
   small (5 MB) pretrain and sft input, the whole pretrain and sft sets (their files interleaved a line at a
   time into one), and the large generated inputs of ``--large-shapes`` at ``--large-mb`` each
   (``bench/minimind_shapes.py``: the pretrain set with texts rotated; MiniMind-3's ``sft_t2t`` shape, packed
   with ``--sft-t2t-tokenizer``, MiniMind-3's by default, whose template picks the chat family for pack and for
   the raw arm's rendering). The arms run alternately, ``--repeats`` times, and the medians are printed, with
   each arm's CPU seconds (all its processes and threads) and peak RSS (its largest process); generated
   files are deleted afterwards. The project's modules are byte-compiled first, as any second run of a tool
   finds them (PYTHONDONTWRITEBYTECODE stops Python writing them, and each run would compile them again);
1b. for each large input, from the same pack runs: MB/s, tokens/s against raw, peak RSS of the largest
   process (exact, from ``wait4``) and of all pack's processes together (main + workers, sampled from
   ``/proc``), disk bytes per token (every file pack wrote / meta.json's tokens) and per supervised token,
   and a linear extrapolation of time and disk to a ``--extrapolate-gb`` input of the same shape;
2. loader batches/s (micro-batch x seq_len) and peak RSS for a dataset at 1x and 10x size;
3. packing efficiency (real tokens / row slots) against padding every record to the row length.

    python bench/bench_pack.py                 # ../shared/data if present, else data/sample
    python bench/bench_pack.py --data DIR --workers 2 --large-mb 250 --repeats 3
    python bench/bench_pack.py --only-large --large-shapes pretrain,sft_t2t --large-mb 1024 --seq-len 768
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
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.chat_families import TINYLM, ChatFamily  # noqa: E402
from core.chat_template import render_text  # noqa: E402
from core.numbers import number  # noqa: E402
from core.tokenizer import DEFAULT_TOKENIZER  # noqa: E402
from preprocess.records import parse_conversation  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from minimind_shapes import SHAPES, STAGE, generate  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
MINIMIND3_TOKENIZER = REPO / "data" / "tokenizers" / "minimind3"


def record_text(stage: str, row: dict, family: ChatFamily = TINYLM) -> str:
    """What the raw arm tokenizes for a record: its text, or its whole conversation as pack reads it (tools
    and calls given as JSON strings decoded, flat calls accepted) rendered in ``family``."""
    return row["text"] if stage == "pretrain" else render_text(parse_conversation(row), family=family)


RAW_PROBE = """
import json, os, sys, time
sys.path.insert(0, {repo!r})
from bench_pack import record_text
from core.tokenizer import load_tokenizer
info = load_tokenizer({tokenizer!r})
tok = info.tokenizer
family = None if {stage!r} == "pretrain" else info.chat_family
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
            batch.append(record_text({stage!r}, json.loads(line), family))
            if len(batch) == {batch}:
                encode(batch)
                batch = []
encode(batch)
print(seconds, cpu, tokens)
"""


@dataclass
class Run:
    """One arm's run: wall seconds, CPU seconds (user + system of all its processes and threads), peak RSS
    MB of its largest process, tokens; for pack also the peak RSS and PSS MB of all its processes together
    (sampled), the bytes it wrote and its supervised tokens."""

    seconds: float
    cpu: float
    rss: float
    tokens: int
    rss_all: float = 0.0
    pss_all: float = 0.0
    disk: float = 0.0
    supervised: float = 0.0


def median_run(runs: list[Run]) -> Run:
    """The field-by-field median of ``runs``."""
    return Run(*(statistics.median(getattr(r, f.name) for r in runs) for f in fields(Run)))


class TreeMemory:
    """Samples the summed RSS and PSS of a process and all its descendants every ``interval`` seconds
    (``/proc/PID/task/*/children`` and ``/proc/PID/smaps_rollup``; Linux only: elsewhere the peaks stay 0).
    PSS splits pages shared after fork between the processes sharing them, so its sum does not count
    them twice; RSS counts each process's pages in full. A peak shorter than the interval can be missed."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval = pid, interval
        self.rss = self.pss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = pss = 0.0
            for pid in self._tree():
                r, p = self._usage(pid)
                rss, pss = rss + r, pss + p
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            self._stop.wait(self.interval)

    def _tree(self) -> list[int]:
        found, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
            except OSError:  # gone, or no /proc
                continue
        return found

    @staticmethod
    def _usage(pid: int) -> tuple[float, float]:
        """(RSS MB, PSS MB) of one process; zeros when it is gone."""
        rss = pss = 0.0
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss = int(line.split()[1]) / 1024
                    elif line.startswith("Pss:"):
                        pss = int(line.split()[1]) / 1024
        except (OSError, ValueError):
            pass
        return rss, pss


def waited(cmd: list[str], env: dict | None = None,
           sample: bool = False) -> tuple[float, float, float, str, TreeMemory | None]:
    """(wall seconds, CPU seconds, peak RSS MB, stdout, the summed-memory sampler when ``sample``) of a fresh
    process and the children it waited for. The peak RSS is ``wait4``'s: that of the largest of the process
    and its reaped descendants (each worker on its own, not their sum)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    memory = TreeMemory(proc.pid) if sample else None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if memory is not None:
        memory.stop()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, out, memory


def raw_run(stage: str, files: list[Path], tokenizer_dir: str, threads: int, method: str = "encode_batch") -> Run:
    """The raw arm: ``method`` over the records' texts in batches of 10,000, timed around the calls only."""
    code = RAW_PROBE.format(repo=str(REPO), tokenizer=tokenizer_dir, files=[str(f) for f in files], stage=stage,
                            method=method, batch=10_000)
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO / "bench")}
    _, _, rss, out, _ = waited([sys.executable, "-c", code], env)
    seconds, cpu, tokens = out.split()
    return Run(float(seconds), float(cpu), rss, int(tokens))


def pack_run(stage: str, inputs: list[str], out: Path, workers: int, tokenizer_dir: str, seq_len: int) -> Run:
    """The pack arm: one whole ``pack.py`` process (timed from its start to its exit), output removed after."""
    cmd = [sys.executable, str(REPO / "preprocess" / "pack.py"), "--stage", stage, "--input", *inputs,
           "--out", str(out), "--workers", str(workers), "--tokenizer", tokenizer_dir, "--seq-len", str(seq_len),
           "--quiet", "--overwrite"]
    seconds, cpu, rss, _, memory = waited(cmd, sample=True)
    counts = json.loads((out / "meta.json").read_text())["counts"]
    disk = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    shutil.rmtree(out)
    return Run(seconds, cpu, rss, counts["tokens"], memory.rss, memory.pss, disk, counts["supervised_tokens"])


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


@dataclass
class Case:
    """One input of section 1: its label, the stage that reads it, the file, the tokenizer, how many runs."""

    label: str
    stage: str
    path: Path
    tokenizer: str
    repeats: int


def compare_arms(case: Case, args: argparse.Namespace, work: Path) -> tuple[list[str], dict[str, Run], float]:
    """Alternate raw, fast, pack runs ``case.repeats`` times on one file: one table row of medians, the
    medians of each arm, and the median over runs of raw seconds / pack seconds."""
    stage, path, tokenizer = case.stage, case.path, case.tokenizer
    runs: dict[str, list[Run]] = {"raw": [], "fast": [], "pack": []}
    for _ in range(case.repeats):
        runs["raw"].append(raw_run(stage, [path], tokenizer, args.workers))
        runs["fast"].append(raw_run(stage, [path], tokenizer, args.workers, "encode_batch_fast"))
        runs["pack"].append(pack_run(stage, [str(path)], work / "packed", args.workers, tokenizer, args.seq_len))
    med = {arm: median_run(rs) for arm, rs in runs.items()}
    raw, fast, pack = med["raw"], med["fast"], med["pack"]
    ratios = [statistics.median(r.seconds / p.seconds for r, p in zip(runs["raw"], runs["pack"], strict=True)),
              statistics.median(r.cpu / p.cpu for r, p in zip(runs["raw"], runs["pack"], strict=True))]
    mb = path.stat().st_size / 1e6
    return [case.label, f"{mb:.0f}", str(case.repeats), f"{pack.tokens:,.0f}", f"{raw.seconds:.1f}",
            f"{fast.seconds:.1f}", f"{pack.seconds:.1f}",
            f"{raw.tokens / raw.seconds:,.0f}", f"{pack.tokens / pack.seconds:,.0f}", f"{ratios[0]:.2f}",
            f"{fast.seconds / pack.seconds:.2f}", f"{raw.cpu:.1f}", f"{pack.cpu:.1f}", f"{ratios[1]:.2f}",
            f"{raw.rss:.0f}", f"{pack.rss:.0f}"], med, ratios[0]


def large_cases(args: argparse.Namespace, work: Path) -> list[Case]:
    """The generated inputs of ``--large-shapes`` at ``--large-mb`` each (none when it is 0)."""
    if not args.large_mb:
        return []
    cases = []
    for shape in args.large_shapes:
        path = generate(shape, args.data, args.large_mb, work / f"{shape}_large.jsonl")
        tokenizer = args.tokenizer if shape == "pretrain" else args.sft_t2t_tokenizer
        cases.append(Case(f"{shape} (generated)", STAGE[shape], path, tokenizer, args.large_repeats))
    return cases


def full_size_row(case: Case, mb: float, raw: Run, pack: Run, ratio: float) -> list[str]:
    """Section 1b's row for one large input, from the medians of its runs."""
    per_supervised = f"{pack.disk / pack.supervised:.2f}" if case.stage != "pretrain" and pack.supervised else "-"
    return [case.label, Path(case.tokenizer).name, f"{mb:,.0f}", str(case.repeats), f"{pack.tokens:,.0f}",
            f"{pack.supervised:,.0f}" if case.stage != "pretrain" else "-", f"{pack.seconds:,.1f}",
            f"{mb / pack.seconds:.2f}", f"{pack.tokens / pack.seconds:,.0f}", f"{raw.tokens / raw.seconds:,.0f}",
            f"{ratio:.2f}", f"{pack.rss:.0f}", f"{pack.rss_all:.0f}", f"{pack.pss_all:.0f}",
            f"{pack.disk / 1e6:,.0f}", f"{pack.disk / pack.tokens:.2f}", per_supervised]


def extrapolation(case: Case, mb: float, pack: Run, target_gb: float) -> str:
    """One line: pack time and disk for a ``target_gb`` GB input of the case's shape, scaled linearly."""
    seconds = target_gb * 1e3 / (mb / pack.seconds)
    disk_gb = pack.disk / (mb * 1e6) * target_gb
    return (f"  {case.label}: {target_gb:g} GB at {mb / pack.seconds:.2f} MB/s -> pack ~{seconds / 3600:.1f} h "
            f"({seconds / 60:,.0f} min); shards ~{disk_gb:.1f} GB ({pack.disk / (mb * 1e6):.2f} bytes written per "
            "input byte)")


def throughput_table(args: argparse.Namespace, work: Path) -> None:
    """Section 1: pack.py against raw encode_batch on the small and large inputs; 1b: the large inputs'
    throughput, memory, disk and extrapolation."""
    pretrain = sorted((args.data / "pretrain").glob("*.jsonl"))
    sft = sorted((args.data / "sft").glob("*.jsonl"))
    cases = [] if args.only_large else [
        Case("pretrain", "pretrain", head_file(pretrain, 5, work / "pretrain_5mb.jsonl"), args.tokenizer, args.repeats),
        Case("sft", "sft", head_file(sft, 5, work / "sft_5mb.jsonl"), args.tokenizer, args.repeats),
        Case("pretrain", "pretrain", head_file(pretrain, float("inf"), work / "pretrain_all.jsonl"), args.tokenizer,
             args.repeats),
        Case("sft", "sft", head_file(sft, float("inf"), work / "sft_all.jsonl"), args.tokenizer, args.repeats)]
    large = large_cases(args, work)
    rows, full, lines = [], [], []
    for case in [*cases, *large]:
        mb = case.path.stat().st_size / 1e6
        row, med, ratio = compare_arms(case, args, work)
        rows.append(row)
        if case in large:
            full.append(full_size_row(case, mb, med["raw"], med["pack"], ratio))
            lines.append(extrapolation(case, mb, med["pack"], args.extrapolate_gb))
        case.path.unlink()
    table(f"1. pack.py end to end vs raw tokenizers encode_batch, same texts, {args.workers} worker process(es) vs "
          f"{args.workers} encode_batch thread(s); medians of 'runs' alternating runs; raw = encode_batch, "
          "fast = encode_batch_fast (ids without offsets: what pack.py calls); pack/raw = the median over runs of raw "
          "seconds / pack seconds (the rate ratio), pack/fast = median fast s / median pack s; CPU = user + system "
          "seconds of every process and thread of the arm",
          ["stage", "input MB", "runs", "tokens", "raw s", "fast s", "pack s", "raw tok/s", "pack tok/s", "pack/raw",
           "pack/fast", "raw CPU s", "pack CPU s", "CPU raw/pack (median per run)", "raw peak RSS MB",
           "pack peak RSS MB"], rows)
    if full:
        table(f"1b. large generated inputs: pack.py with {args.workers} worker process(es), seq_len {args.seq_len}; "
              "medians of 'runs' runs; MB/s = input MB / pack wall seconds; raw tok/s = encode_batch on the same "
              "texts (sft: the conversation as pack reads it, rendered in the tokenizer's chat family); pack/raw "
              "as in table 1; peak RSS: 'largest' = the largest single process (main or one worker, exact, from "
              "wait4), 'all' = main + workers summed (sampled every 0.1 s), PSS = the same sum with shared pages "
              "split between their processes; disk = every file pack wrote",
              ["input", "tokenizer", "input MB", "runs", "tokens", "supervised", "pack s", "MB/s", "pack tok/s",
               "raw tok/s", "pack/raw", "peak RSS MB largest", "peak RSS MB all", "peak PSS MB all", "disk MB",
               "disk B/token", "disk B/supervised token"], full)
        print(f"\nExtrapolation (linear in input size from the rows above, not a measurement) to a "
              f"{args.extrapolate_gb:g} GB input of the same shape, {args.workers} worker(s):")
        print("\n".join(lines))


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


def shapes(value: str) -> tuple[str, ...]:
    """``--large-shapes``: names of :data:`minimind_shapes.SHAPES`, comma-separated."""
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in SHAPES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected shapes among {', '.join(SHAPES)}, got {value!r}")
    return names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=SHARED if SHARED.is_dir() else REPO / "data" / "sample",
                   help="folder with pretrain/ and sft/ JSONL")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    p.add_argument("--workers", type=number(int, 1), default=os.cpu_count() or 1)
    p.add_argument("--seq-len", type=number(int, 2), default=512)
    p.add_argument("--batch", type=number(int, 1), default=16)
    p.add_argument("--steps", type=number(int, 1), default=300)
    p.add_argument("--large-mb", type=number(float, 0), default=250,
                   help="size of each generated large input (0: none)")
    p.add_argument("--large-shapes", type=shapes, default=("pretrain",),
                   help=f"comma-separated shapes of the generated large inputs (of {', '.join(SHAPES)}; "
                        "default pretrain)")
    p.add_argument("--sft-t2t-tokenizer", default=str(MINIMIND3_TOKENIZER),
                   help="tokenizer of the sft_t2t input (default: MiniMind-3's, data/tokenizers/minimind3)")
    p.add_argument("--extrapolate-gb", type=number(float, 0, low_open=True), default=14,
                   help="input size in GB the large rows are scaled to (default 14)")
    p.add_argument("--only-large", action="store_true",
                   help="only the large generated inputs (sections 1 and 1b), no small inputs, loader or packing "
                        "tables")
    p.add_argument("--repeats", type=number(int, 1), default=3,
                   help="alternating runs of each arm (medians are printed)")
    p.add_argument("--large-repeats", type=number(int, 1), default=2, help="alternating runs on the large input")
    p.add_argument("--skip-throughput", action="store_true", help="only the loader and packing tables")
    args = p.parse_args()
    print(f"data {args.data}, tokenizer {args.tokenizer}, {args.workers} worker(s), {os.cpu_count()} cores")
    for package in ("core", "preprocess"):  # the bytecode any second run finds; with PYTHONDONTWRITEBYTECODE
        compileall.compile_dir(REPO / package, quiet=1)  # (CI, containers) each pack.py run would compile it

    work = Path(tempfile.mkdtemp(prefix="tinylm-bench-"))
    if not args.skip_throughput:
        throughput_table(args, work)
    if args.only_large:
        shutil.rmtree(work)
        return
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
