#!/usr/bin/env python3
"""What checking a packed dataset costs when training opens it (a table; not a test).

Builds a synthetic dataset (random token ids, ~1,000-token documents, 10M-token shards) with
``preprocess/shards.write_shard`` in a temporary folder, then times ``PackedDataset`` opening it
three ways, each the best of ``--repeat`` runs with the files in the page cache:

- structure only: meta.json's fields, file sizes, headers, counts, offsets, row lengths, and the largest
  token id from the shard record (``max_token``) — what ``train/run.py --no-verify`` does;
- structure + a vectorised ``max`` over every token (an old dataset without ``max_token``);
- full verification: also the sha256 of every file (the default of ``train/run.py``).

    python bench/bench_verify.py                      # 100M tokens (~300 MB on disk)
    python bench/bench_verify.py --tokens 10_000_000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.files import atomic_write_json  # noqa: E402
from core.tokenizer import DEFAULT_TOKENIZER, load_tokenizer  # noqa: E402
from preprocess import shards  # noqa: E402


def build_dataset(folder: Path, n_tokens: int, stage: str = "pretrain", seq_len: int = 512,
                  shard_tokens: int = 10_000_000, doc_len: int = 1000, seed: int = 0,
                  tokenizer: Path | None = None) -> dict:
    """Write a synthetic packed dataset of ``n_tokens`` random ids (< the tokenizer's vocab size) into
    ``folder`` and return its meta.json. ``stage`` "pretrain": documents of ``doc_len`` tokens; any other
    stage: packed rows of two documents of ``seq_len // 2`` tokens each, loss weight 1 on their second half."""
    tok = load_tokenizer(tokenizer or DEFAULT_TOKENIZER)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    packed = stage != "pretrain"
    doc = seq_len // 2 if packed else doc_len
    if packed:  # whole rows of two documents only (a dpo row holds whole pairs)
        n_tokens -= n_tokens % (2 * doc)
        shard_tokens = max(2 * doc, shard_tokens - shard_tokens % (2 * doc))
    records, done, index = [], 0, 0
    while done < n_tokens:
        n = min(shard_tokens, n_tokens - done)
        tokens = rng.integers(0, tok.vocab_size, n, dtype=np.uint16)
        weights = np.zeros(n, dtype=np.uint8)
        offsets = np.unique(np.concatenate([np.arange(0, n, doc), [n]])).astype(np.int64)
        for lo in offsets[:-1]:
            weights[lo + doc // 2: lo + doc] = 1
        n_docs = len(offsets) - 1
        row_docs = np.arange(0, n_docs + 1, 2, dtype=np.int64) if packed else np.zeros(1, dtype=np.int64)
        if packed and row_docs[-1] != n_docs:
            row_docs = np.append(row_docs, n_docs)
        shard = shards.ShardArrays(tokens, weights, offsets, row_docs)
        records.append(shards.write_shard(folder, index, shard, "uint16", {}))
        done, index = done + n, index + 1
    meta = {"format_version": shards.VERSION, "stage": stage, "seq_len": seq_len, "token_dtype": "uint16",
            "plan_fingerprint": f"synthetic-{seed}",
            "tokenizer": {"path": str(tok.path), "vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint,
                          "special_ids": tok.special_ids},
            "counts": {"tokens": done, "documents": sum(r["documents"] for r in records)},
            "sources": [], "shards": records}
    atomic_write_json(folder / "meta.json", meta)
    return meta


def best_of(repeat: int, fn) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=lambda s: int(s.replace("_", "")), default=100_000_000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()

    from train.data import PackedDataset

    with tempfile.TemporaryDirectory(prefix="tinylm-bench-verify-") as tmp:
        folder = Path(tmp) / "data"
        start = time.perf_counter()
        meta = build_dataset(folder, args.tokens)
        size = sum(f["bytes"] for s in meta["shards"] for f in s["files"].values())
        print(f"built {args.tokens:,} tokens in {len(meta['shards'])} shards ({size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - start:.1f} s\n")
        structure = best_of(args.repeat, lambda: PackedDataset(folder, verify=False))
        full = best_of(args.repeat, lambda: PackedDataset(folder, verify=True))
        for record in meta["shards"]:
            del record["max_token"]
        atomic_write_json(folder / "meta.json", meta)
        scanned = best_of(args.repeat, lambda: PackedDataset(folder, verify=False))
        title = f"open a {args.tokens / 1e6:.0f}M-token dataset ({size / 1e6:.0f} MB)"
        print(f"| {title:<46} | seconds | MB/s    |")
        print("| ---------------------------------------------- | ------- | ------- |")
        for name, seconds in (("structure + cached max_token (--no-verify)", structure),
                              ("structure + max over every token id", scanned),
                              ("full: + sha256 of every file (default)", full)):
            print(f"| {name:<46} | {seconds:7.3f} | {size / 1e6 / seconds:7.0f} |")


if __name__ == "__main__":
    main()
