"""Turn a chunk of raw items into token ids and per-token loss weights (runs in worker processes).

Rendering per stage (every piece of content is literal text: see core/chat_template.py):
- pretrain: ``text`` then the ``<|endoftext|>`` id, every token weight 1; ``parse_special`` encodes
  added-token strings inside the text as their ids (corpora that embed ChatML on purpose);
- sft / reason: ChatML (chat_template.render_pieces), weight 1 on assistant content and its closing
  ``<|im_end|>``, 0 elsewhere; reason additionally gives ``tag_weight`` to the reasoning tags that are
  structure (inside supervised assistant content);
- dpo: two documents per record, chosen then rejected, weight 1 only on the final assistant turn.

A *unit* is what packing must keep whole: one document, or a DPO (chosen, rejected) pair. Units longer
than ``seq_len`` are dropped or truncated (``overlong``) — counted either way. Each segment is tokenized
separately (core.tokenizer.encode_documents: ``encode_batch`` over all pieces of the chunk), so a prompt
is tokenized exactly as inference tokenizes it and the weights follow piece boundaries with no offset
arithmetic. Per item, ``literal_specials`` says whether its literal text contained added-token strings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from core.chat_template import CONTROL, ENDOFTEXT, PARSED, TEXT, Piece, render_pieces
from core.tokenizer import TokenizerInfo, encode_documents, load_tokenizer
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
    parse_special: bool = False  # pretrain: added-token strings in the text become their ids


@dataclass
class EncodedChunk:
    """The kept units of a chunk, concatenated, plus one outcome per input item (in order)."""

    tokens: np.ndarray  # uint32
    weights: np.ndarray  # uint8
    doc_lens: np.ndarray  # int64, one per kept document
    unit_docs: list[int] = field(default_factory=list)  # per item: documents it contributed (0, 1 or 2)
    outcomes: list[str] = field(default_factory=list)  # per item: OK, TRUNCATED, DROPPED or "bad:<reason>"
    messages: list[str | None] = field(default_factory=list)  # per item: the error line of a bad item
    literal_specials: list[bool] = field(default_factory=list)  # per item: added-token strings kept as text


def _documents(record: str | list[dict] | Pair, opts: EncodeOptions, tags: tuple[str, ...]) -> list[list[Piece]]:
    if opts.stage == "pretrain":
        return [[Piece(record, PARSED if opts.parse_special else TEXT, True), Piece(ENDOFTEXT, CONTROL, True)]]
    if opts.stage == "dpo":
        return [render_pieces(record.chosen, supervise="last", tags=tags),
                render_pieces(record.rejected, supervise="last", tags=tags)]
    return [render_pieces(record, supervise="all", tags=tags)]


def _literal_specials(docs_of_item: list[list[list[Piece]]], tok: TokenizerInfo) -> list[bool]:
    """Per item: whether its literal (TEXT) pieces contain added-token strings; one search when none do."""
    def text_of(docs: list[list[Piece]]) -> str:
        return "\0".join(p.text for doc in docs for p in doc if p.kind == TEXT)
    if not tok.has_added_strings("\0".join(map(text_of, docs_of_item))):
        return [False] * len(docs_of_item)
    return [tok.has_added_strings(text_of(docs)) for docs in docs_of_item]


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
    docs_of_item: list[list[list[Piece]]] = []
    tags = tok.structural_tags
    for item in items:
        try:
            docs_of_item.append(_documents(parse_record(item, opts.stage), opts, tags))
            chunk.outcomes.append(OK)
            chunk.messages.append(None)
        except RecordError as e:
            docs_of_item.append([])
            chunk.outcomes.append(f"bad:{e.reason}")
            chunk.messages.append(e.describe(item))
    chunk.literal_specials = _literal_specials(docs_of_item, tok)
    encoded = encode_documents(tok, [doc for docs in docs_of_item for doc in docs],
                               opts.tag_weight if opts.stage == "reason" else 1)
    ids, weights, doc_lens = encoded.ids, encoded.weights, encoded.doc_lens
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
