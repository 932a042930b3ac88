#!/usr/bin/env python3
"""Clean, deduplicate and mix raw records into one JSONL file that pack.py reads.

    python preprocess/clean.py --stage sft --input 'data/sample/sft/*.jsonl' --out data/clean/sft.jsonl

Pipeline, streaming: sources (the readers and mixing weights of pack.py; ``FILE@N`` samples down or
repeats up to N records) -> the same validation as pack.py (a bad record stops the run in one line, or is
counted under its reason with ``--skip-bad``) -> placeholders (``--set name=tinylm`` fills ``{{name}}``)
-> filters in a fixed order, each record removed for the first that fails it and counted by reason:
length, language / CJK share, noise, ``--filter``, ``--exclude`` matches, duplicates -> the output
(``.jsonl`` or ``.jsonl.zst``, written atomically), optionally shuffled (``--shuffle``, ``--seed``) and
cut at ``--target-mb``. Output records are canonical: ``{"text"}``, ``{"conversations"}`` or
``{"chosen", "rejected"}``, plus ``"source"`` (the input file) unless ``--no-source``.

Only the duplicate index grows with the input (an 8-byte digest per kept record, plus a MinHash LSH
entry with ``--dedup near``); shuffling keeps one 8-byte offset per kept record and spools the records to
a temp file beside the output. ``--workers`` processes do the per-record work (validation, filters,
MinHash); duplicates are decided in input order in the main process, so the output depends only on the
inputs and options, never on the worker count.
The report JSON (``--report``) is documented in docs/FORMAT.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import re
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from core.errors import TinyLMError, run_main  # noqa: E402
from core.files import (  # noqa: E402
    Named,
    atomic_open,
    atomic_write_json,
    check_file_target,
    refuse_inputs,
    refuse_same_outputs,
    temp_path,
)
from core.numbers import (  # noqa: E402
    check_number,
    non_negative_float,
    non_negative_int,
    number,
    positive_int,
    probability,
    seed,
)
from preprocess.parallel import chunks, pool_map, usable_cores  # noqa: E402
from preprocess.records import DEFAULT_MAX_RECORD_CHARS, STAGES, Pair, RecordError, parse_record  # noqa: E402
from preprocess.sources import (  # noqa: E402
    BYTES_PER_CHAR_MAX,
    InputError,
    Item,
    SourceSpec,
    count_items,
    iter_items,
    parse_input_args,
)
from preprocess.textfilters import (  # noqa: E402
    DuplicateIndex,
    Fingerprint,
    Fingerprinter,
    Measures,
    build_tables,
    normalise,
)

REPORT_VERSION = 1
EXAMPLES = 3  # examples kept per removal reason in the report
CHUNK_RECORDS = 256  # records per batch sent to a worker
PREVIEW_CHARS = 120
DEDUP_CHOICES = ("none", "exact", "near")
LANG_CHOICES = ("any", "zh", "en")
LANG_SHARE = {"zh": 0.5, "en": 0.8}  # zh: CJK share of letters at least; en: ASCII share of letters at least
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_SAMPLE = re.compile(r"^(.*)@(\d+)$")


class CleanError(TinyLMError):
    """A fatal, user-facing problem of clean.py: one line, exit status 1."""


@dataclass(frozen=True)
class CleanOptions:
    """Everything one clean run needs (see :func:`parse_args` for each flag's meaning)."""

    stage: str
    inputs: list[str]
    out: Path
    report: Path | None = None
    # duplicates
    dedup: str = "near"
    dedup_key: str = "conversation"
    near_threshold: float = 0.8
    # length, language
    min_chars: int = 0
    max_chars: int = 0  # 0: no limit
    min_turn_chars: int = 0
    max_turn_chars: int = 0
    min_cjk_ratio: float = 0.0
    lang: str = "any"
    # noise: shares of the text
    max_symbol_ratio: float = 0.3
    max_digit_ratio: float = 0.5
    max_url_ratio: float = 0.3
    # noise: repetition, and characters refused unless allowed
    max_char_run: int = 40
    max_dup_line_ratio: float = 0.5
    allow_control: bool = False
    allow_mojibake: bool = False
    # the user's own filters, held-out files
    filters: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    # output: placeholders, source field, order and size
    placeholders: dict[str, str] = field(default_factory=dict)
    source_field: bool = True
    shuffle: bool = False
    seed: int = 0
    target_mb: float = 0.0
    # reading and running
    skip_bad: bool = False
    max_record_chars: int = DEFAULT_MAX_RECORD_CHARS
    workers: int = 0  # 0: every usable core
    quiet: bool = False

    def problem(self) -> str | None:
        """The first invalid option as a message naming its flag, or None."""
        checks = [
            (self.stage in STAGES, f"--stage must be one of {', '.join(STAGES)}"),
            (self.dedup in DEDUP_CHOICES, f"--dedup must be one of {', '.join(DEDUP_CHOICES)}"),
            (self.dedup_key in ("conversation", "first-user"), "--dedup-key must be conversation or first-user"),
            (self.dedup_key == "conversation" or self.stage in ("sft", "reason", "dpo"),
             "--dedup-key first-user applies to the chat stages (sft, reason, dpo)"),
            (check_number(self.near_threshold, float, 0, 1, low_open=True) is None,
             "--near-dup-threshold must be in (0, 1]"),
            (min(self.min_chars, self.max_chars, self.min_turn_chars, self.max_turn_chars) >= 0,
             "--min-chars / --max-chars / --min-turn-chars / --max-turn-chars must be >= 0"),
            (not self.max_chars or self.min_chars <= self.max_chars, "--min-chars must not exceed --max-chars"),
            (check_number(self.min_cjk_ratio, float, 0, 1) is None, "--min-cjk-ratio must be in [0, 1]"),
            (self.lang in LANG_CHOICES, f"--lang must be one of {', '.join(LANG_CHOICES)}"),
            (all(check_number(r, float, 0, 1) is None for r in (
                self.max_symbol_ratio, self.max_digit_ratio, self.max_url_ratio, self.max_dup_line_ratio)),
             "--max-symbol-ratio / --max-digit-ratio / --max-url-ratio / --max-dup-line-ratio must be in [0, 1]"),
            (self.max_char_run >= 0, "--max-char-run must be >= 0 (0: off)"),
            (check_number(self.target_mb, float, low=0) is None, "--target-mb must be a finite number >= 0"),
            (self.max_record_chars >= 1, "--max-record-chars must be at least 1"),
            (self.workers >= 0, "--workers must be at least 1"),
        ]
        return next((message for ok, message in checks if not ok), None)


# ---------------------------------------------------------------- inputs and sampling (FILE@N)


@dataclass(frozen=True)
class Source:
    """One input file: its spec (path, mixing weight) and, for ``FILE@N``, the record count to reach."""

    spec: SourceSpec
    target: int | None = None


def parse_sources(args: list[str]) -> list[Source]:
    """``PATH_OR_GLOB[:WEIGHT]`` (pack.py's syntax) or ``PATH_OR_GLOB@N`` (N records of each match)."""
    if not args:
        raise InputError("no --input given")
    sources: list[Source] = []
    for arg in args:
        sampled = _SAMPLE.match(arg)
        if sampled is None:
            sources += [Source(spec) for spec in parse_input_args([arg])]
            continue
        pattern, n = sampled.group(1), int(sampled.group(2))
        if n < 1:
            raise InputError(f"{arg}: the record count after @ must be at least 1")
        if re.search(r":[0-9.]+$", pattern):
            raise InputError(f"{arg}: give a mixing weight (:W) or a record count (@N), not both")
        sources += [Source(spec, n) for spec in parse_input_args([pattern])]
    return sources


def sample_mask(spec: SourceSpec, total: int, target: int) -> np.ndarray:
    """How many times each of a file's ``total`` items is emitted so that they sum to ``target``.

    ``target // total`` times each, plus once more for the ``target % total`` items of smallest
    CRC32 of (file name, position): deterministic, machine-independent, the file order kept.
    """
    counts = np.full(total, target // total, dtype=np.int64)
    extra = target % total
    if extra:
        keys = np.array([zlib.crc32(f"{spec.path.name}@{i}".encode()) for i in range(total)], dtype=np.uint64)
        counts[np.argsort(keys, kind="stable")[:extra]] += 1
    return counts


def source_items(sources: list[Source], max_line: int) -> Iterator[Item]:
    """Every item of every source: weighted as pack.py mixes them, or sampled to ``@N`` records."""
    for source in sources:
        if source.target is None:
            yield from iter_items([source.spec], max_line)
            continue
        unit = SourceSpec(source.spec.path, 1.0)
        total = count_items([unit], max_line)
        counts = sample_mask(unit, total, source.target)
        for passes in range(int(counts.max(initial=0))):
            for i, item in enumerate(iter_items([unit], max_line)):
                if counts[i] > passes:
                    yield item


# ---------------------------------------------------------------- records: text, key, placeholders


Parsed = str | list[dict] | Pair


def fill(text: str, values: dict[str, str]) -> str:
    """``{{name}}`` -> ``values['name']`` for the names given; other placeholders are left as they are."""
    if not values or "{{" not in text:
        return text
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def filled(record: Parsed, values: dict[str, str]) -> Parsed:
    if not values:
        return record
    if isinstance(record, str):
        return fill(record, values)
    if isinstance(record, Pair):
        return Pair(filled(record.chosen, values), filled(record.rejected, values))
    return [{"role": t["role"], "content": fill(t["content"], values)} for t in record]


def turns_of(record: Parsed) -> list[dict]:
    """The turns measured for a record: a conversation's, or a DPO pair's chosen turns and rejected answer."""
    if isinstance(record, Pair):
        return [*record.chosen, record.rejected[-1]]
    return [] if isinstance(record, str) else record


def text_of(record: Parsed) -> str:
    """The text the filters measure: a pretrain text, or the contents of the turns joined by newlines."""
    return record if isinstance(record, str) else "\n".join(t["content"] for t in turns_of(record))


def key_of(record: Parsed, dedup_key: str) -> str:
    """The normalised duplicate key: the text, the whole conversation (roles included) or its first user turn."""
    if isinstance(record, str):
        return normalise(record)
    turns = turns_of(record)
    if dedup_key == "first-user":
        return normalise(next(t["content"] for t in turns if t["role"] == "user"))
    return normalise("\n".join(f"{t['role']}: {t['content']}" for t in turns))


def to_json(record: Parsed, source: str | None) -> dict:
    if isinstance(record, str):
        obj: dict = {"text": record}
    elif isinstance(record, Pair):
        obj = {"chosen": record.chosen, "rejected": record.rejected}
    else:
        obj = {"conversations": record}
    if source is not None:
        obj["source"] = source
    return obj


# ---------------------------------------------------------------- filters


Predicate = Callable[[dict], object]


def load_filter(spec: str) -> tuple[str, Predicate]:
    """``module:function`` (a dotted module on sys.path, or a ``.py`` file) -> (its name, the function)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise CleanError(f"--filter {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise CleanError(f"--filter {spec!r}: no such file", path=path)
            loader = importlib.util.spec_from_file_location(f"tinylm_filter_{path.stem}", path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except CleanError:
        raise
    except Exception as e:  # noqa: BLE001  (a user's module may fail in any way on import)
        raise CleanError(f"--filter {spec!r}: cannot import {target} ({type(e).__name__}: {e})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise CleanError(f"--filter {spec!r}: {target} has no function {name!r}")
    return name, function


def length_reason(record: Parsed, opts: CleanOptions) -> str | None:
    """too_short / too_long on the record's content characters, turn_too_short / turn_too_long per turn."""
    n = len(text_of(record)) if isinstance(record, str) else sum(len(t["content"]) for t in turns_of(record))
    if n < opts.min_chars:
        return "too_short"
    if opts.max_chars and n > opts.max_chars:
        return "too_long"
    for turn in turns_of(record):
        if len(turn["content"]) < opts.min_turn_chars:
            return "turn_too_short"
        if opts.max_turn_chars and len(turn["content"]) > opts.max_turn_chars:
            return "turn_too_long"
    return None


def quality_reason(text: str, opts: CleanOptions) -> str | None:
    """The first language / noise filter the text fails, or None."""
    m = Measures.of(text)
    if opts.lang == "zh" and m.cjk_ratio < LANG_SHARE["zh"] or opts.lang == "en" and m.ascii_ratio < LANG_SHARE["en"]:
        return "lang"
    checks = [
        (m.cjk_ratio < opts.min_cjk_ratio, "low_cjk_ratio"),
        (not opts.allow_control and m.control_chars > 0, "control_chars"),
        (not opts.allow_mojibake and m.mojibake > 0, "mojibake"),
        (m.symbol_ratio > opts.max_symbol_ratio, "symbol_ratio"),
        (m.digit_ratio > opts.max_digit_ratio, "digit_ratio"),
        (m.url_ratio > opts.max_url_ratio, "url_ratio"),
        (opts.max_char_run > 0 and m.longest_run > opts.max_char_run, "repeated_chars"),
        (m.dup_line_ratio > opts.max_dup_line_ratio, "repeated_lines"),
    ]
    return next((reason for failed, reason in checks if failed), None)


# ---------------------------------------------------------------- the run


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


@dataclass(frozen=True)
class Prepared:
    """One item after the per-record work (worker side): its output line and fingerprint when it passed the
    filters, else the reason it was removed or skipped, or the error that stops the run."""

    source: str
    line: int
    output: bytes | None = None
    fingerprint: Fingerprint | None = None
    reason: str | None = None
    removed: bool = True  # the reason is a filter's (else: a bad record under --skip-bad)
    preview: str = ""
    error: TinyLMError | None = None


class Preparer:
    """The per-record work that needs no shared state: validate, fill placeholders, run the length, language,
    noise and user filters, fingerprint the duplicate key. Pure, so any worker count gives the same."""

    def __init__(self, opts: CleanOptions):
        self.opts = opts
        build_tables()
        self.fingerprint = Fingerprinter(opts.dedup == "near", opts.near_threshold)
        self.needs_key = opts.dedup != "none" or bool(opts.exclude)
        self.filters = [load_filter(spec) for spec in opts.filters]

    def parse(self, item: Item) -> Parsed:
        return filled(parse_record(item, self.opts.stage, self.opts.max_record_chars), self.opts.placeholders)

    def __call__(self, item: Item) -> Prepared:
        opts, where = self.opts, (item.source, item.line)
        try:
            record = self.parse(item)
        except RecordError as e:
            if not opts.skip_bad:
                return Prepared(*where, error=e.at(item).with_hint("pass --skip-bad to skip and count bad records"))
            return Prepared(*where, reason=e.reason, removed=False, preview=str(e.at(item)))
        text = text_of(record)
        obj = to_json(record, item.source if opts.source_field else None)
        try:
            reason = length_reason(record, opts) or quality_reason(text, opts) or self.user_reason(obj, item)
        except CleanError as e:
            return Prepared(*where, error=e)
        if reason is not None:
            return Prepared(*where, reason=reason, preview=text[:PREVIEW_CHARS])
        fp = self.fingerprint(key_of(record, opts.dedup_key)) if self.needs_key else None
        return Prepared(*where, output=encode_line(obj), fingerprint=fp, preview=text[:PREVIEW_CHARS])

    def user_reason(self, obj: dict, item: Item) -> str | None:
        for name, function in self.filters:
            try:
                value = function(obj)
            except Exception as e:  # noqa: BLE001  (a user's predicate may fail in any way)
                raise CleanError(f"--filter {name} raised {type(e).__name__}: {e}", path=item.source,
                                 line=item.line) from None
            try:
                keep = bool(value)
            except Exception as e:  # noqa: BLE001  (an array, or a __bool__ that raises)
                raise CleanError(f"--filter {name} returned a {type(value).__name__} that is neither true nor false "
                                 f"({type(e).__name__}: {e}); return True to keep the record, False to remove it",
                                 path=item.source, line=item.line) from None
            if not keep:
                return f"filter:{name}"
        return None


_WORKER: Preparer | None = None


def init_worker(opts: CleanOptions) -> None:
    global _WORKER
    _WORKER = Preparer(opts)


def prepare_in_worker(batch: list[Item]) -> list[Prepared]:
    assert _WORKER is not None
    return [_WORKER(item) for item in batch]


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
    for batch in pool_map(prepare_in_worker, chunks(items, CHUNK_RECORDS), workers, init_worker, (opts,), died):
        yield from batch


def encode_line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


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


def summary_lines(result: CleanResult) -> list[str]:
    """``read N = kept K + removed R (reasons) + skipped S (reasons)``, then what was written."""
    mb = result.input_bytes / 1e6
    rate = f", {mb / result.seconds:.1f} MB/s" if result.seconds else ""
    cut = result.kept - result.written
    lines = [f"cleaned {result.opts.stage} -> {result.opts.out}",
             f"  records  {accounting(result)}",
             f"  written  {result.written:,} records, {result.bytes_written / 1e6:.2f} MB"
             + (f" ({cut:,} kept records cut by --target-mb)" if cut else "")
             + f"  [{mb:.2f} MB read in {result.seconds:.1f} s{rate}]"]
    return lines


def parse_placeholders(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        name, sep, text = value.partition("=")
        if not sep or not re.fullmatch(r"\w+", name):
            raise CleanError(f"--set {value!r}: expected name=value (fills {{{{name}}}} in the contents)")
        out[name] = text
    return out


def parse_args(argv: list[str] | None = None) -> CleanOptions:
    d = CleanOptions("pretrain", [], Path())
    p = argparse.ArgumentParser(prog="clean.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE[:WEIGHT|@N]",
                   help="JSONL, .jsonl.zst or Parquet files or globs; :WEIGHT mixes as pack.py does, @N samples "
                        "down or repeats up to N records of each file (deterministic)")
    p.add_argument("--out", type=Path, required=True, help="output FILE.jsonl or FILE.jsonl.zst (written atomically)")
    p.add_argument("--report", type=Path, help="write the report JSON here (counts, reasons, examples)")
    g = p.add_argument_group("duplicates")
    g.add_argument("--dedup", choices=DEDUP_CHOICES, default=d.dedup,
                   help="near (default; includes exact): MinHash LSH on character 2-grams; exact: NFKC + "
                        "whitespace-folded text; none")
    g.add_argument("--dedup-key", choices=("conversation", "first-user"), default=d.dedup_key,
                   help="chat stages: the whole conversation (default) or its first user turn")
    g.add_argument("--near-dup-threshold", type=number(float, 0, 1, low_open=True), default=d.near_threshold,
                   dest="near_threshold",
                   help=f"Jaccard similarity of a near duplicate (default {d.near_threshold})")
    g.add_argument("--exclude", nargs="+", default=[], metavar="FILE",
                   help="held-out / evaluation files: records matching them (exactly, or nearly with --dedup near) "
                        "are removed so a test set never leaks into training")
    g = p.add_argument_group("length and language (0 = off)")
    for name, help_ in (("min-chars", "fewer content characters in the record"),
                        ("max-chars", "more content characters in the record"),
                        ("min-turn-chars", "chat: a turn with fewer characters"),
                        ("max-turn-chars", "chat: a turn with more characters")):
        g.add_argument(f"--{name}", type=non_negative_int, default=0, help=f"remove a record with {help_}")
    g.add_argument("--min-cjk-ratio", type=probability, default=0.0,
                   help="minimum share of CJK characters among letters")
    g.add_argument("--lang", choices=LANG_CHOICES, default="any",
                   help="zh: CJK >= 50%% of letters; en: ASCII >= 80%% of letters; any (default)")
    g = p.add_argument_group("noise (1 or 0 = off)")
    for name, default, help_ in (
            ("max-symbol-ratio", d.max_symbol_ratio, "share of punctuation / symbols among non-space characters"),
            ("max-digit-ratio", d.max_digit_ratio, "share of digits among non-space characters"),
            ("max-url-ratio", d.max_url_ratio, "share of characters inside URLs"),
            ("max-dup-line-ratio", d.max_dup_line_ratio, "share of non-blank lines repeating an earlier line")):
        g.add_argument(f"--{name}", type=probability, default=default, help=f"{help_} (default {default})")
    g.add_argument("--max-char-run", type=non_negative_int, default=d.max_char_run,
                   help=f"longest run of one repeated character (default {d.max_char_run}; 0: off)")
    g.add_argument("--allow-control", action="store_true", help="keep records with control characters")
    g.add_argument("--allow-mojibake", action="store_true", help="keep records with U+FFFD or mis-decoded UTF-8")
    g.add_argument("--filter", action="append", default=[], dest="filters", metavar="MODULE:FUNCTION",
                   help="your own predicate (dotted module or file.py), called with the output record; falsy "
                        "removes it (counted as filter:FUNCTION); repeatable")
    g = p.add_argument_group("mixing and output")
    g.add_argument("--set", action="append", default=[], dest="placeholders", metavar="NAME=VALUE",
                   help="fill {{NAME}} in every content (e.g. --set name=tinylm); repeatable")
    g.add_argument("--no-source", dest="source_field", action="store_false",
                   help="do not add the 'source' field (the input file) to each record")
    g.add_argument("--shuffle", action="store_true", help="shuffle the output (through an index of offsets)")
    g.add_argument("--seed", type=seed, default=0, help="shuffle seed (default 0)")
    g.add_argument("--target-mb", type=non_negative_float, default=0.0,
                   help="stop the (shuffled) output at M megabytes, e.g. a random 72 MB of a large SFT set")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed records, counted per reason")
    p.add_argument("--max-record-chars", type=positive_int, default=DEFAULT_MAX_RECORD_CHARS,
                   help="a record with more content characters is a bad record (too_long), as in pack.py")
    p.add_argument("--workers", type=non_negative_int, default=0,
                   help="processes for the per-record work (default: every usable core); the output does not "
                        "depend on it (duplicates are decided in input order in this process)")
    p.add_argument("--quiet", action="store_true", help="no summary")
    args = vars(p.parse_args(argv))
    try:
        args["placeholders"] = parse_placeholders(args["placeholders"])
    except CleanError as e:
        p.error(str(e))
    args["inputs"] = args.pop("input")
    opts = CleanOptions(**args)
    if message := opts.problem():
        p.error(message)
    return opts


def main(argv: list[str] | None = None) -> int:
    """``python preprocess/clean.py ...``: arguments -> CleanOptions -> clean -> printed summary."""
    options = parse_args(argv)

    def body() -> None:
        result = clean(options)
        if not options.quiet:
            print("\n".join(summary_lines(result)))
    return run_main("clean.py", body)


if __name__ == "__main__":
    sys.exit(main())
