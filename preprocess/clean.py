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
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from core.errors import run_main  # noqa: E402
from core.numbers import (  # noqa: E402
    non_negative_float,
    non_negative_int,
    number,
    positive_int,
    probability,
    seed,
)
from preprocess.clean_options import DEDUP_CHOICES, LANG_CHOICES, CleanError, CleanOptions  # noqa: E402
from preprocess.clean_records import Preparer, text_of  # noqa: E402
from preprocess.cleaning import CleanResult, accounting, clean  # noqa: E402
from preprocess.records import DEFAULT_MAX_RECORD_CHARS, STAGES  # noqa: E402
from preprocess.sources import iter_items, parse_input_args  # noqa: E402

__all__ = ["CleanError", "CleanOptions", "CleanResult", "Preparer", "clean", "iter_items", "main", "parse_args",
           "parse_input_args", "summary_lines", "text_of"]


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
