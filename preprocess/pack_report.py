"""A pack's accounting: meta.json from the shard records, the warnings a user must see, the summary lines.

Invariant (checked in :func:`summarize`): records_read == records_kept + dropped + skipped, where the
truncated records are a part of records_kept; every error raised after records were read says so too
(:func:`accounting_line`).
"""

from __future__ import annotations

import sys
from collections import Counter

from core.tokenizer import TokenizerInfo
from preprocess import shards
from preprocess.encode import (
    OK,
    TRUNCATED,
)
from preprocess.pack_plan import PackError, PackOptions, PackResult
from preprocess.sources import (
    SourceSpec,
)

HOLD_OUT_REASONS = ("held_out", "not_held_out")  # --hold-out-every's two sides
WARN_SHARE = 0.01  # warn when more than this share of the records (or pretrain tokens) is cut or unused


def tally(outcomes: Counter) -> dict:
    """Per-record outcomes -> counts: kept (truncated among them), dropped and skipped by reason."""
    def by_prefix(prefix: str) -> dict[str, int]:
        return {k[len(prefix):]: v for k, v in sorted(outcomes.items()) if k.startswith(prefix)}
    return {"records_kept": outcomes[OK] + outcomes[TRUNCATED], "truncated": outcomes[TRUNCATED],
            "dropped": by_prefix("dropped:"), "skipped": by_prefix("bad:")}

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
                    "skip_bad": r.skip_bad, "parse_special": r.parse_special,
                    "hold_out_every": r.hold_out_every, "held_out_only": r.held_out_only},
        "chat_template": r.chat_meta(tok, opts.stage),
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
    held = sum(n for reason, n in c["dropped"].items() if reason in HOLD_OUT_REASONS)  # not about length
    dropped = sum(c["dropped"].values()) - held
    cut = c["truncated"] + dropped
    if not c["records_read"] or cut / c["records_read"] <= WARN_SHARE:
        return None
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
