"""Turn a chunk of raw items into token ids and per-token loss weights (runs in worker processes).

Rendering per stage (every piece of content is literal text: see core/chat_template.py):
- pretrain: ``text`` then the ``<|endoftext|>`` id, every token weight 1; ``parse_special`` encodes
  added-token strings inside the text as their ids (corpora that embed ChatML on purpose);
- sft / reason: ChatML in the tokenizer's chat family (preprocess.augment.chat_documents), weight 1 on
  assistant content and its closing ``<|im_end|>``, 0 elsewhere; reason additionally gives ``tag_weight``
  to the reasoning tags that are structure (inside supervised assistant content);
- dpo: two documents per record, chosen then rejected, weight 1 only on the final assistant turn.

A *unit* is what packing must keep whole: one document, or a DPO (chosen, rejected) pair. Units longer
than ``seq_len`` are truncated (``overlong="truncate"``, the default) or dropped (``"drop"``), counted
either way (:func:`fit_unit` states the rules). A unit never survives truncation without a supervised
token: it is dropped and counted instead. Every item gets exactly one outcome (OK, TRUNCATED,
``dropped:<reason>`` or ``bad:<reason>``), so a run can account for each record it read. Pieces are
tokenized by core.tokenizer.encode_documents (``encode_batch`` over all pieces of the chunk), so a
prompt is tokenized exactly as inference tokenizes it and the weights follow piece boundaries with no
offset arithmetic. Per item, ``literal_specials`` says whether its literal text contained added-token
strings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from core.chat_template import CONTROL, ENDOFTEXT, PARSED, TEXT, Piece
from core.tokenizer import Encoded, TextRefused, TokenizerInfo, encode_documents
from preprocess.augment import Augment, chat_documents
from preprocess.records import DEFAULT_MAX_RECORD_CHARS, Pair, RecordError, parse_record
from preprocess.sources import Item

PACKED_STAGES = ("sft", "reason", "dpo")
OK, TRUNCATED = "ok", "truncated"
DROPPED_OVERLONG, DROPPED_NO_LOSS = "dropped:overlong", "dropped:no_supervised_left"
DROPPED_HELD_OUT, DROPPED_NOT_HELD_OUT = "dropped:held_out", "dropped:not_held_out"  # --hold-out-every


@dataclass(frozen=True)
class EncodeOptions:
    stage: str
    seq_len: int
    overlong: str = "truncate"  # or "drop"
    tag_weight: int = 10
    max_record_chars: int = DEFAULT_MAX_RECORD_CHARS
    parse_special: bool = False  # pretrain: added-token strings in the text become their ids
    augment: Augment = Augment()  # sft / reason / dpo: MiniMind's seeded augmentations (off by default)
    hold_out_every: int = 0  # records on line k * N are the held-out slice (0: none)
    held_out_only: bool = False  # keep only the held-out slice instead of everything but it


@dataclass
class EncodedChunk:
    """The kept units of a chunk, concatenated, plus one outcome per input item (in order)."""

    tokens: np.ndarray  # uint32
    weights: np.ndarray  # uint8
    doc_lens: np.ndarray  # int64, one per kept document
    unit_docs: list[int] = field(default_factory=list)  # per item: documents it contributed (0, 1 or 2)
    outcomes: list[str] = field(default_factory=list)  # per item: OK, TRUNCATED, DROPPED or "bad:<reason>"
    errors: list[RecordError | None] = field(default_factory=list)  # per item: why it is bad (located), or None
    literal_specials: list[bool] = field(default_factory=list)  # per item: added-token strings kept as text


def _documents(record: str | list[dict] | Pair, opts: EncodeOptions, tok: TokenizerInfo,
               item: Item) -> list[list[Piece]]:
    if opts.stage == "pretrain":
        return [[Piece(record, PARSED if opts.parse_special else TEXT, True), Piece(ENDOFTEXT, CONTROL, True)]]
    return chat_documents(tok, record, opts.stage, opts.augment.choose(item.source, item.line))


def _literal_specials(docs_of_item: list[list[list[Piece]]], tok: TokenizerInfo) -> list[bool]:
    """Per item: whether its literal (TEXT) pieces contain added-token strings; one search when none do."""
    def text_of(docs: list[list[Piece]]) -> str:
        return "\0".join(p.text for doc in docs for p in doc if p.kind == TEXT)
    if not tok.has_added_strings("\0".join(map(text_of, docs_of_item))):
        return [False] * len(docs_of_item)
    return [tok.has_added_strings(text_of(docs)) for docs in docs_of_item]


def fit_unit(doc_weights: list[np.ndarray], seq_len: int, overlong: str) -> tuple[str, list[tuple[int, int]]]:
    """The outcome of a unit (its documents' per-token weights) in rows of ``seq_len``, and the kept
    ``(start, stop)`` token range of each document (none when dropped).

    - fits: kept whole (OK); ``overlong="drop"``: dropped (DROPPED_OVERLONG);
    - one document, truncate: its first ``seq_len`` tokens, if a supervised target is among them
      (a token at position >= 1 with weight > 0), else DROPPED_NO_LOSS;
    - a DPO pair, truncate: the shared prompt is cut from the left (the same number of prompt tokens kept
      on both sides) so that both final answers stay whole; if they do not fit with at least one prompt
      token each, the pair is DROPPED_OVERLONG. A kept pair therefore always has both answers complete.
    """
    lens = [len(w) for w in doc_weights]
    if sum(lens) <= seq_len:
        return OK, [(0, n) for n in lens]
    if overlong == "drop":
        return DROPPED_OVERLONG, []
    if len(doc_weights) == 1:
        return (TRUNCATED, [(0, seq_len)]) if doc_weights[0][1:seq_len].any() else (DROPPED_NO_LOSS, [])
    prompts = [int(np.argmax(w > 0)) for w in doc_weights]  # tokens before the first supervised one
    answers = sum(n - p for n, p in zip(lens, prompts, strict=True))
    keep = min(min(prompts), (seq_len - answers) // len(lens))
    if keep < 1:
        return DROPPED_OVERLONG, []
    return TRUNCATED, [(p - keep, n) for n, p in zip(lens, prompts, strict=True)]


def _encode(items: list[Item], docs_of_item: list[list[list[Piece]]], chunk: EncodedChunk, tok: TokenizerInfo,
            tag_weight: int) -> Encoded:
    """Encode every item's documents in one call; an item whose text the tokenizer refuses becomes
    ``bad:tokenizer_refused`` (its documents removed) and the rest is encoded again (the rare path)."""
    while True:
        flat = [(i, doc) for i, docs in enumerate(docs_of_item) for doc in docs]
        try:
            return encode_documents(tok, [doc for _, doc in flat], tag_weight)
        except TextRefused as e:
            i = flat[e.doc][0]
            reason = str(e).split(": ", 1)[-1]
            error = RecordError("tokenizer_refused", f"the tokenizer refuses this record: {reason}")
            docs_of_item[i] = []
            chunk.outcomes[i], chunk.errors[i] = f"bad:{error.reason}", error.at(items[i])


def encode_items(items: list[Item], opts: EncodeOptions, tok: TokenizerInfo) -> EncodedChunk:
    chunk = EncodedChunk(np.zeros(0, np.uint32), np.zeros(0, np.uint8), np.zeros(0, np.int64))
    docs_of_item: list[list[list[Piece]]] = []
    for item in items:
        if opts.hold_out_every and (item.line % opts.hold_out_every == 0) != opts.held_out_only:
            docs_of_item.append([])  # the other side of the held-out split: counted, never parsed
            chunk.outcomes.append(DROPPED_NOT_HELD_OUT if opts.held_out_only else DROPPED_HELD_OUT)
            chunk.errors.append(None)
            continue
        try:
            docs_of_item.append(_documents(parse_record(item, opts.stage, opts.max_record_chars), opts, tok, item))
            chunk.outcomes.append(OK)
            chunk.errors.append(None)
        except RecordError as e:
            docs_of_item.append([])
            chunk.outcomes.append(f"bad:{e.reason}")
            chunk.errors.append(e.at(item))
    tag_weight = opts.tag_weight if opts.stage == "reason" else 1
    encoded = _encode(items, docs_of_item, chunk, tok, tag_weight)
    chunk.literal_specials = _literal_specials(docs_of_item, tok)
    chunk.tokens, chunk.weights, chunk.doc_lens = encoded.ids, encoded.weights, encoded.doc_lens
    chunk.unit_docs = [len(docs) for docs in docs_of_item]
    if opts.stage in PACKED_STAGES:  # pretrain keeps every document whole (shards.py cuts its windows)
        _fit_overlong(chunk, opts)
    return chunk


def _fit_overlong(chunk: EncodedChunk, opts: EncodeOptions) -> None:
    """Apply :func:`fit_unit` to the chunk's units longer than ``seq_len``, in place: their outcome, kept
    tokens and document lengths. It keeps every other unit whole (OK, already set), so those are not visited."""
    doc_start = np.concatenate([[0], np.cumsum(chunk.unit_docs, dtype=np.int64)])  # per item: its first document
    tok_start = np.concatenate([[0], np.cumsum(chunk.doc_lens)])  # per document: its first token
    over = np.flatnonzero(tok_start[doc_start[1:]] - tok_start[doc_start[:-1]] > opts.seq_len)
    if not over.size:
        return
    keep = np.ones(len(chunk.tokens), dtype=bool)
    kept_lens = chunk.doc_lens.tolist()
    for i in over[::-1]:  # last item first: replacing its documents' lengths leaves earlier indices valid
        first, last = int(doc_start[i]), int(doc_start[i + 1])
        starts, ends = tok_start[first:last], tok_start[first + 1:last + 1]
        outcome, ranges = fit_unit([chunk.weights[s:e] for s, e in zip(starts, ends, strict=True)],
                                   opts.seq_len, opts.overlong)
        chunk.outcomes[i], chunk.unit_docs[i] = outcome, len(ranges)
        keep[starts[0]:ends[-1]] = False
        for s, (lo, hi) in zip(starts, ranges, strict=False):
            keep[s + lo:s + hi] = True
        kept_lens[first:last] = [hi - lo for lo, hi in ranges]
    chunk.tokens, chunk.weights = chunk.tokens[keep], chunk.weights[keep]
    chunk.doc_lens = np.array(kept_lens, dtype=np.int64)


# Worker-process plumbing: each worker keeps the tokenizer it was started with.
_WORKER: dict = {}


def init_worker(tok: TokenizerInfo, opts: EncodeOptions, single_threaded: bool) -> None:
    """Set up a worker process with the main process's loaded (and checked) tokenizer: a forked worker
    inherits it at no cost, a spawned one receives it pickled; either way it is not loaded again."""
    if single_threaded:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tok"] = tok
    _WORKER["opts"] = opts


def encode_in_worker(items: list[Item]) -> EncodedChunk:
    return encode_items(items, _WORKER["opts"], _WORKER["tok"])
