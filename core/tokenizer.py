"""Locate, load and fingerprint a tokenizer directory (``tokenizer.json`` [+ ``tokenizer_config.json``]),
and encode rendered documents (:func:`encode_documents`, :func:`encode_chat`, :func:`prompt_ids`).

The fingerprint is the sha256 of ``tokenizer.json``'s bytes: shards and checkpoints record it, and
anything that mixes a dataset or model with a different tokenizer is refused by name.

Chat format: the directory's chat template chooses the family that renders every chat encoded with this
tokenizer (``TokenizerInfo.chat``, see ``core.chat_families``): tinylm's when there is none, the family a
known template matches, or the family declared by the caller (``--chat-template``). A template of no known
family is refused where a chat is rendered (:meth:`TokenizerInfo.require_chat`); pretraining never needs one.

Literal encoding: ``TokenizerInfo.literal`` is a second ``tokenizers.Tokenizer``: the same
``tokenizer.json`` without its ``added_tokens``, so the added-vocabulary pre-split never runs and
no added token, special or not, can match inside content. (``Tokenizer.encode_special_tokens = True``
is not enough: in tokenizers 0.23 it covers only tokens marked ``special``, and ``<think>`` is a
non-special added token here and in other tokenizers.) On text without added-token strings both
tokenizers give the same ids (the added tokens only split the text before the model runs); loading
checks that the literal encoding of every added-token string yields no added id, so a control id can
only come from the template. A file's truncation and padding settings (for batching in transformers) are
switched off in both: tinylm cuts and pads nothing per piece, it fits whole documents to rows.
"""

from __future__ import annotations

import hashlib
import re
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from core.chat_families import TINYLM, ChatFamily, ChatTemplateChoice, choose_family
from core.chat_template import (
    CONTROL,
    ENDOFTEXT,
    IM_END,
    IM_START,
    PARSED,
    REASONING_TAGS,
    STOP_TOKENS,
    STRUCTURE_TAGS,
    TEMPLATE_TEXTS,
    TEXT,
    Piece,
    render_pieces,
)
from core.errors import TinyLMError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO_ROOT / "data" / "tokenizer"
REQUIRED_SPECIALS = (ENDOFTEXT,)  # every tokenizer: the document separator of pretraining
CHAT_SPECIALS = (IM_START, IM_END)  # only where a chat is rendered (chat stages, prompts)


class TokenizerError(TinyLMError):
    pass


class TextRefused(TokenizerError):
    """Text the tokenizer cannot encode (e.g. a lone UTF-16 surrogate); ``doc`` is the document's index
    in the :func:`encode_documents` call, so a caller can name the record or answer 400."""

    def __init__(self, message: str, doc: int = 0) -> None:  # doc has a default: pickling passes args only
        super().__init__(message)
        self.doc = doc


@dataclass(frozen=True)
class TokenizerInfo:
    path: Path  # the tokenizer.json file
    tokenizer: Tokenizer
    fingerprint: str
    vocab_size: int
    special_ids: dict[str, int]  # every chat / structure (reasoning, tool) token that is a single id
    literal: Tokenizer  # the same tokenizer without its added tokens: content is always encoded by it
    added_pattern: re.Pattern  # matches any added-token string (special or not) in a text
    known_pieces: dict[Piece, list[int]]  # the template's constant pieces (control tokens, "\\n", ...) -> ids
    chat: ChatTemplateChoice = ChatTemplateChoice(TINYLM)  # the family that renders chats, and why

    @property
    def chat_family(self) -> ChatFamily:
        """The family chats are rendered with (refused in one line when the template is of no known family)."""
        self.require_chat("a conversation")
        assert self.chat.family is not None
        return self.chat.family

    @property
    def has_reasoning_tags(self) -> bool:
        return all(tag in self.special_ids for tag in REASONING_TAGS)

    @property
    def structural_tags(self) -> tuple[str, ...]:
        """The structure tags (reasoning, tool call / response) that are single ids: CONTROL where the
        template puts them (``render_pieces(tags=...)``)."""
        return tuple(tag for tag in STRUCTURE_TAGS if tag in self.special_ids)

    @property
    def missing_tags(self) -> tuple[str, ...]:
        """The structure tags that are not single ids here: the template renders them as text."""
        return tuple(tag for tag in STRUCTURE_TAGS if tag not in self.special_ids)

    def missing_tags_note(self) -> str | None:
        """One line saying which structure tags render as text with this tokenizer (None: none do)."""
        if not self.missing_tags:
            return None
        return (f"{self.path}: {' '.join(self.missing_tags)} not single ids in this tokenizer: rendered and "
                "trained as text")

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end an assistant turn (:data:`STOP_TOKENS` that are single ids), in that order."""
        return [self.special_ids[t] for t in STOP_TOKENS if t in self.special_ids]

    @property
    def has_chat(self) -> bool:
        """Whether ``<|im_start|>`` and ``<|im_end|>`` are single ids, so chats can be rendered."""
        return all(t in self.special_ids for t in CHAT_SPECIALS)

    def require_chat(self, what: str) -> None:
        """Refuse, in one line, to render chats for ``what`` with a tokenizer that lacks the ChatML tokens or
        whose chat template is of no known family (and none was declared)."""
        if not self.has_chat:
            missing = ", ".join(t for t in CHAT_SPECIALS if t not in self.special_ids)
            raise TokenizerError(f"{missing} not single ids in this tokenizer, so it cannot render chats ({what}); "
                                 "pretraining on it works", path=self.path)
        if self.chat.family is None:
            raise TokenizerError(f"{self.chat.problem} ({what})")

    def has_added_strings(self, text: str) -> bool:
        """Whether ``text`` contains an added-token string (which literal encoding keeps as text)."""
        return self.added_pattern.search(text) is not None


def tokenizer_file(path: str | Path) -> Path:
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"{file}: no tokenizer here (expected a directory with tokenizer.json)")
    return file


def file_fingerprint(file: str | Path) -> str | None:
    """The fingerprint of a tokenizer file (sha256 of its bytes), None when there is no such file."""
    file = Path(file)
    return hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else None


def load_tokenizer(path: str | Path = DEFAULT_TOKENIZER, chat_template: str | None = None) -> TokenizerInfo:
    """Load a tokenizer and check that ``<|endoftext|>`` is a single id; whether the ChatML tokens are is
    :attr:`TokenizerInfo.has_chat` (checked by :meth:`TokenizerInfo.require_chat` where a chat is rendered).
    ``chat_template``: the declared family (``--chat-template``), else the directory's template decides."""
    file = tokenizer_file(path)
    chat = _choose(file, chat_template)
    data = file.read_bytes()
    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # the tokenizers library raises plain Exceptions on bad files
        raise TokenizerError(f"{file}: not a valid tokenizers file ({e})") from None
    tokenizer.no_truncation()  # a file's truncation / padding (set for batching in transformers) would cut or
    tokenizer.no_padding()  # pad every piece tinylm encodes: tinylm fits documents to rows itself
    specials = {}
    for token in (*REQUIRED_SPECIALS, *CHAT_SPECIALS, *STRUCTURE_TAGS):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None and tokenizer.encode(token, add_special_tokens=False).ids == [token_id]:
            specials[token] = token_id
    missing = [t for t in REQUIRED_SPECIALS if t not in specials]
    if missing:
        raise TokenizerError(f"{file}: special token(s) {', '.join(missing)} are not single ids in this tokenizer")
    literal, pattern = _literal_tokenizer(file, tokenizer)
    known = {Piece(text, kind, flag): ids for flag in (False, True)
             for text, kind, ids in [*((t, CONTROL, [i]) for t, i in specials.items()),
                                     *((t, TEXT, literal.encode(t, add_special_tokens=False).ids)
                                       for t in TEMPLATE_TEXTS)]}
    return TokenizerInfo(file, tokenizer, hashlib.sha256(data).hexdigest(),
                         tokenizer.get_vocab_size(with_added_tokens=True), specials, literal, pattern, known, chat)


def declare_chat_template(tok: TokenizerInfo, family: str | None) -> TokenizerInfo:
    """``tok`` rendering chats as the declared ``family`` (``--chat-template``); ``tok`` itself when None."""
    if family is None:
        return tok
    return replace(tok, chat=_choose(tok.path, family))


def _choose(file: Path, declared: str | None) -> ChatTemplateChoice:
    try:
        return choose_family(file.parent, declared)
    except ValueError as e:
        raise TokenizerError(str(e), path=file) from None


def _literal_tokenizer(file: Path, tokenizer: Tokenizer) -> tuple[Tokenizer, re.Pattern]:
    """The tokenizer without added tokens, and a pattern of the added-token strings; checked (see above).

    It is assembled from ``tokenizer``'s own model, normalizer, pre-tokenizer, post-processor and decoder
    (shared, not copied), so the file is not parsed a second time; serialized, it is exactly the file with
    ``added_tokens`` emptied and no truncation or padding (tests/test_tokenizer.py)."""
    added = {token.content: i for i, token in tokenizer.get_added_tokens_decoder().items()}
    literal = Tokenizer(tokenizer.model)
    literal.normalizer, literal.pre_tokenizer = tokenizer.normalizer, tokenizer.pre_tokenizer
    literal.post_processor, literal.decoder = tokenizer.post_processor, tokenizer.decoder
    for content in added:
        leaked = set(literal.encode(content, add_special_tokens=False).ids) & set(added.values())
        if leaked:
            raise TokenizerError(f"{file}: the text {content!r} encodes to added-token id(s) {sorted(leaked)} even "
                                 "without its added tokens, so content could not be kept apart from control tokens")
    longest_first = sorted(added, key=len, reverse=True)
    pattern = re.compile("|".join(map(re.escape, longest_first))) if added else re.compile(r"(?!)")
    return literal, pattern


@dataclass(frozen=True)
class Encoded:
    """Token ids and per-token loss weights of one or more documents, concatenated."""

    ids: np.ndarray  # uint32
    weights: np.ndarray  # uint8
    doc_lens: np.ndarray  # int64, tokens per document


def encode_documents(tok: TokenizerInfo, docs: Sequence[Sequence[Piece]], tag_weight: int = 1) -> Encoded:
    """Encode documents of pieces: TEXT with ``tok.literal``, PARSED with the full tokenizer (one
    ``encode_batch`` call each over all such pieces of all documents), CONTROL as its single id; the
    template's constant pieces (control tokens, ``"\\n"``, ``"assistant\\n"``) come from
    ``tok.known_pieces`` without tokenizing.

    ``encode_batch_fast`` gives the ids of ``encode_batch`` without computing character offsets (unused
    here). One pass over the pieces sorts them into known ones and the indices to encode per kind; each
    piece's ids are then appended in piece order to one C ``array`` (``fromlist``: no per-token Python work
    but the ids lists the tokenizer returns). Weights: 0 on unsupervised pieces, 1 on supervised ones,
    ``tag_weight`` on supervised CONTROL reasoning tags (only structural tags).
    """
    pieces = [p for doc in docs for p in doc]
    ids_of, to_encode = _known_ids(tok, pieces)
    for kind, encoder in ((TEXT, tok.literal), (PARSED, tok.tokenizer)):
        where = to_encode[kind]
        if where:
            texts = [pieces[i].text for i in where]
            try:
                encoded = encoder.encode_batch_fast(texts, add_special_tokens=False)  # ids without offsets
            except Exception:  # tokenizers raises TypeError / plain Exception on text it refuses
                raise _refused(encoder, docs, np.array(where), texts) from None
            for i, e in zip(where, encoded, strict=True):
                ids_of[i] = e.ids
    flat = array(_U32)
    for piece_ids in ids_of:
        flat.fromlist(piece_ids)
    ids = np.frombuffer(flat, dtype=np.uint32)
    lens = np.fromiter(map(len, ids_of), dtype=np.int64, count=len(ids_of))
    weights = np.repeat(np.fromiter((p.supervised for p in pieces), dtype=np.uint8, count=len(pieces)), lens)
    if tag_weight != 1:
        is_tag = np.repeat(np.array([p.kind == CONTROL and p.text in REASONING_TAGS for p in pieces], dtype=bool),
                           lens)
        weights[(weights > 0) & is_tag] = tag_weight
    ends = np.cumsum(np.fromiter(map(len, docs), dtype=np.int64, count=len(docs)))  # piece index per doc end
    doc_lens = np.diff(np.concatenate([[0], np.cumsum(lens)])[ends], prepend=0)
    return Encoded(ids, weights, doc_lens)


def _known_ids(tok: TokenizerInfo, pieces: list[Piece]) -> tuple[list, dict[str, list[int]]]:
    """(per piece: its ids when ``tok.known_pieces`` has them, else None; the indices of the other
    pieces by kind, TEXT and PARSED). A CONTROL piece that is not a single id is a caller bug (ValueError):
    ``render_pieces(tags=tok.structural_tags)`` never makes one."""
    get = tok.known_pieces.get
    ids_of = [get(p) for p in pieces]
    to_encode: dict[str, list[int]] = {TEXT: [], PARSED: [], CONTROL: []}
    for i, ids in enumerate(ids_of):
        if ids is None:
            to_encode[pieces[i].kind].append(i)
    if to_encode[CONTROL]:
        unknown = sorted({pieces[i].text for i in to_encode[CONTROL]})
        raise ValueError(f"{tok.path}: {unknown} are not single-id control tokens of this tokenizer")
    return ids_of, to_encode


def _refused(encoder: Tokenizer, docs: Sequence[Sequence[Piece]], where: np.ndarray, texts: list[str]) -> TextRefused:
    """The error for the first piece that cannot be encoded, found by encoding each (the rare, slow path)."""
    for i, text in zip(where, texts, strict=True):
        try:
            encoder.encode(text, add_special_tokens=False)
            continue
        except Exception as e:  # whatever the library raises, it is this text's fault
            surrogate = next((c for c in text if "\ud800" <= c <= "\udfff"), None)
            reason = f"a lone UTF-16 surrogate {surrogate!r}" if surrogate else (str(e).splitlines() or ["?"])[0]
        doc = int(np.searchsorted(np.cumsum([len(d) for d in docs]), i, side="right"))
        return TextRefused(f"document {doc}: text the tokenizer cannot encode ({reason})", doc)
    raise AssertionError("encode_batch failed but every piece encodes alone")


_U32 = "I" if array("I").itemsize == 4 else "L"  # the array typecode of a 32-bit unsigned int


_NOTED: set[Path] = set()  # tokenizers whose missing_tags_note this process has printed


def note_missing_tags(tok: TokenizerInfo) -> None:
    """Print ``warning: <missing_tags_note>`` on stderr once per process and tokenizer (chat, serve, eval);
    pack says it once in its own warnings instead."""
    note = tok.missing_tags_note()
    if note is not None and tok.path not in _NOTED:
        _NOTED.add(tok.path)
        print(f"warning: {note}", file=sys.stderr)


def chat_pieces(tok: TokenizerInfo, turns: list[dict], supervise: str = "all", add_generation_prompt: bool = False,
                tools: list | None = None, enable_thinking: bool | None = None,
                drop_empty_think: bool = False) -> list[Piece]:
    """One conversation rendered by the tokenizer's chat family, with its structure tags (pack, encode_chat)."""
    return render_pieces(turns, add_generation_prompt, supervise, tok.structural_tags, tools, enable_thinking,
                         tok.chat.family or tok.chat_family, drop_empty_think)


def encode_chat(tok: TokenizerInfo, turns: list[dict], add_generation_prompt: bool = False,
                supervise: str = "all", tag_weight: int = 1, tools: list | None = None,
                enable_thinking: bool | None = None) -> Encoded:
    """One conversation through the tokenizer's chat family and :func:`encode_documents`."""
    tok.require_chat("a conversation")
    note_missing_tags(tok)
    pieces = chat_pieces(tok, turns, supervise, add_generation_prompt, tools, enable_thinking)
    return encode_documents(tok, [pieces], tag_weight)


def prompt_ids(tok: TokenizerInfo, turns: list[dict], tools: list | None = None,
               enable_thinking: bool | None = None) -> list[int]:
    """The ids of a generation prompt: ``turns`` then ``<|im_start|>assistant\\n`` and the family's text for
    the thinking switch ``enable_thinking`` (MiniMind-3 calls it ``open_thinking``) (serve, chat, eval)."""
    return encode_chat(tok, turns, add_generation_prompt=True, supervise="none", tools=tools,
                       enable_thinking=enable_thinking).ids.tolist()
