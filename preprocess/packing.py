"""Best-fit packing of whole units (documents or DPO pairs) into rows of ``capacity`` tokens.

Best-fit decreasing: units are taken longest first (ties in input order) and each goes into the open
row whose free space is the smallest that still fits it, or opens a new row. Every row starts on a
unit boundary and no unit is split, so no row mixes a fragment of a conversation with another. The
result depends only on the lengths and their order: deterministic, whatever the worker count.
"""

from __future__ import annotations

import numpy as np

from preprocess.shards import ShardArrays


def best_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Rows as lists of unit indices (placement order). Every length must be in 1..capacity.

    ``has_free[s]`` is 1 while some open row has exactly ``s`` free slots (``free_rows[s]`` lists them), so
    the best row for a unit of ``need`` tokens is the first 1 at or after ``need``: ``bytearray.find``, a
    C scan of at most ``capacity`` bytes per unit."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"unit lengths must lie in 1..{capacity}")
    rows: list[list[int]] = []
    free_rows: list[list[int]] = [[] for _ in range(capacity + 1)]  # free space -> open row ids
    has_free = bytearray(capacity + 1)
    sizes = lengths.tolist()
    for unit in np.argsort(-lengths, kind="stable").tolist():
        need = sizes[unit]
        space = has_free.find(1, need)
        if space >= 0:
            row = free_rows[space].pop()
            has_free[space] = 1 if free_rows[space] else 0
        else:
            row, space = len(rows), capacity
            rows.append([])
        rows[row].append(unit)
        left = space - need
        if left > 0:
            free_rows[left].append(row)
            has_free[left] = 1
    return rows


def in_order(array: np.ndarray, starts: np.ndarray, lens: np.ndarray, order: np.ndarray) -> np.ndarray:
    """The segments ``array[starts[u]:starts[u] + lens[u]]`` for ``u`` in ``order``, concatenated: one copy
    of the data and no gather index (for tokens that index is 8 bytes per token, freshly paged in)."""
    if not len(order):
        return array[:0].copy()
    return np.concatenate([array[s:s + n] for s, n in zip(starts[order].tolist(), lens[order].tolist(), strict=True)])


def assemble_shard(tokens: np.ndarray, weights: np.ndarray, doc_lens: np.ndarray, unit_docs: np.ndarray,
                   seq_len: int, packed: bool) -> ShardArrays:
    """Lay the units of one shard out in best-fit rows (``packed``) or in input order (pretrain)."""
    doc_offsets = np.concatenate([[0], np.cumsum(doc_lens)]).astype(np.int64)
    if not packed or doc_lens.size == 0:
        return ShardArrays(tokens, weights, doc_offsets, np.zeros(1, dtype=np.int64))
    unit_first_doc = np.cumsum(unit_docs) - unit_docs
    unit_lens = np.add.reduceat(doc_lens, unit_first_doc)
    unit_starts = np.cumsum(unit_lens) - unit_lens
    rows = best_fit(unit_lens, seq_len)
    order = np.fromiter((u for row in rows for u in row), dtype=np.int64, count=len(unit_lens))
    row_first_unit = np.cumsum([0] + [len(row) for row in rows[:-1]])
    docs_per_row = np.add.reduceat(unit_docs[order], row_first_unit)
    return ShardArrays(
        in_order(tokens, unit_starts, unit_lens, order), in_order(weights, unit_starts, unit_lens, order),
        np.concatenate([[0], np.cumsum(in_order(doc_lens, unit_first_doc, unit_docs, order))]).astype(np.int64),
        np.concatenate([[0], np.cumsum(docs_per_row)]).astype(np.int64),
    )
