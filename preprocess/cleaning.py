"""One clean.py run: prepared records in input order -> --exclude and duplicate decisions (in this
process, so the output does not depend on the worker count) -> the output (in order, or shuffled through
an index of offsets, cut at --target-mb) and the report. Outputs never replace inputs
(:func:`check_outputs`); every error after records were read says what became of them (:func:`accounting`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from core.errors import TinyLMError
from core.files import (
    Named,
    atomic_open,
    atomic_write_json,
    check_file_target,
    refuse_inputs,
    refuse_same_outputs,
    temp_path,
)
from preprocess.clean_options import CleanError, CleanOptions
from preprocess.clean_records import (
    Prepared,
    Preparer,
    Source,
    init_worker,
    key_of,
    parse_sources,
    prepare_in_worker,
    source_items,
)
from preprocess.parallel import chunks, pool_map, usable_cores
from preprocess.records import RecordError
from preprocess.sources import (
    BYTES_PER_CHAR_MAX,
    Item,
    iter_items,
    parse_input_args,
)
from preprocess.textfilters import (
    DuplicateIndex,
    Fingerprint,
)

REPORT_VERSION = 1
EXAMPLES = 3  # examples kept per removal reason in the report
CHUNK_RECORDS = 256  # records per batch sent to a worker


@dataclass
class CleanResult:
    """What :func:`clean` did; :meth:`report` is the report JSON."""

    opts: CleanOptions
    read: int = 0
    kept: int = 0
    written: int = 0  # records in the output (``kept`` less what --target-mb cut)
    bytes_written: int = 0
    input_bytes: int = 0
    skipped: Counter = field(default_factory=Counter)  # bad records (--skip-bad), by reason
    removed: Counter = field(default_factory=Counter)  # filtered records, by reason
    examples: dict[str, list[dict]] = field(default_factory=dict)
    per_source: dict[str, Counter] = field(default_factory=dict)
    excluded_keys: int = 0
    index_entries: int = 0
    seconds: float = 0.0

    def note(self, reason: str, p: Prepared, removed: bool) -> None:
        """Count one skipped or removed record and keep the first few examples of each reason."""
        (self.removed if removed else self.skipped)[reason] += 1
        self.per_source[p.source]["removed" if removed else "skipped"] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES:
            examples.append({"source": p.source, "line": p.line, "preview": p.preview})

    def report(self) -> dict:
        o = self.opts
        options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(o).items()
                   if k not in ("inputs", "out", "report", "quiet")}
        return {
            "version": REPORT_VERSION, "stage": o.stage, "inputs": o.inputs, "out": str(o.out),
            "options": options,
            "counts": {"read": self.read, "kept": self.kept, "written": self.written,
                       "skipped": dict(sorted(self.skipped.items())), "removed": dict(sorted(self.removed.items())),
                       "cut_by_target_mb": self.kept - self.written},
            "per_source": {s: {"read": c["read"], "kept": c["kept"], "removed": c["removed"], "skipped": c["skipped"]}
                           for s, c in self.per_source.items()},
            "examples": {k: v for k, v in sorted(self.examples.items())},
            "dedup_index": {"entries": self.index_entries, "excluded_entries": self.excluded_keys},
            "bytes": {"input": self.input_bytes, "output": self.bytes_written},
            "seconds": round(self.seconds, 3),
        }

class Deduplicator:
    """The sequential part, in input order: --exclude matches, then duplicates of earlier kept records; counts
    every outcome in the result. State: the two duplicate indexes."""

    def __init__(self, opts: CleanOptions, result: CleanResult):
        self.opts, self.result = opts, result
        self.seen = DuplicateIndex() if opts.dedup != "none" else None
        self.held_out = DuplicateIndex()

    def load_exclusions(self, preparer: Preparer, max_line: int) -> None:
        """Index every record of the --exclude files (validated like the inputs; a bad one is fatal)."""
        for item in iter_items(parse_input_args(self.opts.exclude), max_line) if self.opts.exclude else ():
            try:
                record = preparer.parse(item)
            except RecordError as e:
                raise e.at(item).with_hint("every --exclude record must be valid for this --stage") from None
            self.held_out.add(preparer.fingerprint(key_of(record, self.opts.dedup_key)))
        self.result.excluded_keys = len(self.held_out)

    def decide(self, p: Prepared) -> bytes | None:
        """The output line of a kept record, or None (counted in the result under its reason)."""
        if p.error is not None:
            raise p.error
        result = self.result
        result.read += 1
        result.per_source.setdefault(p.source, Counter())["read"] += 1
        reason = p.reason or self.duplicate_reason(p.fingerprint)
        if reason is not None:
            result.note(reason, p, removed=p.removed)
            return None
        result.kept += 1
        result.per_source[p.source]["kept"] += 1
        return p.output

    def duplicate_reason(self, fp: Fingerprint | None) -> str | None:
        """excluded (matches an --exclude record), exact_duplicate or near_duplicate; adds a new key."""
        if fp is None:
            return None
        if len(self.held_out) and self.held_out.match(fp) is not None:
            return "excluded"
        if self.seen is None:
            return None
        if (kind := self.seen.match(fp)) is not None:
            return f"{kind}_duplicate"
        self.seen.add(fp)
        self.result.index_entries = len(self.seen)
        return None


def prepared(opts: CleanOptions, preparer: Preparer, items: Iterator[Item], workers: int) -> Iterator[Prepared]:
    """Every item prepared, in input order: in this process, or by ``workers`` processes in chunks."""
    if workers == 1:
        yield from (preparer(item) for item in items)
        return

    def died(first: Item) -> CleanError:
        return CleanError(f"a worker process died (killed, or out of memory?) while cleaning the {CHUNK_RECORDS} "
                          f"records from {first.source}:{first.line} on; lower --workers and re-run")
    batches = pool_map(prepare_in_worker, chunks(items, CHUNK_RECORDS), workers, init_worker, (opts,), died)
    with contextlib.closing(batches):  # closing this generator shuts the pool down at once
        for batch in batches:
            yield from batch

@contextlib.contextmanager
def output_stream(path: Path) -> Iterator:
    """A binary stream that becomes ``path`` atomically when the block ends; ``.zst`` compresses it."""
    with atomic_open(path) as f:
        if path.name.endswith(".zst"):
            import zstandard

            with zstandard.ZstdCompressor(level=3).stream_writer(f, closefd=False) as z:
                yield z
        else:
            yield f


def write_in_order(lines: Iterator[bytes], path: Path, budget: int) -> tuple[int, int]:
    """Write lines to ``path`` until the next would pass ``budget`` bytes (0: no limit): (records, bytes)."""
    records = size = 0
    with output_stream(path) as out:
        for line in lines:
            if budget and size + len(line) > budget:
                break
            out.write(line)
            records, size = records + 1, size + len(line)
    return records, size


def spooled_shuffle(lines: Iterator[bytes], path: Path, seed: int, budget: int) -> tuple[int, int]:
    """Shuffle through an index of offsets: spool the lines to a temp file beside ``path`` (keeping one
    int64 offset per line), then copy them out in a seeded permutation (numpy PCG64, so a seed gives the
    same order everywhere), stopping at ``budget`` bytes. The spool is removed whatever happens."""
    spool = Path(f"{temp_path(path)}.spool")
    offsets: list[int] = [0]
    try:
        with spool.open("wb") as f:
            for line in lines:
                f.write(line)
                offsets.append(offsets[-1] + len(line))
        bounds = np.array(offsets, dtype=np.int64)
        order = np.random.default_rng(seed).permutation(len(bounds) - 1)
        with spool.open("rb") as f:
            def shuffled() -> Iterator[bytes]:
                for i in order:
                    f.seek(int(bounds[i]))
                    yield f.read(int(bounds[i + 1] - bounds[i]))
            return write_in_order(shuffled(), path, budget)
    except OSError as e:
        raise CleanError(f"cannot spool records for shuffling ({e.strerror or e})", path=spool) from None
    finally:
        spool.unlink(missing_ok=True)


def input_paths(opts: CleanOptions, sources: list[Source]) -> list[Named]:
    """Every file a run reads: the inputs, the --exclude files and the --filter files."""
    named: list[Named] = [("--input", s.spec.path) for s in sources]
    named += [("--exclude", s.path) for s in (parse_input_args(opts.exclude) if opts.exclude else [])]
    named += [("--filter", target) for spec in opts.filters
              if (target := spec.rpartition(":")[0]).endswith(".py")]
    return named


def check_outputs(opts: CleanOptions, sources: list[Source]) -> None:
    """Refuse an --out or --report that is a file this run reads, or --report == --out (one line each)."""
    inputs = input_paths(opts, sources)
    refuse_same_outputs([("--out", opts.out), ("--report", opts.report)])
    refuse_inputs(opts.out, inputs, "--out")
    if opts.report is not None:
        refuse_inputs(opts.report, inputs, "--report")


def clean(opts: CleanOptions) -> CleanResult:
    """Clean ``opts.inputs`` into ``opts.out`` (and ``opts.report``); every problem is a TinyLMError
    (one line) and leaves no output, no report and no temp file."""
    if message := opts.problem():
        raise CleanError(message)
    sources = parse_sources(opts.inputs)
    check_outputs(opts, sources)
    check_file_target(opts.out)
    if opts.report is not None:
        check_file_target(opts.report, "report file")
    max_line = BYTES_PER_CHAR_MAX * opts.max_record_chars
    result = CleanResult(opts, input_bytes=sum(s.spec.path.stat().st_size for s in sources))
    preparer, dedup = Preparer(opts), Deduplicator(opts, result)
    start = time.perf_counter()
    dedup.load_exclusions(preparer, max_line)
    workers = min(opts.workers, usable_cores()) if opts.workers else usable_cores()
    items = source_items(sources, max_line)
    every = prepared(opts, preparer, items, workers)
    kept = (line for p in every if (line := dedup.decide(p)) is not None)
    budget = math.ceil(opts.target_mb * 1_000_000) if opts.target_mb else 0  # a positive budget is >= 1 byte
    try:
        with contextlib.closing(every):  # the worker pool is shut down here, whatever happens
            if opts.shuffle or budget:
                result.written, result.bytes_written = spooled_shuffle(kept, opts.out, opts.seed, budget)
            else:
                result.written, result.bytes_written = write_in_order(kept, opts.out, 0)
    except TinyLMError as e:  # records were read: say what became of them
        raise e.with_hint(f"so far: {accounting(result)}") from None
    result.seconds = time.perf_counter() - start
    if opts.report is not None:
        atomic_write_json(opts.report, result.report())
    return result


def accounting(result: CleanResult) -> str:
    """``read N = kept K + removed R (reasons) + skipped S (reasons)``."""
    def part(counts: Counter) -> str:
        return f" ({', '.join(f'{k} {v:,}' for k, v in sorted(counts.items()))})" if counts else ""
    return (f"read {result.read:,} = kept {result.kept:,} + removed {sum(result.removed.values()):,}"
            f"{part(result.removed)} + skipped {sum(result.skipped.values()):,}{part(result.skipped)}")
