"""Raw records from JSONL, ``.jsonl.zst`` and Parquet files, mixed by per-source weights.

An input argument is ``PATH_OR_GLOB[:WEIGHT]`` (weight defaults to 1). A glob expands to its matches
in sorted order; each match gets the weight. A weight ``w = n + f`` (n whole, 0 <= f < 1) emits every
record n times (n passes over the file, in file order) and then, in one more pass, each record whose
deterministic hash of (file name, line) falls below f. So the mix is reproducible byte for byte and
independent of worker count or machine.

Items are streamed; nothing holds a whole file in memory, and a line longer than ``max_line_bytes``
is not held either: its bytes are skipped up to the next newline and it becomes an item with
``oversize`` set (the caller counts it as a too-long record). Line numbers are 1-based (Parquet: row
number). A file with no records yields one item with ``payload=None`` so the caller can report it.
A last line with no final newline is marked ``unterminated`` (a truncated file ends that way).

A file whose bytes cannot be read is a :class:`SourceError`, fatal whatever ``--skip-bad`` says, since
the records it lost cannot be counted: a ``.zst`` stream is decoded frame by frame and must end on a
complete frame (a cut mid-frame, a missing checksum or garbage bytes are refused with the byte offset
of the broken frame and the last good line), and a Parquet file must open and decode every row group.
"""

from __future__ import annotations

import glob
import itertools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from core.errors import TinyLMError
from core.files import os_reason
from core.numbers import MAX_CHARS, check_number

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst", ".parquet")


class InputError(TinyLMError):
    """A problem with the input arguments themselves (missing file, bad weight, unknown format)."""


@dataclass(frozen=True)
class SourceSpec:
    path: Path
    weight: float


class Item(NamedTuple):
    """One raw record: the bytes of a JSONL line, a Parquet row dict, or None for an empty file. A named
    tuple, not a dataclass: one is made and (in a worker) unpickled per record, at under half the cost."""

    source: str
    line: int
    payload: bytes | dict | None
    oversize: int = 0  # > 0: the line had this many bytes, more than the reader holds; payload is b""
    unterminated: bool = False  # the file's last line, with no newline after it


def split_number_suffix(arg: str, sep: str) -> tuple[str, float | None]:
    """``"a.jsonl:2.5"`` -> ("a.jsonl", 2.5) for ``sep=":"``: the number after the last ``sep``; (arg, None)
    when there is no ``sep`` or what follows it is not a number (then it is part of the name)."""
    head, found, tail = arg.rpartition(sep)
    if not found:
        return arg, None
    try:
        return head, float(tail)
    except ValueError:
        return arg, None


MAX_WEIGHT = 1000  # a source repeated more often than this is a typo (``:1e20`` would never end)


def _split_weight(arg: str) -> tuple[str, float]:
    head, weight = split_number_suffix(arg, ":")
    if weight is None:
        return arg, 1.0  # no weight, or a colon that is part of the path
    problem = check_number(weight, float, low=0, high=MAX_WEIGHT, low_open=True)
    if problem or len(arg) - len(head) - 1 > MAX_CHARS:
        raise InputError(f"{arg}: the mixing weight must be a finite number > 0 and <= {MAX_WEIGHT}, got "
                         f"{arg[len(head) + 1:][:MAX_CHARS]!r}")
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


READ_BYTES = 1 << 20
# A JSON string escapes one character in at most 12 bytes (a surrogate pair: two \\uXXXX escapes), so a
# line longer than 12 x the character limit can never hold an acceptable record.
BYTES_PER_CHAR_MAX = 12


class SourceError(TinyLMError):
    """An input file whose bytes cannot be decoded (corrupt or truncated compression, a broken Parquet file)."""


def _zst_blocks(path: Path) -> Iterator[bytes]:
    """Decompressed bytes of every frame of a ``.zst`` file, in order.

    Each frame is decoded by its own decompressobj; a frame ends when the decoder reports ``eof`` and the
    bytes after it start the next frame. The file must end exactly at the end of a frame: bytes left in
    an unfinished frame mean the file was cut. The SourceError names the offset where the frame began.
    """
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    frame, frame_start, consumed = None, 0, 0
    with path.open("rb") as f:
        while raw := f.read(READ_BYTES):
            while raw:
                if frame is None:
                    frame, frame_start = dctx.decompressobj(), consumed
                try:
                    out = frame.decompress(raw)
                except zstandard.ZstdError as e:
                    raise SourceError(f"corrupt zstd data in the frame starting at byte {frame_start} ({e})",
                                      path=path) from None
                if out:
                    yield out
                if frame.eof:
                    consumed += len(raw) - len(frame.unused_data)
                    raw, frame = frame.unused_data, None
                else:
                    consumed += len(raw)
                    raw = b""
    if frame is not None:
        raise SourceError(f"truncated zstd stream: the frame starting at byte {frame_start} is cut off at byte "
                          f"{consumed} (the end of the file); the file is incomplete", path=path)


def _raw_blocks(path: Path) -> Iterator[bytes]:
    if _format_of(path) == "zst":
        yield from _zst_blocks(path)
        return
    with path.open("rb") as f:
        while block := f.read(READ_BYTES):
            yield block


def _lines(blocks: Iterator[bytes], max_line_bytes: int | None) -> Iterator[tuple[bytes | None, int, bool]]:
    """(line without its newline or None when oversized, its byte length, terminated) for every line.

    Each block is split at its newlines in one C call; only the line that spans blocks is assembled
    from pieces. A line is accumulated only up to ``max_line_bytes``; past that its bytes are dropped
    until the next newline, so memory stays bounded by the limit whatever the input holds.
    """
    limit = max_line_bytes or 0
    pending: list[bytes] = []
    size, oversized = 0, False
    for block in blocks:
        parts = block.split(b"\n")
        if len(parts) > 1:  # parts[0] ends the pending line; parts[1:-1] are whole lines
            size += len(parts[0])
            yield (None if oversized or 0 < limit < size else b"".join([*pending, parts[0]])), size, True
            for line in itertools.islice(parts, 1, len(parts) - 1):
                n = len(line)
                yield (None if 0 < limit < n else line), n, True
            pending, size, oversized = [], 0, False
        piece = parts[-1]
        size += len(piece)
        if not oversized and 0 < limit < size:
            pending, oversized = [], True
        elif not oversized and piece:
            pending.append(piece)
    if size:
        yield (None if oversized else b"".join(pending)), size, False


def _parquet_records(path: Path, source: str) -> Iterator[Item]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=2048):
            for record in batch.to_pylist():
                row += 1
                yield Item(source, row, record)
    except (pa.ArrowException, OSError, ValueError) as e:
        where = f"after row {row}" if row else "before its first row"
        raise SourceError(f"corrupt or unreadable Parquet file, {where} ({' '.join(str(e).split())})",
                          path=path) from None


def _records(path: Path, max_line_bytes: int | None = None) -> Iterator[Item]:
    """Every non-blank record of one file (as items of source ``str(path)``); SourceError when its bytes
    cannot be decoded."""
    source = str(path)
    if _format_of(path) == "parquet":
        yield from _parquet_records(path, source)
        return
    number = 0
    try:
        for number, (line, size, terminated) in enumerate(_lines(_raw_blocks(path), max_line_bytes), 1):
            if line is None:
                yield Item(source, number, b"", oversize=size, unterminated=not terminated)
            elif line and not line.isspace():  # bytes.isspace: the ASCII whitespace bytes.strip removes
                yield Item(source, number, line.rstrip(b"\r"), unterminated=not terminated)
    except SourceError as e:  # a broken .zst frame: say how far the file was read
        raise e.with_hint(f"the last complete line read was line {number}" if number
                          else "no complete line was read") from None
    except OSError as e:
        raise SourceError(f"cannot read ({os_reason(e)}) after line {number}", path=path) from None


def _keep_fraction(path: Path, line: int, fraction: float) -> bool:
    return zlib.crc32(f"{path.name}:{line}".encode()) / 2**32 < fraction


def iter_items(specs: list[SourceSpec], max_line_bytes: int | None = None) -> Iterator[Item]:
    """Every record of every source, repeated / subsampled by its weight, in a fixed order."""
    for spec in specs:
        whole, fraction = int(spec.weight), spec.weight - int(spec.weight)
        empty = True
        for keep_all in [True] * whole + ([False] if fraction > 0 else []):
            for item in _records(spec.path, max_line_bytes):
                empty = False
                if keep_all or _keep_fraction(spec.path, item.line, fraction):
                    yield item
        if empty:
            yield Item(str(spec.path), 0, None)


def count_items(specs: list[SourceSpec], max_line_bytes: int | None = None) -> int:
    """How many items :func:`iter_items` will yield (a pass over each file, for progress bars).

    Reading every byte also means a corrupt or truncated file is refused before any work starts.
    """
    total = 0
    for spec in specs:
        if _format_of(spec.path) == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                n = pq.ParquetFile(spec.path).metadata.num_rows
            except (pa.ArrowException, OSError, ValueError) as e:
                raise SourceError(f"corrupt or unreadable Parquet file ({' '.join(str(e).split())})",
                                  path=spec.path) from None
        else:
            n = sum(1 for _ in _records(spec.path, max_line_bytes))
        total += max(1, round(n * spec.weight)) if n else 1
    return total
