"""A pack's options and result, and what a re-run keeps of the folder an earlier run left.

A pack is a *plan* (:func:`plan_fingerprint`: every option and input byte count the output depends on,
not ``--workers``). A re-run with the same plan keeps the finished, sound shards of an interrupted run
(``shards.finished_shards`` decides which) and packs the rest; a folder holding another plan's dataset is
refused unless ``--overwrite``; a folder holding files pack.py did not write is refused always
(:func:`core.files.check_output_folder` with :func:`pack_output_file`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import TinyLMError
from core.files import atomic_write_json, is_temp_file, read_json
from core.tokenizer import DEFAULT_TOKENIZER, TokenizerInfo
from preprocess import shards
from preprocess.encode import (
    PACKED_STAGES,
)
from preprocess.options import RecordOptions
from preprocess.records import STAGES
from preprocess.sources import (
    SourceSpec,
)

STATE_FILE = ".pack_state.json"


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

def plan_fingerprint(opts: PackOptions, specs: list[SourceSpec], tok: TokenizerInfo) -> str:
    """Everything the output bytes depend on (not --workers): a re-run must match it to resume."""
    r = opts.records
    plan = {
        "format": shards.VERSION, "stage": opts.stage, "seq_len": opts.seq_len, "overlong": r.overlong,
        "tag_weight": r.tag_weight if opts.stage == "reason" else None, "shard_tokens": opts.shard_tokens,
        "max_record_chars": r.max_record_chars, "parse_special": r.parse_special,
        "tokenizer": tok.fingerprint, "chat_template": r.chat_meta(tok, opts.stage),
        "sources": [[str(s.path.resolve()), s.path.stat().st_size, s.path.stat().st_mtime_ns, s.weight]
                    for s in specs],
    }
    if r.hold_out_every:  # only then: folders packed before the option existed keep their fingerprint
        plan["hold_out"] = [r.hold_out_every, r.held_out_only]
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
