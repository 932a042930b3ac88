"""Raw records from JSONL, ``.jsonl.zst`` and Parquet files, mixed by per-source weights.

An input argument is ``PATH_OR_GLOB[:WEIGHT]`` (weight defaults to 1). A glob expands to its matches
in sorted order; each match gets the weight. A weight ``w = n + f`` (n whole, 0 <= f < 1) emits every
record n times (n passes over the file, in file order) and then, in one more pass, each record whose
deterministic hash of (file name, line) falls below f. So the mix is reproducible byte for byte and
independent of worker count or machine.

Items are streamed; nothing holds a whole file in memory. Line numbers are 1-based (Parquet: row
number). A file with no records yields one item with ``payload=None`` so the caller can report it.
"""

from __future__ import annotations

import glob
import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.errors import TinyLMError

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst", ".parquet")


class InputError(TinyLMError):
    """A problem with the input arguments themselves (missing file, bad weight, unknown format)."""


@dataclass(frozen=True)
class SourceSpec:
    path: Path
    weight: float


@dataclass(frozen=True)
class Item:
    """One raw record: the bytes of a JSONL line, a Parquet row dict, or None for an empty file."""

    source: str
    line: int
    payload: bytes | dict | None


def _split_weight(arg: str) -> tuple[str, float]:
    head, sep, tail = arg.rpartition(":")
    if not sep:
        return arg, 1.0
    try:
        weight = float(tail)
    except ValueError:
        return arg, 1.0  # a colon that is part of the path
    if not weight > 0 or weight != weight or weight == float("inf"):
        raise InputError(f"{arg}: the mixing weight must be a positive number, got {tail!r}")
    return head, weight


def _format_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl.zst", ".json.zst", ".zst")):
        return "zst"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    raise InputError(f"{path}: unknown input format (expected .jsonl, .jsonl.zst or .parquet)")


def parse_input_args(args: list[str]) -> list[SourceSpec]:
    """Expand ``PATH_OR_GLOB[:WEIGHT]`` arguments into sources; every one must exist."""
    if not args:
        raise InputError("no --input given")
    specs: list[SourceSpec] = []
    for arg in args:
        pattern, weight = _split_weight(arg)
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise InputError(f"{pattern}: the pattern matches no file")
        for match in matches:
            path = Path(match)
            if not path.is_file():
                raise InputError(f"{path}: no such file")
            _format_of(path)
            specs.append(SourceSpec(path, weight))
    return specs


def _binary_lines(path: Path) -> Iterator[bytes]:
    if _format_of(path) == "zst":
        import zstandard

        with path.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
            yield from io.BufferedReader(reader)
    else:
        with path.open("rb") as f:
            yield from f


def _records(path: Path) -> Iterator[tuple[int, bytes | dict]]:
    """(line number, payload) for every non-blank record of one file."""
    if _format_of(path) == "parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=2048):
            for record in batch.to_pylist():
                row += 1
                yield row, record
        return
    for number, line in enumerate(_binary_lines(path), 1):
        line = line.rstrip(b"\r\n")
        if line.strip():
            yield number, line


def _keep_fraction(path: Path, line: int, fraction: float) -> bool:
    return zlib.crc32(f"{path.name}:{line}".encode()) / 2**32 < fraction


def iter_items(specs: list[SourceSpec]) -> Iterator[Item]:
    """Every record of every source, repeated / subsampled by its weight, in a fixed order."""
    for spec in specs:
        whole, fraction = int(spec.weight), spec.weight - int(spec.weight)
        source = str(spec.path)
        empty = True
        for _ in range(whole):
            for line, payload in _records(spec.path):
                empty = False
                yield Item(source, line, payload)
        if fraction > 0:
            for line, payload in _records(spec.path):
                empty = False
                if _keep_fraction(spec.path, line, fraction):
                    yield Item(source, line, payload)
        if empty:
            yield Item(source, 0, None)


def count_items(specs: list[SourceSpec]) -> int:
    """How many items :func:`iter_items` will yield (a fast pass, for progress bars)."""
    total = 0
    for spec in specs:
        kind = _format_of(spec.path)
        if kind == "parquet":
            import pyarrow.parquet as pq

            n = pq.ParquetFile(spec.path).metadata.num_rows
        elif kind == "jsonl":
            with spec.path.open("rb") as f:
                n = sum(1 for line in f if line.strip())
        else:
            n = sum(1 for _ in _records(spec.path))
        total += max(1, round(n * spec.weight)) if n else 1
    return total
