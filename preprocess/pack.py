#!/usr/bin/env python3
"""Tokenize raw JSONL / .jsonl.zst / Parquet once into packed, memory-mapped shards for one stage.

    python preprocess/pack.py --stage sft --input 'data/sample/sft/*.jsonl' --out data/packed/sft

Pipeline: sources (weights mix) -> worker processes (validate, render, tokenize a chunk of records)
-> in-order shard builder (best-fit rows) -> atomic shard files -> meta.json. A shard closes after
``--shard-tokens`` tokens at a record boundary, so shard contents depend only on the inputs and
options: any ``--workers`` gives the same bytes, and a killed run re-run with the same arguments
skips the finished shards and ends with byte-identical output. See docs/FORMAT.md.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from core.errors import TinyLMError  # noqa: E402
from core.files import atomic_write_json  # noqa: E402
from core.tokenizer import (  # noqa: E402
    DEFAULT_TOKENIZER,
    REPO_ROOT,
    TokenizerError,
    TokenizerInfo,
    load_tokenizer,
)
from preprocess import shards  # noqa: E402
from preprocess.encode import (  # noqa: E402
    DROPPED,
    OK,
    PACKED_STAGES,
    TRUNCATED,
    EncodedChunk,
    EncodeOptions,
    encode_in_worker,
    encode_items,
    init_worker,
)
from preprocess.packing import assemble_shard  # noqa: E402
from preprocess.records import STAGES  # noqa: E402
from preprocess.sources import InputError, Item, SourceSpec, count_items, iter_items, parse_input_args  # noqa: E402

STATE_FILE = ".pack_state.json"
CHUNK_RECORDS = 512


class PackError(TinyLMError):
    """A fatal, user-facing problem: printed as one line, exit status 1."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenizer processes (default: all cores); the output does not depend on it")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip malformed records, counted per reason, instead of stopping at the first one")
    p.add_argument("--overlong", choices=("drop", "truncate"), default="drop",
                   help="records longer than --seq-len (sft/reason/dpo): drop or truncate, counted (default drop)")
    p.add_argument("--tag-weight", type=int, default=10,
                   help="reason stage: loss weight of <think> </think> <answer> </answer> (default 10)")
    p.add_argument("--parse-special", action="store_true",
                   help="pretrain: encode special-token strings in the text (e.g. <|im_start|>) as control tokens, "
                        "for corpora that embed them on purpose (default: they are plain text)")
    p.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard (default 16M)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished dataset of other inputs in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    args = p.parse_args(argv)
    if args.input is None:
        sample = {"reason": "reasoning"}.get(args.stage, args.stage)
        args.input = [str(REPO_ROOT / "data" / "sample" / sample / "*.jsonl")]
    args.out = args.out or REPO_ROOT / "data" / "packed" / args.stage
    if args.seq_len < 8:
        p.error("--seq-len must be at least 8")
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if not 1 <= args.tag_weight <= 255:
        p.error("--tag-weight must be in 1..255 (it is stored as uint8)")
    if args.parse_special and args.stage != "pretrain":
        p.error("--parse-special applies to --stage pretrain only (chat content is always text)")
    if args.shard_tokens < args.seq_len + 1:
        p.error("--shard-tokens must be larger than --seq-len")
    return args


def plan_fingerprint(args: argparse.Namespace, specs: list[SourceSpec], tok: TokenizerInfo) -> str:
    """Everything the output bytes depend on (not --workers): a re-run must match it to resume."""
    plan = {
        "format": shards.VERSION, "stage": args.stage, "seq_len": args.seq_len, "overlong": args.overlong,
        "tag_weight": args.tag_weight if args.stage == "reason" else None, "shard_tokens": args.shard_tokens,
        "parse_special": args.parse_special, "tokenizer": tok.fingerprint,
        "sources": [[str(s.path.resolve()), s.path.stat().st_size, s.path.stat().st_mtime_ns, s.weight]
                    for s in specs],
    }
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def finished_shards(out: Path) -> list[dict]:
    """The contiguous run of finished shards 0..k-1 left by an earlier run (their .json records)."""
    done = []
    for index in itertools.count():
        record_path = out / f"{shards.shard_name(index)}.json"
        if not record_path.is_file():
            break
        record = json.loads(record_path.read_text())
        if any(not (out / f).is_file() or (out / f).stat().st_size != v["bytes"] for f, v in record["files"].items()):
            break
        done.append(record)
    return done


def clear_outputs(out: Path, keep: int) -> None:
    """Remove temp files and every shard file numbered >= keep (left half-done by a killed run)."""
    for path in out.iterdir():
        if path.name.endswith(".tmp") or path.name.startswith("shard_") and int(path.name[6:11]) >= keep:
            path.unlink()


def prepare_out(args: argparse.Namespace, fingerprint: str) -> list[dict]:
    """Create/inspect --out; returns the finished shards that this run can keep."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    meta_path, state_path = out / "meta.json", out / STATE_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("plan_fingerprint") == fingerprint:
            return meta["shards"]
        if not args.overwrite:
            raise PackError(f"{meta_path}: {out} already holds a packed dataset of other inputs or options; "
                            "pass --overwrite or choose another --out")
        meta_path.unlink()
    if state_path.is_file() and json.loads(state_path.read_text()).get("plan_fingerprint") == fingerprint:
        done = finished_shards(out)
    else:
        if state_path.is_file() and not args.quiet:
            print(f"note: inputs or options changed since the interrupted run in {out}; starting over",
                  file=sys.stderr)
        done = []
    clear_outputs(out, keep=len(done))
    atomic_write_json(state_path, {"plan_fingerprint": fingerprint})
    return done


def chunks(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    while batch := list(itertools.islice(items, size)):
        yield batch


class ShardBuilder:
    """Accumulates encoded records in input order and writes a shard every ``shard_tokens`` tokens."""

    def __init__(self, args: argparse.Namespace, token_dtype: str, first_index: int, records_before: int):
        self.args, self.token_dtype = args, token_dtype
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
            over = np.nonzero(self.tokens + tok_end[lo:] - tok_lo >= self.args.shard_tokens)[0]
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
        packed = self.args.stage in PACKED_STAGES
        shard = assemble_shard(tokens, weights, doc_lens, np.array(self.unit_docs, dtype=np.int64),
                               self.args.seq_len, packed)
        self.records_end += self.records
        seq = self.args.seq_len
        train_rows = shard.n_rows if packed else max(0, (len(tokens) - 1) // seq)
        stats = {
            "records_end": self.records_end, "records_read": self.records,
            "records_kept": self.outcomes[OK] + self.outcomes[TRUNCATED],
            "truncated": self.outcomes[TRUNCATED], "dropped_overlong": self.outcomes[DROPPED],
            "skipped": {k[4:]: v for k, v in sorted(self.outcomes.items()) if k.startswith("bad:")},
            "supervised_tokens": int(np.count_nonzero(weights)), "train_rows": train_rows,
            "records_with_special_strings": self.literal_specials,
            "row_slots": train_rows * seq,
            "row_tokens": len(tokens) if packed else train_rows * seq,
        }
        self.written.append(shards.write_shard(self.args.out, self.index, shard, self.token_dtype, stats))
        self.index += 1
        self._reset()


def summarize(args: argparse.Namespace, specs: list[SourceSpec], tok: TokenizerInfo, records: list[dict],
              fingerprint: str) -> dict:
    """meta.json: the dataset's description, totals summed from the shard records."""
    def total(key: str) -> int:
        return sum(r[key] for r in records)
    skipped: Counter = Counter()
    for r in records:
        skipped.update(r["skipped"])
    slots, filled = total("row_slots"), total("row_tokens")
    units = total("documents") // (2 if args.stage == "dpo" else 1)
    return {
        "format_version": shards.VERSION, "stage": args.stage, "seq_len": args.seq_len,
        "token_dtype": shards.token_dtype_for(tok.vocab_size), "plan_fingerprint": fingerprint,
        "tokenizer": {"path": str(tok.path), "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
                      "special_ids": tok.special_ids},
        "options": {"overlong": args.overlong, "tag_weight": args.tag_weight if args.stage == "reason" else None,
                    "shard_tokens": args.shard_tokens, "parse_special": args.parse_special},
        "counts": {
            "records_read": total("records_read"), "records_kept": total("records_kept"),
            "skipped": dict(sorted(skipped.items())), "truncated": total("truncated"),
            "dropped_overlong": total("dropped_overlong"), "tokens": total("tokens"),
            "supervised_tokens": total("supervised_tokens"), "documents": total("documents"),
            "rows": total("train_rows"),
            "records_with_special_strings": total("records_with_special_strings"),
        },
        "packing": {
            "efficiency": round(filled / slots, 6) if slots else 0.0,
            "pad_to_max_efficiency": round(total("tokens") / (units * args.seq_len), 6) if units else 0.0,
        },
        "sources": [{"path": str(s.path), "bytes": s.path.stat().st_size, "weight": s.weight} for s in specs],
        "shards": records,
    }


def encoded_chunks(args: argparse.Namespace, opts: EncodeOptions, tok: TokenizerInfo,
                   items: Iterator[Item]) -> Iterator[EncodedChunk]:
    batches = chunks(items, CHUNK_RECORDS)
    if args.workers == 1:
        yield from (encode_items(b, opts, tok) for b in batches)
        return
    with mp.get_context().Pool(args.workers, init_worker, (str(tok.path), opts, True)) as pool:
        yield from pool.imap(encode_in_worker, batches)


def pack(args: argparse.Namespace) -> dict:
    specs = parse_input_args(args.input)
    tok = load_tokenizer(args.tokenizer)
    if args.stage == "reason" and args.tag_weight != 1 and not tok.has_reasoning_tags:
        raise PackError(f"{tok.path}: <think>/</think>/<answer>/</answer> are not single ids in this tokenizer, "
                        "so they cannot be weighted; use a tokenizer that has them or pass --tag-weight 1")
    fingerprint = plan_fingerprint(args, specs, tok)
    done = prepare_out(args, fingerprint)
    if (args.out / "meta.json").is_file():
        return json.loads((args.out / "meta.json").read_text())
    records_before = done[-1]["records_end"] if done else 0
    token_dtype = shards.token_dtype_for(tok.vocab_size)
    builder = ShardBuilder(args, token_dtype, len(done), records_before)
    opts = EncodeOptions(args.stage, args.seq_len, args.overlong, args.tag_weight, args.parse_special)
    items = itertools.islice(iter_items(specs), records_before, None)
    start = time.perf_counter()
    with tqdm(total=count_items(specs), initial=records_before, unit="rec", disable=args.quiet,
              desc=f"pack {args.stage}", dynamic_ncols=True) as bar:
        for chunk in encoded_chunks(args, opts, tok, items):
            if not args.skip_bad:
                bad = next((m for o, m in zip(chunk.outcomes, chunk.messages, strict=True)
                            if o.startswith("bad:")), None)
                if bad:
                    raise PackError(f"{bad}  (pass --skip-bad to skip and count bad records)")
            builder.add(chunk)
            bar.update(len(chunk.outcomes))
            bar.set_postfix(tokens=f"{sum(r['tokens'] for r in builder.written) + builder.tokens:,}", refresh=False)
        builder.flush()
    records = done + builder.written
    meta = summarize(args, specs, tok, records, fingerprint)
    if meta["counts"]["tokens"] == 0:
        clear_outputs(args.out, keep=0)
        raise PackError(f"no record was kept from {len(specs)} source(s): {meta['counts']}")
    meta_seconds = time.perf_counter() - start
    atomic_write_json(args.out / "meta.json", meta)
    (args.out / STATE_FILE).unlink(missing_ok=True)
    meta["_seconds"] = meta_seconds
    return meta


def print_summary(meta: dict, out: Path) -> None:
    c, p = meta["counts"], meta["packing"]
    seconds = meta.get("_seconds")
    rate = f"  ({c['tokens'] / seconds:,.0f} tokens/s)" if seconds else ""
    lines = [
        f"packed {meta['stage']} -> {out}  [{len(meta['shards'])} shard(s), {meta['token_dtype']}]",
        f"  records   read {c['records_read']:,}  kept {c['records_kept']:,}  truncated {c['truncated']:,}  "
        f"dropped (overlong) {c['dropped_overlong']:,}",
        f"  skipped   {', '.join(f'{k} {v:,}' for k, v in c['skipped'].items()) or 'none'}",
        f"  tokens    {c['tokens']:,} in {c['documents']:,} documents, {c['supervised_tokens']:,} with loss{rate}",
        f"  rows      {c['rows']:,} x {meta['seq_len']}  packing efficiency {p['efficiency']:.1%} "
        f"(pad-to-max would be {p['pad_to_max_efficiency']:.1%})",
    ]
    print("\n".join(lines))
    if c.get("records_with_special_strings"):
        print(special_strings_warning(meta), file=sys.stderr)


def special_strings_warning(meta: dict) -> str:
    """One line: how many records had special-token strings packed as text, and what changes that."""
    n = meta["counts"]["records_with_special_strings"]
    head = f"warning: {n:,} record(s) contain special-token strings (e.g. <|im_end|>), packed as plain text"
    if meta["stage"] == "pretrain":
        return head + "; pass --parse-special if the corpus embeds them as control tokens on purpose"
    return head + " (in chat content they are always text; only the template inserts control tokens)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        meta = pack(args)
    except (PackError, InputError, TokenizerError, shards.ShardError) as e:
        print(f"pack.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pack.py: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    if not args.quiet:
        print_summary(meta, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
