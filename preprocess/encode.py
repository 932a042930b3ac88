"""Turn a chunk of raw items into token ids and per-token loss weights (runs in worker processes).

Rendering per stage:
- pretrain: ``text`` then ``<|endoftext|>``, every token weight 1;
- sft / reason: ChatML (chat_template.render_segments), weight 1 on assistant content and its closing
  ``<|im_end|>``, 0 elsewhere; reason additionally gives ``tag_weight`` to the four tag tokens
  inside supervised spans;
- dpo: two documents per record, chosen then rejected, weight 1 only on the final assistant turn.

A *unit* is what packing must keep whole: one document, or a DPO (chosen, rejected) pair. Units longer
than ``seq_len`` are dropped or truncated (``overlong``) — counted either way. Each segment is tokenized
separately (``encode_batch`` over all segments of the chunk), so a prompt is tokenized exactly as
inference tokenizes it and the weights follow segment boundaries with no offset arithmetic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from core.chat_template import ENDOFTEXT, REASONING_TAGS, render_segments
from core.tokenizer import TokenizerInfo, load_tokenizer
from preprocess.records import Pair, RecordError, parse_record
from preprocess.sources import Item

PACKED_STAGES = ("sft", "reason", "dpo")
OK, TRUNCATED, DROPPED = "ok", "truncated", "dropped_overlong"


@dataclass(frozen=True)
class EncodeOptions:
    stage: str
    seq_len: int
    overlong: str = "drop"  # or "truncate"
    tag_weight: int = 10


@dataclass
class EncodedChunk:
    """The kept units of a chunk, concatenated, plus one outcome per input item (in order)."""

    tokens: np.ndarray  # uint32
    weights: np.ndarray  # uint8
    doc_lens: np.ndarray  # int64, one per kept document
    unit_docs: list[int] = field(default_factory=list)  # per item: documents it contributed (0, 1 or 2)
    outcomes: list[str] = field(default_factory=list)  # per item: OK, TRUNCATED, DROPPED or "bad:<reason>"
    messages: list[str | None] = field(default_factory=list)  # per item: the error line of a bad item


def _documents(record: str | list[dict] | Pair, stage: str) -> list[list[tuple[str, bool]]]:
    if stage == "pretrain":
        return [[(record, True), (ENDOFTEXT, True)]]
    if stage == "dpo":
        return [render_segments(record.chosen, "last"), render_segments(record.rejected, "last")]
    return [render_segments(record, "all")]


def _fit(lens: list[int], seq_len: int, overlong: str) -> tuple[str, list[int]]:
    """The outcome and kept lengths of a unit of documents of ``lens`` tokens in rows of ``seq_len``."""
    if sum(lens) <= seq_len:
        return OK, lens
    if overlong == "drop":
        return DROPPED, []
    share = seq_len // len(lens)  # a DPO pair gets half a row each
    return TRUNCATED, [min(n, share) if len(lens) > 1 else seq_len for n in lens]


def encode_items(items: list[Item], opts: EncodeOptions, tok: TokenizerInfo) -> EncodedChunk:
    chunk = EncodedChunk(np.zeros(0, np.uint32), np.zeros(0, np.uint8), np.zeros(0, np.int64))
    docs_of_item: list[list[list[tuple[str, bool]]]] = []
    for item in items:
        try:
            docs_of_item.append(_documents(parse_record(item, opts.stage), opts.stage))
            chunk.outcomes.append(OK)
            chunk.messages.append(None)
        except RecordError as e:
            docs_of_item.append([])
            chunk.outcomes.append(f"bad:{e.reason}")
            chunk.messages.append(e.describe(item))
    segments = [seg for docs in docs_of_item for doc in docs for seg in doc]
    id_lists = [e.ids for e in tok.tokenizer.encode_batch([text for text, _ in segments], add_special_tokens=False)]
    seg_lens = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    ids = np.fromiter(chain.from_iterable(id_lists), dtype=np.uint32, count=int(seg_lens.sum()))
    weights = np.repeat(np.fromiter((w for _, w in segments), dtype=np.uint8, count=len(segments)), seg_lens)
    if opts.stage == "reason" and opts.tag_weight != 1:
        tag_ids = [tok.special_ids[t] for t in REASONING_TAGS]
        weights[(weights > 0) & np.isin(ids, tag_ids)] = opts.tag_weight

    # Token length of every document: segment lengths summed per document (vectorised).
    segs_per_doc = np.fromiter((len(doc) for docs in docs_of_item for doc in docs), dtype=np.int64)
    doc_lens = (np.add.reduceat(seg_lens, np.cumsum(segs_per_doc) - segs_per_doc) if segs_per_doc.size
                else np.zeros(0, np.int64))
    docs_per_item = [len(docs) for docs in docs_of_item]
    if opts.stage not in PACKED_STAGES:  # pretrain: every document kept whole
        chunk.tokens, chunk.weights, chunk.doc_lens = ids, weights, doc_lens
        chunk.unit_docs = docs_per_item
        return chunk

    keep = np.ones(len(ids), dtype=bool)
    kept_lens: list[int] = []
    doc_pos = tok_pos = 0
    for i, n_docs in enumerate(docs_per_item):
        lens = doc_lens[doc_pos:doc_pos + n_docs].tolist()
        doc_pos += n_docs
        outcome, kept = _fit(lens, opts.seq_len, opts.overlong)
        if n_docs:
            chunk.outcomes[i] = outcome
        if outcome == OK:
            tok_pos += sum(lens)
        else:
            for full, k in zip(lens, kept + [0] * (len(lens) - len(kept)), strict=True):
                keep[tok_pos + k: tok_pos + full] = False
                tok_pos += full
        kept_lens.extend(kept)
        chunk.unit_docs.append(len(kept))
    chunk.tokens, chunk.weights = ids[keep], weights[keep]
    chunk.doc_lens = np.array(kept_lens, dtype=np.int64)
    return chunk


# Worker-process plumbing: each worker loads the tokenizer once.
_WORKER: dict = {}


def init_worker(tokenizer_path: str, opts: EncodeOptions, single_threaded: bool) -> None:
    if single_threaded:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tok"] = load_tokenizer(tokenizer_path)
    _WORKER["opts"] = opts


def encode_in_worker(items: list[Item]) -> EncodedChunk:
    return encode_items(items, _WORKER["opts"], _WORKER["tok"])
