"""Turn a chunk of raw items into token ids and per-token loss weights (runs in worker processes).

Rendering per stage:
- pretrain: ``text`` then ``<|endoftext|>``, every token weight 1;
- sft / reason: ChatML (chat_template.render_segments), weight 1 on assistant content and its closing
  ``<|im_end|>``, 0 elsewhere; reason additionally gives ``tag_weight`` to the four tag tokens
  inside supervised spans;
- dpo: two documents per record, chosen then rejected, weight 1 only on the final assistant turn.

A *unit* is what packing must keep whole: one document, or a DPO (chosen, rejected) pair. Units longer
than ``seq_len`` are truncated (``overlong="truncate"``, the default) or dropped (``"drop"``), counted
either way (:func:`fit_unit` states the rules). A unit never survives truncation without a supervised
token: it is dropped and counted instead. Every item gets exactly one outcome (OK, TRUNCATED,
``dropped:<reason>`` or ``bad:<reason>``), so a run can account for each record it read. Each segment is tokenized
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
from preprocess.records import DEFAULT_MAX_RECORD_CHARS, Pair, RecordError, parse_record
from preprocess.sources import Item

PACKED_STAGES = ("sft", "reason", "dpo")
OK, TRUNCATED = "ok", "truncated"
DROPPED_OVERLONG, DROPPED_NO_LOSS = "dropped:overlong", "dropped:no_supervised_left"


@dataclass(frozen=True)
class EncodeOptions:
    stage: str
    seq_len: int
    overlong: str = "truncate"  # or "drop"
    tag_weight: int = 10
    max_record_chars: int = DEFAULT_MAX_RECORD_CHARS


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


def _encode_segments(texts: list[str], tok: TokenizerInfo) -> list[list[int]]:
    """Token ids of each segment text (one batch call)."""
    return [e.ids for e in tok.tokenizer.encode_batch(texts, add_special_tokens=False)]


def _refuse_unencodable(items: list[Item], docs_of_item: list[list[list[tuple[str, bool]]]], chunk: EncodedChunk,
                        tok: TokenizerInfo) -> None:
    """Encode record by record; a record the tokenizer refuses becomes ``bad:tokenizer_refused``."""
    for i, docs in enumerate(docs_of_item):
        if not docs:
            continue
        try:
            _encode_segments([text for doc in docs for text, _ in doc], tok)
        except Exception as e:  # noqa: BLE001
            error = RecordError("tokenizer_refused", f"the tokenizer refuses this record ({type(e).__name__}: {e})")
            docs_of_item[i] = []
            chunk.outcomes[i], chunk.messages[i] = f"bad:{error.reason}", error.describe(items[i])


def encode_items(items: list[Item], opts: EncodeOptions, tok: TokenizerInfo) -> EncodedChunk:
    chunk = EncodedChunk(np.zeros(0, np.uint32), np.zeros(0, np.uint8), np.zeros(0, np.int64))
    docs_of_item: list[list[list[tuple[str, bool]]]] = []
    for item in items:
        try:
            docs_of_item.append(_documents(parse_record(item, opts.stage, opts.max_record_chars), opts.stage))
            chunk.outcomes.append(OK)
            chunk.messages.append(None)
        except RecordError as e:
            docs_of_item.append([])
            chunk.outcomes.append(f"bad:{e.reason}")
            chunk.messages.append(e.describe(item))
    segments = [seg for docs in docs_of_item for doc in docs for seg in doc]
    try:
        id_lists = _encode_segments([text for text, _ in segments], tok)
    except Exception:  # noqa: BLE001  (the tokenizer refuses some record: find it, make it a bad record)
        _refuse_unencodable(items, docs_of_item, chunk, tok)
        segments = [seg for docs in docs_of_item for doc in docs for seg in doc]
        id_lists = _encode_segments([text for text, _ in segments], tok)
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

    keep = np.zeros(len(ids), dtype=bool)
    kept_lens: list[int] = []
    doc_pos = tok_pos = 0
    for i, n_docs in enumerate(docs_per_item):
        lens = doc_lens[doc_pos:doc_pos + n_docs].tolist()
        doc_pos += n_docs
        starts = np.cumsum([tok_pos] + lens[:-1]).tolist() if lens else []
        tok_pos += sum(lens)
        if not n_docs:
            chunk.unit_docs.append(0)
            continue
        outcome, ranges = fit_unit([weights[s:s + n] for s, n in zip(starts, lens, strict=True)],
                                   opts.seq_len, opts.overlong)
        chunk.outcomes[i] = outcome
        for s, (lo, hi) in zip(starts, ranges, strict=False):
            keep[s + lo:s + hi] = True
            kept_lens.append(hi - lo)
        chunk.unit_docs.append(len(ranges))
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
