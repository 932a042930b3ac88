"""The packed-shard byte layout. This module is the only code that knows it (docs/FORMAT.md specifies it).

A packed dataset folder holds ``meta.json`` and, per shard ``shard_NNNNN``:

- ``.bin``  tokens, little-endian uint16 (uint32 when the vocabulary exceeds 65,535; meta says which)
- ``.mask`` one uint8 loss weight per token (0 none, 1 normal, >1 up-weighted)
- ``.idx``  little-endian int64: ``doc_offsets[n_docs + 1]`` (token offset of each document's start,
  then the token count) followed by ``row_docs[n_rows + 1]`` (index of each packed row's first
  document, then n_docs). Pretrain shards have no packed rows (n_rows = 0, ``row_docs == [0]``):
  their training rows are fixed windows over the token stream.
- ``.json`` the shard's counts, sizes and checksums; written last, so its presence means "finished"
  (:func:`finished_shards` is the completion check a resumed writer uses).

Rows. A packed shard's training rows are its ``row_docs`` runs. A pretrain shard's rows are fixed windows
(:func:`window_rows`, the one statement of the rule): row r is the ``seq_len + 1`` tokens from
``r * seq_len`` (inputs and shifted targets), so ``n`` tokens hold ``(n - 1) // seq_len`` rows and the
tokens after the last window's end are in none (:func:`unused_window_tokens`).

DPO reference log-probabilities live beside the shards in ``ref_<fingerprint16>/`` (the first 16 hex digits
of the reference checkpoint's weight fingerprint): one ``shard_NNNNN.ref`` per shard (float32, one value
per document: the summed log-probability of its supervised tokens under the reference model) and a
``meta.json`` naming the checkpoint and the dataset they were computed for, written last.

Every binary file starts with a 256-byte header of 32 little-endian int64:
``[MAGIC, VERSION, kind, itemsize, count, n_docs, n_rows, 0...]`` where ``count`` is the number of
payload items; so ``file size == 256 + count * itemsize`` is checked before a shard is trusted.
All writes go through ``core.files`` (``NAME.tmp.<pid>``, fsync, rename into place).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import TinyLMError
from core.files import atomic_write_bytes, atomic_write_json, make_dir, read_json

MAGIC = int.from_bytes(b"tinylm\x00\x01", "little")
VERSION = 1
HEADER_INTS = 32
HEADER_BYTES = HEADER_INTS * 8
KIND_TOKENS, KIND_WEIGHTS, KIND_INDEX, KIND_REF_LOGPS = 1, 2, 3, 4
EXTENSIONS = {KIND_TOKENS: ".bin", KIND_WEIGHTS: ".mask", KIND_INDEX: ".idx", KIND_REF_LOGPS: ".ref"}
REF_PREFIX = "ref_"
UINT16_LIMIT = 65_536
TOKEN_DTYPES = ("uint16", "uint32")
SHARD_NAME = re.compile(r"^shard_\d{5}$")
SHARD_FILE = re.compile(r"^shard_(\d{5})\.")  # any file of a shard: its name, then an extension
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class ShardError(TinyLMError):
    """A shard or meta.json that is missing, truncated, corrupted or mismatched; names the file."""


def token_dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= UINT16_LIMIT else "uint32"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def shard_index(filename: str) -> int | None:
    """The index of the shard a file belongs to (``shard_00003.mask`` -> 3), or None for any other file."""
    match = SHARD_FILE.match(filename)
    return int(match.group(1)) if match else None


def window_rows(n_tokens: int, seq_len: int) -> int:
    """The pretrain window rule: rows of ``seq_len + 1`` tokens starting every ``seq_len`` tokens, so
    ``(n_tokens - 1) // seq_len`` of them (none for a shard of at most ``seq_len`` tokens)."""
    return max(0, (n_tokens - 1) // seq_len)


def unused_window_tokens(n_tokens: int, seq_len: int) -> int:
    """Pretrain: the tokens of a shard that are in no window (after the last window's last token)."""
    rows = window_rows(n_tokens, seq_len)
    return n_tokens - (rows * seq_len + 1) if rows else n_tokens


def _header(kind: int, itemsize: int, count: int, n_docs: int, n_rows: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i8")
    header[:7] = [MAGIC, VERSION, kind, itemsize, count, n_docs, n_rows]
    return header.tobytes()


def _write_array(path: Path, kind: int, array: np.ndarray, n_docs: int, n_rows: int) -> str:
    array = np.ascontiguousarray(array)
    header = _header(kind, array.dtype.itemsize, array.size, n_docs, n_rows)
    return atomic_write_bytes(path, [header, memoryview(array).cast("B")])


@dataclass(frozen=True)
class ShardArrays:
    """One shard in memory: the arrays a writer produces and a reader maps."""

    tokens: np.ndarray  # [n_tokens] uint16 / uint32
    weights: np.ndarray  # [n_tokens] uint8
    doc_offsets: np.ndarray  # [n_docs + 1] int64, starts at 0, ends at n_tokens
    row_docs: np.ndarray  # [n_rows + 1] int64, starts at 0, ends at n_docs ([0] when unpacked)

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def n_rows(self) -> int:
        return len(self.row_docs) - 1

    def training_rows(self, seq_len: int, packed: bool) -> int:
        """Its packed rows, or (pretrain) its :func:`window_rows`."""
        return self.n_rows if packed else window_rows(len(self.tokens), seq_len)


def write_shard(folder: Path, index: int, shard: ShardArrays, token_dtype: str, stats: dict) -> dict:
    """Write the three binary files, then ``.json`` (stats + sizes + checksums); return that record."""
    if token_dtype not in TOKEN_DTYPES:
        raise ShardError(f"{shard_name(index)}: token dtype {token_dtype!r} is not one of {', '.join(TOKEN_DTYPES)}")
    if token_dtype == "uint16" and shard.tokens.size and int(shard.tokens.max()) >= UINT16_LIMIT:
        raise ShardError(f"{shard_name(index)}: token id {int(shard.tokens.max())} does not fit uint16")
    name = shard_name(index)
    n_docs, n_rows = shard.n_docs, shard.n_rows
    arrays = {
        KIND_TOKENS: shard.tokens.astype("<" + np.dtype(token_dtype).str[1:], copy=False),
        KIND_WEIGHTS: shard.weights.astype(np.uint8, copy=False),
        KIND_INDEX: np.concatenate([shard.doc_offsets, shard.row_docs]).astype("<i8"),
    }
    files = {}
    for kind, array in arrays.items():
        path = folder / (name + EXTENSIONS[kind])
        digest = _write_array(path, kind, array, n_docs, n_rows)
        files[path.name] = {"bytes": path.stat().st_size, "sha256": digest}
    max_token = int(shard.tokens.max()) if shard.tokens.size else -1
    record = {"name": name, "tokens": int(shard.tokens.size), "documents": n_docs, "rows": n_rows,
              "max_token": max_token, "files": files, **stats}
    atomic_write_json(folder / f"{name}.json", record)
    return record


def _map(path: Path, kind: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map one file after checking its header and size; returns (header, payload)."""
    if not path.is_file():
        raise ShardError(f"{path}: missing")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated ({size} bytes, smaller than the header)")
    header = np.fromfile(path, dtype="<i8", count=HEADER_INTS)
    if header[0] != MAGIC or header[1] != VERSION or header[2] != kind:
        raise ShardError(f"{path}: not a tinylm v{VERSION} shard file of this kind (bad header)")
    itemsize = np.dtype(dtype).itemsize
    if header[3] != itemsize:
        raise ShardError(f"{path}: item size {header[3]} in the header, expected {itemsize} ({dtype})")
    expected = HEADER_BYTES + int(header[4]) * itemsize
    if size != expected:
        raise ShardError(f"{path}: {size} bytes, the header promises {expected}")
    payload = np.memmap(path, dtype="<" + np.dtype(dtype).str[1:], mode="r", offset=HEADER_BYTES,
                        shape=(int(header[4]),)) if header[4] else np.zeros(0, dtype=dtype)
    return header, payload


def open_shard(folder: Path, name: str, token_dtype: str, record: dict | None = None,
               seq_len: int | None = None) -> ShardArrays:
    """Memory-map a shard's arrays (nothing is read until used), checking headers, sizes and offsets.

    With ``record`` (its entry in meta.json) the file sizes and the token / document / row counts must
    equal the record's; with ``seq_len`` no packed row may hold more tokens than that."""
    head, tokens = _map(folder / f"{name}.bin", KIND_TOKENS, token_dtype)
    _, weights = _map(folder / f"{name}.mask", KIND_WEIGHTS, "uint8")
    idx_head, index = _map(folder / f"{name}.idx", KIND_INDEX, "int64")
    if record is not None:
        for filename, expected in record["files"].items():
            size = (folder / filename).stat().st_size
            if size != expected["bytes"]:
                raise ShardError(f"{size} bytes, meta.json says {expected['bytes']}", path=folder / filename)
    n_docs, n_rows = int(idx_head[5]), int(idx_head[6])
    if len(weights) != len(tokens) or len(index) != n_docs + n_rows + 2 or n_docs < 0 or n_rows < 0:
        raise ShardError(f"{folder / name}: .bin/.mask/.idx disagree on their sizes")
    doc_offsets, row_docs = index[: n_docs + 1], index[n_docs + 1:]
    if doc_offsets[0] != 0 or doc_offsets[-1] != len(tokens) or row_docs[0] != 0 or row_docs[-1] != (
            n_docs if n_rows else 0):
        raise ShardError(f"{folder / name}.idx: offsets do not match the token count")
    if (np.diff(doc_offsets) < 0).any() or (np.diff(row_docs) < 0).any():
        raise ShardError("document or row offsets are not increasing (corrupt index)", path=folder / f"{name}.idx")
    shard = ShardArrays(tokens, weights, doc_offsets, row_docs)
    if record is not None:
        found = {"tokens": len(tokens), "documents": n_docs, "rows": n_rows}
        for key, value in found.items():
            if record[key] != value:
                raise ShardError(f"meta.json says {record[key]} {key} for {name}, its files hold {value}",
                                 path=folder / f"{name}.idx")
    if seq_len is not None and n_rows:
        longest = int(np.diff(np.asarray(doc_offsets)[np.asarray(row_docs)]).max())
        if longest > seq_len:
            raise ShardError(f"a packed row holds {longest} tokens, more than meta.json's seq_len {seq_len}",
                             path=folder / f"{name}.idx")
    return shard


def verify_shard(folder: Path, record: dict, token_dtype: str, vocab_size: int, seq_len: int | None = None,
                 checksums: bool = True) -> ShardArrays:
    """:func:`open_shard` against its meta.json ``record``, then (``checksums``) every file's sha256, then
    the largest token id against ``vocab_size``. The largest id is the record's ``max_token`` when the
    checksums vouch for it (or when ``checksums`` is off and the record has one), else one vectorised
    ``max`` over the tokens. ShardError names the first problem's file."""
    shard = open_shard(folder, record["name"], token_dtype, record, seq_len)
    if checksums:
        for filename, expected in record["files"].items():
            if file_sha256(folder / filename) != expected["sha256"]:
                raise ShardError("checksum mismatch (the file was changed or corrupted)", path=folder / filename)
    cached = record.get("max_token")
    largest = cached if isinstance(cached, int) else (int(shard.tokens.max()) if len(shard.tokens) else -1)
    if largest >= vocab_size:
        raise ShardError(f"token id {largest} >= the tokenizer's vocab_size {vocab_size} (meta.json): the shard "
                         "does not belong to this tokenizer or is corrupt", path=folder / f"{record['name']}.bin")
    return shard


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_json(path: Path, if_missing: str) -> Any:
    """A JSON metadata file; ShardError naming it when it is missing (with ``if_missing``) or not JSON."""
    if not path.is_file():
        raise ShardError(f"{path}: missing — {if_missing}")
    return read_json(path, path.name, ShardError)


def _is_count(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_meta(meta: Any, path: Path) -> dict:
    """Refuse a meta.json with missing keys, wrong types or self-contradicting fields (one line naming the
    field); returns it. The shards' own files are checked against it by :func:`verify_shard`."""
    def need(ok: bool, field: str | None, message: str) -> None:
        if not ok:
            raise ShardError(message, path=path, field=field)

    need(isinstance(meta, dict), None, "not a JSON object")
    need(meta.get("format_version") == VERSION, "format_version",
         f"{meta.get('format_version')!r}, this tinylm reads {VERSION}")
    need(isinstance(meta.get("stage"), str) and bool(meta["stage"]), "stage", "missing or not a string")
    need(_is_count(meta.get("seq_len"), 1), "seq_len", f"{meta.get('seq_len')!r} is not a positive integer")
    need(meta.get("token_dtype") in TOKEN_DTYPES, "token_dtype",
         f"{meta.get('token_dtype')!r} is not one of {', '.join(TOKEN_DTYPES)}")
    tok = meta.get("tokenizer")
    need(isinstance(tok, dict), "tokenizer", "missing or not an object")
    need(isinstance(tok.get("fingerprint"), str), "tokenizer.fingerprint", "missing or not a string")
    need(isinstance(tok.get("path"), str), "tokenizer.path", "missing or not a string")
    need(_is_count(tok.get("vocab_size"), 1), "tokenizer.vocab_size",
         f"{tok.get('vocab_size')!r} is not a positive integer")
    need(meta["token_dtype"] != "uint16" or tok["vocab_size"] <= UINT16_LIMIT, "token_dtype",
         f"uint16 cannot hold the ids of a {tok['vocab_size']}-token vocabulary (tokenizer.vocab_size)")
    need(isinstance(meta.get("shards"), list), "shards", "missing or not a list")
    for i, record in enumerate(meta["shards"]):
        check_shard_record(record, path, f"shards[{i}]")
    return meta


def check_shard_record(record: Any, path: Path, where: str | None = None) -> dict:
    """Refuse a shard record (meta.json's ``where`` entry, or a shard's own ``.json`` file at ``path``)
    with a missing or mistyped name, count or file entry; returns it."""
    def need(ok: bool, field: str | None, message: str) -> None:
        if not ok:
            raise ShardError(message, path=path, field=".".join(filter(None, (where, field))) or None)

    need(isinstance(record, dict), None, "not an object")
    need(isinstance(record.get("name"), str) and bool(SHARD_NAME.match(record["name"])), "name",
         f"{record.get('name')!r} is not a shard name (shard_NNNNN)")
    for key in ("tokens", "documents", "rows"):
        need(_is_count(record.get(key)), key, f"{record.get(key)!r} is not a count")
    need(record.get("max_token") is None or _is_count(record["max_token"], -1), "max_token",
         f"{record.get('max_token')!r} is not a token id")
    files = record.get("files")
    expected = {record["name"] + EXTENSIONS[k] for k in (KIND_TOKENS, KIND_WEIGHTS, KIND_INDEX)}
    need(isinstance(files, dict) and set(files) == expected, "files",
         f"must list exactly {', '.join(sorted(expected))}")
    for filename, entry in files.items():
        need(isinstance(entry, dict) and _is_count(entry.get("bytes"), HEADER_BYTES)
             and isinstance(entry.get("sha256"), str) and bool(SHA256_HEX.match(entry["sha256"])),
             f"files.{filename}", "needs 'bytes' (a size) and 'sha256' (64 hex digits)")
    return record


def shard_record_path(folder: Path, index: int) -> Path:
    """Where shard ``index``'s own record is (``shard_NNNNN.json``: written last, present = finished)."""
    return Path(folder) / f"{shard_name(index)}.json"


def finished_shards(folder: Path, records: Iterable[dict | None], token_dtype: str, vocab_size: int,
                    seq_len: int | None) -> tuple[list[dict], ShardError | None]:
    """Completion detection for a resumed writer: the leading run of shards 0..k-1 that are finished and
    sound. Record i must be a shard record (:func:`check_shard_record`) naming shard i, and
    :func:`verify_shard` must accept its files (sizes, headers, counts, sha256, token ids). Stops at the
    first None (not written yet) and returns ``(done, None)``, or at the first unsound shard and returns
    ``(done, its ShardError)``: that shard and every later one must be written again."""
    done: list[dict] = []
    for index, record in enumerate(records):
        if record is None:
            break
        try:
            check_shard_record(record, shard_record_path(folder, index))
            if record["name"] != shard_name(index):
                raise ShardError(f"records {record['name']} in the place of {shard_name(index)}",
                                 path=shard_record_path(folder, index))
            verify_shard(folder, record, token_dtype, vocab_size, seq_len)
        except ShardError as e:
            return done, e
        done.append(record)
    return done, None


def read_meta(folder: Path) -> dict:
    path = Path(folder) / "meta.json"
    return check_meta(_read_json(path, f"is {folder} a packed dataset (python preprocess/pack.py)?"), path)


def tokenizer_mismatch(folder: Path, meta: dict, fingerprint: str | None) -> ShardError | None:
    """The error when ``fingerprint`` (a tokenizer.json's sha256; None: not checked) is not the one the
    folder was packed with, else None: the one tokenizer check of a packed folder."""
    packed_with = meta["tokenizer"]
    if not fingerprint or packed_with["fingerprint"] == fingerprint:
        return None
    return ShardError(f"packed with another tokenizer ({packed_with['path']}): tokenizer fingerprint "
                      f"{packed_with['fingerprint'][:12]}…, the given tokenizer's {fingerprint[:12]}…",
                      path=Path(folder) / "meta.json")


def verify(folder: Path, tokenizer_fingerprint: str | None = None) -> list[str]:
    """Every problem found (empty list = sound): meta.json's fields, sizes, headers, counts, checksums,
    token ids and the tokenizer fingerprint (the first problem of each shard)."""
    try:
        meta = read_meta(folder)
    except ShardError as e:
        return [str(e)]
    mismatch = tokenizer_mismatch(folder, meta, tokenizer_fingerprint)
    problems = [str(mismatch)] if mismatch else []
    packed = meta["stage"] != "pretrain"
    for record in meta["shards"]:
        try:
            verify_shard(folder, record, meta["token_dtype"], meta["tokenizer"]["vocab_size"],
                         meta["seq_len"] if packed else None)
        except ShardError as e:
            problems.append(str(e))
    return problems


class PackedFolder:
    """All training rows of a packed folder by global row index; every shard memory-mapped.

    Packed stages: row r is the run of whole documents ``row_docs[r]..row_docs[r+1]`` of its shard.
    Pretrain: row r is the window of ``seq_len + 1`` tokens starting at ``r * seq_len`` of its shard.

    Opening checks meta.json's fields and every shard against them (sizes, headers, counts, row lengths,
    token ids < vocab size); ``verify=True`` also checks every file's sha256 (a full read of the data;
    training does it, see docs/FORMAT.md). Any problem is a ShardError naming the file.
    """

    def __init__(self, folder: str | Path, tokenizer_fingerprint: str | None = None, verify: bool = False):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        if mismatch := tokenizer_mismatch(self.folder, self.meta, tokenizer_fingerprint):
            raise mismatch
        self.stage: str = self.meta["stage"]
        self.seq_len: int = self.meta["seq_len"]
        self.packed = self.stage != "pretrain"
        self.shards = [verify_shard(self.folder, s, self.meta["token_dtype"], self.meta["tokenizer"]["vocab_size"],
                                    self.seq_len if self.packed else None, checksums=verify)
                       for s in self.meta["shards"]]
        counts = [s.training_rows(self.seq_len, self.packed) for s in self.shards]
        self.row_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n_rows = int(self.row_start[-1])

    def _locate(self, row: int) -> tuple[ShardArrays, int]:
        s, local = self.shard_of(row)
        return self.shards[s], local

    def shard_of(self, row: int) -> tuple[int, int]:
        """(shard index, row index inside that shard) of a global row."""
        if not 0 <= row < self.n_rows:
            raise IndexError(f"row {row} outside 0..{self.n_rows - 1}")
        s = int(np.searchsorted(self.row_start, row, side="right")) - 1
        return s, row - int(self.row_start[s])

    def row_documents(self, row: int) -> tuple[int, int, int]:
        """(shard index, first document, end document) of a packed row: documents ``d0 .. d1 - 1``."""
        s, local = self.shard_of(row)
        row_docs = self.shards[s].row_docs
        return s, int(row_docs[local]), int(row_docs[local + 1])

    def max_row_documents(self) -> int:
        """The most documents any packed row holds (0 for pretrain)."""
        return max((int(np.diff(np.asarray(s.row_docs)).max()) for s in self.shards if s.n_rows), default=0)

    def row(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, mask bytes, lengths of the documents or document pieces in it) of one row."""
        shard, local = self._locate(row)
        if not self.packed:
            lo = local * self.seq_len
            hi = lo + self.seq_len + 1
            cuts = np.asarray(shard.doc_offsets[np.searchsorted(shard.doc_offsets, lo, side="right"):
                                                np.searchsorted(shard.doc_offsets, hi, side="left")])
            return shard.tokens[lo:hi], shard.weights[lo:hi], np.diff(np.concatenate([[lo], cuts, [hi]]))
        d0, d1 = int(shard.row_docs[local]), int(shard.row_docs[local + 1])
        offsets = np.asarray(shard.doc_offsets[d0:d1 + 1])
        lo, hi = int(offsets[0]), int(offsets[-1])
        return shard.tokens[lo:hi], shard.weights[lo:hi], np.diff(offsets)

    def document_lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(np.asarray(s.doc_offsets)) for s in self.shards]) if self.shards else np.zeros(0)


# ---- DPO reference log-probabilities -------------------------------------------------------------------

def ref_folder(folder: str | Path, fingerprint: str) -> Path:
    """Where the reference log-probs of the checkpoint with weight ``fingerprint`` live for this dataset."""
    return Path(folder) / f"{REF_PREFIX}{fingerprint[:16]}"


def write_ref_logps(ref_dir: Path, name: str, values: np.ndarray, n_rows: int) -> dict:
    """Write one shard's per-document reference log-probs (float32) atomically; returns its file record."""
    make_dir(ref_dir, "reference log-probs folder")
    path = ref_dir / (name + EXTENSIONS[KIND_REF_LOGPS])
    values = np.asarray(values, dtype="<f4")
    digest = _write_array(path, KIND_REF_LOGPS, values, values.size, n_rows)
    return {"name": name, "file": path.name, "documents": int(values.size), "bytes": path.stat().st_size,
            "sha256": digest}


def write_ref_meta(ref_dir: Path, reference: dict, dataset_meta: dict, shard_records: list[dict]) -> None:
    """``ref_dir/meta.json`` (written last): the checkpoint, the dataset and every shard's file record."""
    atomic_write_json(ref_dir / "meta.json", {
        "format_version": VERSION, "kind": "dpo_reference_logps", "dtype": "float32",
        "definition": "per document: sum over its supervised target tokens of log p_ref(token | prefix), nats",
        "reference": reference, "dataset": {"plan_fingerprint": dataset_meta.get("plan_fingerprint"),
                                            "tokenizer_fingerprint": dataset_meta["tokenizer"]["fingerprint"]},
        "shards": shard_records})


def open_ref_logps(ref_dir: Path, fingerprint: str, dataset_meta: dict) -> list[np.ndarray]:
    """Every shard's reference log-probs, checked against the checkpoint fingerprint, the dataset (plan
    fingerprint, shard names, document counts) and the files' sizes and checksums. ShardError names the file."""
    meta_path = ref_dir / "meta.json"
    meta = _read_json(meta_path, f"the reference log-probs in {ref_dir} were never finished")
    stale = "stale reference log-probs; delete the folder to recompute them"
    if (not isinstance(meta, dict) or meta.get("kind") != "dpo_reference_logps"
            or meta.get("format_version") != VERSION or not isinstance(meta.get("reference"), dict)
            or not isinstance(meta.get("dataset"), dict) or not isinstance(meta.get("shards"), list)
            or not all(isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("sha256"), str)
                       and isinstance(r.get("file"), str) and Path(r["file"]).name == r["file"]
                       for r in meta["shards"])):
        raise ShardError(f"{meta_path}: not tinylm v{VERSION} DPO reference log-probs (or a corrupt copy): {stale}")
    if meta["reference"].get("fingerprint") != fingerprint:
        made_by = meta["reference"]
        raise ShardError(f"{meta_path}: computed with checkpoint {made_by.get('path')} (weights "
                         f"{str(made_by.get('fingerprint'))[:12]}), not the reference {fingerprint[:12]}: {stale}")
    if meta["dataset"].get("plan_fingerprint") != dataset_meta.get("plan_fingerprint"):
        raise ShardError(f"{meta_path}: computed for another packing of this folder (re-packed since): {stale}")
    names = [s["name"] for s in dataset_meta["shards"]]
    if [s["name"] for s in meta["shards"]] != names:
        raise ShardError(f"{meta_path}: lists other shards than the dataset: {stale}")
    out = []
    for record, shard in zip(meta["shards"], dataset_meta["shards"], strict=True):
        path = ref_dir / record["file"]
        _, values = _map(path, KIND_REF_LOGPS, "float32")
        if len(values) != shard["documents"]:
            raise ShardError(f"{path}: {len(values)} documents, the shard has {shard['documents']}: {stale}")
        if file_sha256(path) != record["sha256"]:
            raise ShardError(f"{path}: checksum mismatch (the file was changed or corrupted): {stale}")
        out.append(values)
    return out
