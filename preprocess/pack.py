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
docs/FORMAT.md. This module is the command line; the driver is ``preprocess/packer.py``, the options and
what a re-run keeps ``preprocess/pack_plan.py``, the accounting and summary ``preprocess/pack_report.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":  # pack.py does no linear algebra: numpy's OpenBLAS would start a thread per core
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from core.errors import run_main  # noqa: E402
from core.numbers import number, positive_int  # noqa: E402
from core.tokenizer import DEFAULT_TOKENIZER, REPO_ROOT  # noqa: E402
from preprocess.options import RecordOptions, add_record_arguments  # noqa: E402
from preprocess.pack_plan import PackError, PackOptions, PackResult  # noqa: E402
from preprocess.pack_report import accounting_line, report  # noqa: E402
from preprocess.packer import pack  # noqa: E402
from preprocess.records import STAGES  # noqa: E402

__all__ = ["PackError", "PackOptions", "PackResult", "accounting_line", "main", "pack", "parse_args", "report"]


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
    p.add_argument("--seq-len", type=number(int, low=8, high=1 << 20), default=512,
                   help="row length in tokens: packed rows for sft/reason/dpo, windows for pretrain (default 512)")
    p.add_argument("--workers", type=positive_int,
                   help="tokenizer processes (default: every usable core; more are capped to them); "
                        "the output does not depend on it")
    add_record_arguments(p)
    p.add_argument("--shard-tokens", type=number(int, low=9, high=1 << 40), default=1 << 24,
                   help="tokens per shard (default 16M)")
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

def main(argv: list[str] | None = None) -> int:
    """``python preprocess/pack.py ...``: arguments -> PackOptions -> pack -> printed report."""
    options = parse_args(argv)
    return run_main("pack.py", lambda: report(pack(options), options.quiet),
                    interrupted="interrupted; re-run the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
