#!/usr/bin/env python3
"""Tokenize raw JSONL / .jsonl.zst / Parquet once into packed, memory-mapped shards for one stage.

    python preprocess/pack.py --stage sft --input 'data/sample/sft/*.jsonl' --out data/packed/sft

As a library: ``pack(PackOptions(stage, inputs, out, ...)) -> PackResult`` (``bin/eval`` packs held-out
data this way); :func:`main` only parses arguments into :class:`PackOptions`, calls :func:`pack` and
prints its :class:`PackResult`.

Pipeline: sources (weights mix) -> worker processes (validate, render, tokenize a chunk of records)
-> in-order shard builder (best-fit rows) -> atomic shard files -> meta.json. A shard closes after
``--shard-tokens`` tokens at a record boundary, so shard contents depend only on the inputs and
options: any ``--workers`` gives the same bytes, and a killed run re-run with the same arguments
skips the finished shards (``shards.finished_shards`` decides which) and ends with byte-identical
output. The shard format, its naming and the pretrain window rule are ``preprocess/shards.py``'s; see
docs/FORMAT.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":  # pack.py does no linear algebra: numpy's OpenBLAS would start (and spin) a thread
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # per core at import, ~40 ms of CPU for nothing

import numpy as np  # noqa: E402

from core.errors import TinyLMError, run_main  # noqa: E402
from core.files import FolderLock, atomic_write_json, check_output_folder, is_temp_file, read_json  # noqa: E402
from core.tokenizer import DEFAULT_TOKENIZER, REPO_ROOT, TokenizerInfo, load_tokenizer  # noqa: E402
from preprocess import shards  # noqa: E402
from preprocess.encode import (  # noqa: E402
    OK,
    PACKED_STAGES,
    TRUNCATED,
    EncodedChunk,
    EncodeOptions,
    encode_in_worker,
    encode_items,
    init_worker,
)
from preprocess.options import RecordOptions, add_record_arguments  # noqa: E402
from preprocess.packing import assemble_shard  # noqa: E402
from preprocess.parallel import chunks, pool_map, usable_cores  # noqa: E402
from preprocess.records import STAGES  # noqa: E402
from preprocess.sources import (  # noqa: E402
    BYTES_PER_CHAR_MAX,
    Item,
    SourceSpec,
    count_items,
    iter_items,
    parse_input_args,
)

STATE_FILE = ".pack_state.json"
CHUNK_RECORDS = 512  # a chunk (the work one worker takes at a time) holds at most this many records
CHUNK_BYTES = 128 << 10  # and closes once its lines hold this many bytes, so chunks cost about the same
WARN_SHARE = 0.01  # warn when more than this share of the records (or pretrain tokens) is cut or unused


class PackError(TinyLMError):
    """A fatal, user-facing problem: printed as one line, exit status 1."""


@dataclass(frozen=True)
class PackOptions:
    """Everything one pack run needs; filled by :func:`parse_args` or by a caller (``bin/eval``)."""

    stage: str
    inputs: list[str]
    out: Path
    tokenizer: str = str(DEFAULT_TOKENIZER)
    seq_len: int = 512
    workers: int = 0  # 0: every usable core
    shard_tokens: int = 1 << 24
    overwrite: bool = False
    quiet: bool = False
    records: RecordOptions = field(default_factory=RecordOptions)

    @property
    def packed(self) -> bool:
        """Whole units in best-fit rows (sft, reason, dpo), not pretrain windows."""
        return self.stage in PACKED_STAGES

    def problem(self) -> str | None:
        """The first invalid option as a message naming its flag, or None."""
        if self.stage not in STAGES:
            return f"--stage must be one of {', '.join(STAGES)}"
        if self.seq_len < 8:
            return "--seq-len must be at least 8"
        if self.workers < 0:
            return "--workers must be at least 1"
        if self.shard_tokens < self.seq_len + 1:
            return "--shard-tokens must be larger than --seq-len"
        if self.records.parse_special and self.stage != "pretrain":
            return "--parse-special applies to --stage pretrain only (chat content is always text)"
        return self.records.problem()


@dataclass
class PackResult:
    """What :func:`pack` did: the dataset's meta.json and how this run got there."""

    out: Path
    meta: dict = field(default_factory=dict)  # the meta.json in ``out`` (written now, or found complete)
    kept_shards: int = 0  # finished shards of an earlier run that were kept (all of them when already_complete)
    already_complete: bool = False  # ``out`` already held this very dataset: nothing was written
    seconds: float = 0.0  # time spent encoding and writing shards
    notes: list[str] = field(default_factory=list)  # remarks on the run (main prints them unless --quiet)
    warnings: list[str] = field(default_factory=list)  # what a user must see (main always prints them)

    @property
    def counts(self) -> dict:
        return self.meta["counts"]


def parse_args(argv: list[str] | None = None) -> PackOptions:
    p = argparse.ArgumentParser(
        prog="pack.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\nExample:\n  python preprocess/pack.py --stage sft "
        "--input 'data/sample/sft/*.jsonl' 'more.jsonl.zst:0.5'")
    p.add_argument("--stage", required=True, choices=STAGES,
                   help="pretrain: {text}; sft/reason: {conversations}; dpo: {chosen, rejected}")
    p.add_argument("--input", nargs="+", metavar="FILE[:WEIGHT]",
                   help="JSONL, .jsonl.zst or Parquet files or globs; WEIGHT repeats (2) or subsamples (0.3) "
                        "a source deterministically (default: data/sample/<stage>/*.jsonl)")
    p.add_argument("--out", type=Path, help="output folder (default: data/packed/<stage>)")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER),
                   help="tokenizer directory or tokenizer.json (default: the shipped data/tokenizer)")
    p.add_argument("--seq-len", type=int, default=512,
                   help="row length in tokens: packed rows for sft/reason/dpo, windows for pretrain (default 512)")
    p.add_argument("--workers", type=int,
                   help="tokenizer processes (default: every usable core; more are capped to them); "
                        "the output does not depend on it")
    add_record_arguments(p)
    p.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard (default 16M)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset of other inputs (or a damaged one) in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar, notes or summary (warnings still print)")
    args = p.parse_args(argv)
    if args.input is None:
        sample = {"reason": "reasoning"}.get(args.stage, args.stage)
        args.input = [str(REPO_ROOT / "data" / "sample" / sample / "*.jsonl")]
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be at least 1")
    opts = PackOptions(args.stage, args.input, args.out or REPO_ROOT / "data" / "packed" / args.stage,
                       args.tokenizer, args.seq_len, args.workers or 0, args.shard_tokens, args.overwrite, args.quiet,
                       RecordOptions.from_args(args))
    if message := opts.problem():
        p.error(message)
    return opts


def worker_count(opts: PackOptions, result: PackResult) -> int:
    """--workers, or every usable core; never more than the usable cores (capping is noted)."""
    cores = usable_cores()
    if opts.workers > cores:
        result.notes.append(f"--workers {opts.workers} capped at the {cores} usable core(s)")
    return min(opts.workers, cores) if opts.workers else cores


def plan_fingerprint(opts: PackOptions, specs: list[SourceSpec], tok: TokenizerInfo) -> str:
    """Everything the output bytes depend on (not --workers): a re-run must match it to resume."""
    r = opts.records
    plan = {
        "format": shards.VERSION, "stage": opts.stage, "seq_len": opts.seq_len, "overlong": r.overlong,
        "tag_weight": r.tag_weight if opts.stage == "reason" else None, "shard_tokens": opts.shard_tokens,
        "max_record_chars": r.max_record_chars, "parse_special": r.parse_special,
        "tokenizer": tok.fingerprint,
        "sources": [[str(s.path.resolve()), s.path.stat().st_size, s.path.stat().st_mtime_ns, s.weight]
                    for s in specs],
    }
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


# The keys (and types) of a shard record that a resume sums into meta.json (pack.py's stats).
SHARD_RECORD_KEYS = {"files": dict, "records_end": int, "records_read": int, "records_kept": int, "truncated": int,
                     "dropped": dict, "skipped": dict, "tokens": int, "documents": int, "supervised_tokens": int,
                     "train_rows": int, "row_slots": int, "row_tokens": int}
Check = Callable[[object, Path], dict]


def written_by_pack(what: str, keys: dict[str, type]) -> Check:
    """A check that a JSON value is the object pack.py writes as ``what``: ``keys`` present with those types."""
    def check(obj: object, path: Path) -> dict:
        if not isinstance(obj, dict) or any(not isinstance(obj.get(k), t) for k, t in keys.items()):
            raise TinyLMError(f"the {what} is corrupt: not the object pack.py writes", path=path)
        return obj
    return check


def checked_meta(obj: object, path: Path) -> dict:
    """meta.json as pack.py writes it: the format's own checks (``shards.check_meta``: version, fields,
    shard records) plus what a resume needs (the plan fingerprint, every shard's stats)."""
    meta = shards.check_meta(written_by_pack("meta.json", {"plan_fingerprint": str, "shards": list})(obj, path), path)
    for record in meta["shards"]:
        written_by_pack("meta.json", SHARD_RECORD_KEYS)(record, path)
    return meta


def own_json(path: Path, opts: PackOptions, check: Check) -> dict | None:
    """A JSON file pack.py wrote into --out, passed through ``check``, or None when absent. A corrupt one
    is refused in one line (its own error, with what to do), or ignored (None) with ``--overwrite``."""
    if not path.exists():
        return None
    try:
        return check(read_json(path, path.name), path)
    except TinyLMError as e:
        if opts.overwrite:
            return None
        raise e.with_hint(f"pass --overwrite to repack {opts.out} from scratch") from None


def keep_finished(opts: PackOptions, tok: TokenizerInfo, records: Iterator[dict | None],
                  result: PackResult) -> list[dict]:
    """The finished, sound shards 0..k-1 of ``records`` (``shards.finished_shards``); an unsound one is
    warned about, and it and every shard after it are packed again."""
    done, problem = shards.finished_shards(opts.out, records, shards.token_dtype_for(tok.vocab_size),
                                           tok.vocab_size, opts.seq_len if opts.packed else None)
    if problem is not None:
        result.warnings.append(f"{opts.out / shards.shard_name(len(done))}: its files do not match their recorded "
                               f"checksums (changed or corrupted since it was written: {problem}); packing it and "
                               "the shards after it again")
    return done


def pack_output_file(name: str) -> bool:
    """The names pack.py writes into --out: meta.json, its state file and shard files."""
    return name in ("meta.json", STATE_FILE) or shards.shard_index(name) is not None


def clear_outputs(out: Path, keep: int) -> None:
    """Remove temp files and every shard file numbered >= keep (left half-done by a killed run)."""
    for path in out.iterdir():
        index = shards.shard_index(path.name)
        if is_temp_file(path.name) or index is not None and index >= keep:
            path.unlink()


def prepare_out(opts: PackOptions, fingerprint: str, tok: TokenizerInfo,
                result: PackResult) -> tuple[list[dict], dict | None]:
    """Inspect --out (already created and locked): (the finished shards this run keeps, the meta.json
    when the dataset is already complete, else None)."""
    out = opts.out
    meta_path, state_path = out / "meta.json", out / STATE_FILE
    meta = own_json(meta_path, opts, checked_meta)
    done: list[dict] = []
    if meta is not None and meta["plan_fingerprint"] == fingerprint:
        done = keep_finished(opts, tok, iter(meta["shards"]), result)
        if len(done) == len(meta["shards"]):
            return done, meta
    elif meta is not None and not opts.overwrite:
        raise PackError(f"{meta_path}: {out} already holds a packed dataset of other inputs or options; "
                        "pass --overwrite or choose another --out")
    else:
        state = own_json(state_path, opts, written_by_pack("pack state file", {"plan_fingerprint": str}))
        if state is not None and state["plan_fingerprint"] == fingerprint:
            check = written_by_pack("shard record", SHARD_RECORD_KEYS)
            records = (own_json(shards.shard_record_path(out, i), opts, check) for i in itertools.count())
            done = keep_finished(opts, tok, records, result)
        elif state is not None:
            result.notes.append(f"inputs or options changed since the interrupted run in {out}; starting over")
    meta_path.unlink(missing_ok=True)
    clear_outputs(out, keep=len(done))
    atomic_write_json(state_path, {"plan_fingerprint": fingerprint})
    return done, None


def tally(outcomes: Counter) -> dict:
    """Per-record outcomes -> counts: kept (truncated among them), dropped and skipped by reason."""
    def by_prefix(prefix: str) -> dict[str, int]:
        return {k[len(prefix):]: v for k, v in sorted(outcomes.items()) if k.startswith(prefix)}
    return {"records_kept": outcomes[OK] + outcomes[TRUNCATED], "truncated": outcomes[TRUNCATED],
            "dropped": by_prefix("dropped:"), "skipped": by_prefix("bad:")}


class ShardBuilder:
    """Accumulates encoded records in input order and writes a shard every ``shard_tokens`` tokens."""

    def __init__(self, opts: PackOptions, token_dtype: str, first_index: int, records_before: int):
        self.opts, self.token_dtype = opts, token_dtype
        self.index, self.records_end = first_index, records_before
        self.written: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.unit_docs: list[int] = []
        self.outcomes: Counter = Counter()
        self.records = self.tokens = self.literal_specials = 0

    def add(self, chunk: EncodedChunk) -> None:
        """Add a chunk item by item, closing shards at the first item that reaches the token budget."""
        item_docs = np.array(chunk.unit_docs, dtype=np.int64)
        doc_end = np.cumsum(item_docs)
        tok_end = np.concatenate([[0], np.cumsum(chunk.doc_lens)])[doc_end]
        lo = 0
        while lo < len(item_docs):
            tok_lo = int(tok_end[lo - 1]) if lo else 0
            over = np.nonzero(self.tokens + tok_end[lo:] - tok_lo >= self.opts.shard_tokens)[0]
            hi = lo + int(over[0]) + 1 if over.size else len(item_docs)
            doc_lo, doc_hi = (int(doc_end[lo - 1]) if lo else 0), int(doc_end[hi - 1])
            tok_hi = int(tok_end[hi - 1])
            tokens = slice(tok_lo, tok_hi)
            self.parts.append((chunk.tokens[tokens], chunk.weights[tokens], chunk.doc_lens[doc_lo:doc_hi]))
            self.unit_docs.extend(n for n in chunk.unit_docs[lo:hi] if n)
            self.outcomes.update(chunk.outcomes[lo:hi])
            self.literal_specials += sum(chunk.literal_specials[lo:hi])
            self.records += hi - lo
            self.tokens += tok_hi - tok_lo
            if over.size:
                self.flush()
            lo = hi

    def flush(self) -> None:
        if not self.records:
            return
        def cat(i: int, dtype: str) -> np.ndarray:
            return np.concatenate([p[i] for p in self.parts]) if self.parts else np.zeros(0, dtype)
        tokens, weights, doc_lens = cat(0, "uint32"), cat(1, "uint8"), cat(2, "int64")
        packed, seq = self.opts.packed, self.opts.seq_len
        shard = assemble_shard(tokens, weights, doc_lens, np.array(self.unit_docs, dtype=np.int64), seq, packed)
        self.records_end += self.records
        train_rows = shard.training_rows(seq, packed)
        stats = {
            "records_end": self.records_end, "records_read": self.records, **tally(self.outcomes),
            "supervised_tokens": int(np.count_nonzero(weights)), "train_rows": train_rows,
            "records_with_special_strings": self.literal_specials,
            "row_slots": train_rows * seq,
            "row_tokens": len(tokens) if packed else train_rows * seq,
        }
        try:
            self.written.append(shards.write_shard(self.opts.out, self.index, shard, self.token_dtype, stats))
        except BaseException:
            clear_outputs(self.opts.out, keep=self.index)  # no shard is left with only some of its files
            raise
        self.index += 1
        self._reset()


def summarize(opts: PackOptions, specs: list[SourceSpec], tok: TokenizerInfo, records: list[dict],
              fingerprint: str, per_source: Counter) -> dict:
    """meta.json: the dataset's description, totals summed from the shard records.

    Invariant (checked): records_read == records_kept + sum(dropped) + sum(skipped), where the
    truncated records are a part of records_kept.
    """
    def total(key: str) -> int:
        return sum(r[key] for r in records)
    skipped: Counter = Counter()
    dropped: Counter = Counter()
    for r in records:
        skipped.update(r["skipped"])
        dropped.update(r["dropped"])
    slots, filled = total("row_slots"), total("row_tokens")
    units = total("documents") // (2 if opts.stage == "dpo" else 1)
    r = opts.records
    counts = {
        "records_read": total("records_read"), "records_kept": total("records_kept"),
        "truncated": total("truncated"), "dropped": dict(sorted(dropped.items())),
        "skipped": dict(sorted(skipped.items())), "tokens": total("tokens"),
        "supervised_tokens": total("supervised_tokens"), "documents": total("documents"),
        "rows": total("train_rows"), "unused_tokens": unused_tokens(opts, records),
        "records_with_special_strings": total("records_with_special_strings"),
    }
    accounted = counts["records_kept"] + sum(dropped.values()) + sum(skipped.values())
    if accounted != counts["records_read"]:
        raise AssertionError(f"pack accounting broken: read {counts['records_read']} != {accounted} accounted")
    return {
        "format_version": shards.VERSION, "stage": opts.stage, "seq_len": opts.seq_len,
        "token_dtype": shards.token_dtype_for(tok.vocab_size), "plan_fingerprint": fingerprint,
        "tokenizer": {"path": str(tok.path), "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
                      "special_ids": tok.special_ids},
        "options": {"overlong": r.overlong, "tag_weight": r.tag_weight if opts.stage == "reason" else None,
                    "shard_tokens": opts.shard_tokens, "max_record_chars": r.max_record_chars,
                    "skip_bad": r.skip_bad, "parse_special": r.parse_special},
        "counts": counts,
        "packing": {
            "efficiency": round(filled / slots, 6) if slots else 0.0,
            "pad_to_max_efficiency": round(total("tokens") / (units * opts.seq_len), 6) if units else 0.0,
        },
        "sources": [{"path": str(s.path), "bytes": s.path.stat().st_size, "weight": s.weight,
                     "records": per_source[str(s.path)]} for s in specs],
        "shards": records,
    }


def unused_tokens(opts: PackOptions, records: list[dict]) -> int:
    """Pretrain: tokens in no training window (``shards.unused_window_tokens`` of each shard). Packed
    stages use every stored token: 0."""
    if opts.packed:
        return 0
    return sum(shards.unused_window_tokens(r["tokens"], opts.seq_len) for r in records)


def encoded_chunks(enc: EncodeOptions, tok: TokenizerInfo, items: Iterator[Item], workers: int,
                   expected: int) -> Iterator[EncodedChunk]:
    """Encoded chunks of ``items`` (``expected`` of them, about) in input order; several workers go through
    :func:`preprocess.parallel.pool_map` (at most ``2 x workers`` chunks in flight, and the last chunks
    shrink so the workers end together; a worker that dies is a PackError naming the records it held)."""
    if workers == 1:
        yield from (encode_items(b, enc, tok) for b in chunks(items, CHUNK_RECORDS, CHUNK_BYTES))
        return
    batches = chunks(items, CHUNK_RECORDS, CHUNK_BYTES, expected, parts=2 * workers)

    def died(first: Item) -> PackError:
        return PackError(f"a tokenizer worker process died (killed, or out of memory?) while encoding the "
                         f"chunk of records from {first.source}:{first.line} on; lower --workers or "
                         "--max-record-chars and re-run to resume")
    yield from pool_map(encode_in_worker, batches, workers, init_worker, (tok, enc, True), died)


def check_has_rows(opts: PackOptions, counts: dict) -> None:
    """Zero training rows is an error, never an empty dataset with exit 0."""
    if counts["rows"]:
        return
    if not counts["records_kept"]:
        raise PackError(f"no record was kept from {', '.join(opts.inputs)}: {accounting_line(counts)}")
    need = f"one window of --seq-len {opts.seq_len} + 1 tokens" if opts.stage == "pretrain" else "one row"
    raise PackError(f"no training row: the {counts['records_kept']:,} kept record(s) hold {counts['tokens']:,} "
                    f"tokens, less than {need}; lower --seq-len or add data ({accounting_line(counts)})")


def counts_before(records: list[dict], outcomes: Counter) -> dict:
    """The accounting of the shard records written so far plus the per-record ``outcomes`` after them (for an
    error that stops a run midway)."""
    c = {"records_read": sum(outcomes.values()), **tally(outcomes)}
    dropped, skipped = Counter(c["dropped"]), Counter(c["skipped"])
    for r in records:
        for key in ("records_read", "records_kept", "truncated"):
            c[key] += r[key]
        dropped.update(r["dropped"])
        skipped.update(r["skipped"])
    return {**c, "dropped": dict(sorted(dropped.items())), "skipped": dict(sorted(skipped.items()))}


def accounting_line(c: dict) -> str:
    """``read N = kept K (T truncated) + dropped D (...) + skipped S (...)``."""
    def part(d: dict) -> str:
        return f" ({', '.join(f'{k} {v:,}' for k, v in d.items())})" if d else ""
    return (f"read {c['records_read']:,} = kept {c['records_kept']:,} ({c['truncated']:,} truncated) + dropped "
            f"{sum(c['dropped'].values()):,}{part(c['dropped'])} + skipped {sum(c['skipped'].values()):,}"
            f"{part(c['skipped'])}")


def overlong_warning(opts: PackOptions, c: dict) -> str | None:
    """One warning line when more than WARN_SHARE of the records were truncated or dropped."""
    cut = c["truncated"] + sum(c["dropped"].values())
    if not c["records_read"] or cut / c["records_read"] <= WARN_SHARE:
        return None
    dropped = sum(c["dropped"].values())
    fix = ("pass --overlong drop to drop them instead" if opts.records.overlong == "truncate"
           else "pass --overlong truncate to keep them, truncated")
    return (f"{cut / c['records_read']:.1%} of the records ({cut:,} of {c['records_read']:,}) "
            f"are longer than --seq-len {opts.seq_len}: {c['truncated']:,} truncated, {dropped:,} dropped; "
            f"raise --seq-len to keep them whole, or {fix}")


def special_strings_warning(opts: PackOptions, c: dict) -> str | None:
    """One line: how many records had special-token strings packed as text, and what changes that."""
    n = c["records_with_special_strings"]
    if not n:
        return None
    head = f"{n:,} record(s) contain special-token strings (e.g. <|im_end|>), packed as plain text"
    if opts.stage == "pretrain":
        return head + "; pass --parse-special if the corpus embeds them as control tokens on purpose"
    return head + " (in chat content they are always text; only the template inserts control tokens)"


def skipped_warning(c: dict) -> str | None:
    """One warning line when --skip-bad skipped more than WARN_SHARE of the records."""
    skipped = sum(c["skipped"].values())
    if not c["records_read"] or skipped / c["records_read"] <= WARN_SHARE:
        return None
    reasons = ", ".join(f"{k} {v:,}" for k, v in c["skipped"].items())
    return (f"{skipped / c['records_read']:.1%} of the records ({skipped:,} of "
            f"{c['records_read']:,}) were bad and skipped (--skip-bad): {reasons}")


def counted(items: Iterator[Item], per_source: Counter) -> Iterator[Item]:
    """``items`` unchanged, counting the real records of each source (an empty file's marker counts 0, so
    a source absent from ``per_source`` is one whose weight kept none of its records)."""
    for item in items:
        per_source[item.source] += 1 if item.line else 0
        yield item


def unmixed_warnings(sources: list[dict], per_source: Counter) -> list[str]:
    """A warning per non-empty source whose mixing weight kept none of its records (a silent loss otherwise)."""
    return [f"{s['path']}:{s['weight']:g} contributed no record: its weight keeps none of its "
            "records; raise the weight" for s in sources if s["path"] not in per_source]


def unused_warning(opts: PackOptions, c: dict) -> str | None:
    """One warning line when more than WARN_SHARE of the pretrain tokens fall in no training window."""
    if not c["tokens"] or c["unused_tokens"] / c["tokens"] <= WARN_SHARE:
        return None
    return (f"{c['unused_tokens'] / c['tokens']:.1%} of the tokens ({c['unused_tokens']:,} of "
            f"{c['tokens']:,}) are in no training window of --seq-len {opts.seq_len} + 1 (the tail of each "
            "shard); a smaller --seq-len or a larger --shard-tokens uses them")


def pack(options: PackOptions) -> PackResult:
    """Pack ``options.inputs`` into ``options.out`` (locked for the run) and describe what was done.

    A re-run with the same inputs and options keeps the finished shards of an interrupted run and packs
    the rest, or, when the dataset is complete, writes nothing (``already_complete``); other inputs in
    the same folder are refused unless ``overwrite``. Every problem is a TinyLMError (one line); on one,
    ``out`` holds no half-written file and no meta.json that was not there."""
    if message := options.problem():
        raise PackError(message)
    specs = parse_input_args(options.inputs)
    tok = load_tokenizer(options.tokenizer)
    if options.stage != "pretrain":
        tok.require_chat(f"--stage {options.stage}")
    if options.stage == "reason" and options.records.tag_weight != 1 and not tok.has_reasoning_tags:
        raise PackError(f"{tok.path}: <think>/</think>/<answer>/</answer> are not single ids in this tokenizer, "
                        "so they cannot be weighted; use a tokenizer that has them or pass --tag-weight 1")
    max_line = BYTES_PER_CHAR_MAX * options.records.max_record_chars
    total_items = count_items(specs, max_line)  # reads every input once: a broken file is refused here
    fingerprint = plan_fingerprint(options, specs, tok)
    check_output_folder(options.out, "pack.py", pack_output_file,
                        [*(("--input", s.path) for s in specs), ("--tokenizer", tok.path)])
    result = PackResult(options.out)
    if options.stage != "pretrain" and (note := tok.missing_tags_note()):
        result.warnings.append(note)  # said once per run (the workers render quietly)
    with FolderLock(options.out, "pack", create="output folder"):
        done, meta = prepare_out(options, fingerprint, tok, result)
        result.kept_shards = len(done)
        if meta is not None:
            result.meta, result.already_complete = meta, True
            return result
        _pack_rest(options, specs, tok, fingerprint, done, total_items, max_line, result)
    return result


def progress_bar(opts: PackOptions, total: int, initial: int) -> AbstractContextManager:
    """The tqdm bar of the records packed; with ``--quiet`` a stand-in that shows nothing, so tqdm (~60 ms
    of imports) is imported only when a bar is shown."""
    if opts.quiet:
        return SilentBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="rec", desc=f"pack {opts.stage}", dynamic_ncols=True)


class SilentBar(nullcontext):
    """What ``--quiet`` shows: nothing (the calls :func:`_pack_rest` makes on a tqdm bar do nothing)."""

    def __init__(self) -> None:
        super().__init__(self)

    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **values: object) -> None:
        pass


def _pack_rest(opts: PackOptions, specs: list[SourceSpec], tok: TokenizerInfo, fingerprint: str,
               done: list[dict], total_items: int, max_line: int, result: PackResult) -> None:
    """Encode and write every shard after ``done``, then meta.json (last); fills ``result``."""
    records_before = done[-1]["records_end"] if done else 0
    builder = ShardBuilder(opts, shards.token_dtype_for(tok.vocab_size), len(done), records_before)
    r = opts.records
    enc = EncodeOptions(opts.stage, opts.seq_len, r.overlong, r.tag_weight, r.max_record_chars, r.parse_special)
    per_source: Counter = Counter()  # records each source contributed after its weight (resume included)
    items = itertools.islice(counted(iter_items(specs, max_line), per_source), records_before, None)
    start = time.perf_counter()
    encoded = encoded_chunks(enc, tok, items, worker_count(opts, result), total_items - records_before)
    with progress_bar(opts, total_items, records_before) as bar, contextlib.closing(encoded):
        for chunk in encoded:
            at = None if r.skip_bad else next((i for i, e in enumerate(chunk.errors) if e is not None), None)
            if at is not None:
                before = counts_before(done + builder.written, builder.outcomes + Counter(chunk.outcomes[:at]))
                raise chunk.errors[at].with_hint(f"pass --skip-bad to skip and count bad records (before it: "
                                                 f"{accounting_line(before)})")
            builder.add(chunk)
            bar.update(len(chunk.outcomes))
            bar.set_postfix(tokens=f"{sum(r['tokens'] for r in builder.written) + builder.tokens:,}", refresh=False)
        builder.flush()
    meta = summarize(opts, specs, tok, done + builder.written, fingerprint, per_source)
    try:
        check_has_rows(opts, meta["counts"])
    except PackError:
        clear_outputs(opts.out, keep=0)
        (opts.out / STATE_FILE).unlink(missing_ok=True)
        raise
    c = meta["counts"]
    result.warnings += [w for w in (overlong_warning(opts, c), skipped_warning(c), unused_warning(opts, c),
                                    special_strings_warning(opts, c), *unmixed_warnings(meta["sources"], per_source))
                        if w]
    atomic_write_json(opts.out / "meta.json", meta)
    (opts.out / STATE_FILE).unlink(missing_ok=True)
    result.meta, result.seconds = meta, time.perf_counter() - start


def summary_lines(result: PackResult) -> list[str]:
    """The closing summary: shards, the record accounting, tokens (and the rate), rows and packing."""
    meta, c = result.meta, result.counts
    p = meta["packing"]
    rate = f"  ({c['tokens'] / result.seconds:,.0f} tokens/s)" if result.seconds else ""
    return [
        f"packed {meta['stage']} -> {result.out}  [{len(meta['shards'])} shard(s), {meta['token_dtype']}]",
        f"  records   {accounting_line(c)}",
        f"  tokens    {c['tokens']:,} in {c['documents']:,} documents, {c['supervised_tokens']:,} with loss{rate}",
        f"  rows      {c['rows']:,} x {meta['seq_len']}  packing efficiency {p['efficiency']:.1%} "
        f"(pad-to-max would be {p['pad_to_max_efficiency']:.1%})",
    ]


def report(result: PackResult, quiet: bool) -> None:
    """Print a pack's notes (not with --quiet) and warnings (always) on stderr, its summary on stdout."""
    for note in [] if quiet else result.notes:
        print(f"pack.py: note: {note}", file=sys.stderr)
    for warning in result.warnings:
        print(f"pack.py: warning: {warning}", file=sys.stderr)
    if not quiet:
        print("\n".join(summary_lines(result)))


def main(argv: list[str] | None = None) -> int:
    """``python preprocess/pack.py ...``: arguments -> PackOptions -> pack -> printed report."""
    options = parse_args(argv)
    return run_main("pack.py", lambda: report(pack(options), options.quiet),
                    interrupted="interrupted; re-run the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
