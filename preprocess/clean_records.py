"""clean.py's per-record work: inputs and ``FILE@N`` sampling, the record's text and duplicate key,
placeholders, the length / language / noise / user filters, and the worker-side :class:`Preparer` (pure, so
any worker count gives the same output)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import TinyLMError
from core.numbers import (
    parse_number,
)
from preprocess.clean_options import CleanError, CleanOptions
from preprocess.records import Pair, RecordError, parse_record
from preprocess.sources import (
    InputError,
    Item,
    SourceSpec,
    count_items,
    iter_items,
    parse_input_args,
)
from preprocess.textfilters import (
    Fingerprint,
    Fingerprinter,
    Measures,
    build_tables,
    normalise,
)

PREVIEW_CHARS = 120
LANG_SHARE = {"zh": 0.5, "en": 0.8}  # zh: CJK share of letters at least; en: ASCII share of letters at least
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_SAMPLE = re.compile(r"^(.*)@([-+.0-9eE]+|inf|nan)$")  # any number-like tail: checked, not taken as a name
MAX_SAMPLE = 10**12  # records one @N may ask for


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
        pattern = sampled.group(1)
        try:
            n = int(parse_number(sampled.group(2), int, low=1, high=MAX_SAMPLE))
        except ValueError as e:
            raise InputError(f"{arg}: the record count after @ {e}") from None
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

def encode_line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
