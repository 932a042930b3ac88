"""Token log-probabilities for the API: per-token entries and OpenAI's two wire shapes of them.

Contract: a log-probability is ``log_softmax`` of the model's own logits at that position, in float32
(the model's distribution: before repetition penalty, temperature, top-k and top-p, which only shape the
sampling), so the prompt entries of ``echo`` are exactly tinylm's scoring of the same ids. A value below
``FLOOR`` (``-inf`` included, which JSON cannot carry) is reported as ``FLOOR``, as OpenAI does.

:class:`TokenNames` maps ids to their raw bytes (byte-level BPE: the vocabulary string mapped back through
GPT-2's byte alphabet; an added token: its content in UTF-8) and to the token string OpenAI shows: the
bytes as UTF-8 text, or ``"bytes:\\xNN..."`` for a piece of a multi-byte character. :meth:`TokenNames.entry`
builds one :class:`TokenLogprob` (the chosen id's value and the ``k`` most likely alternatives) from a
row of log-probabilities. :func:`chat_logprobs` and :func:`completion_logprobs` shape a list of entries as
chat completions' ``{"content": [...]}`` and legacy completions' ``{tokens, token_logprobs, top_logprobs,
text_offset}`` (whose ``top_logprobs`` also holds the chosen token, as OpenAI's does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders
from torch import Tensor

FLOOR = -9999.0


def gpt2_byte_alphabet() -> dict[str, int]:
    """Character -> byte of byte-level BPE (GPT-2's ``bytes_to_unicode``, inverted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token, its log-probability (None for a prompt's first token), the ``k`` most likely
    alternatives as (token, bytes, logprob), and ``offset``, the characters of text before it."""

    token: str
    data: bytes
    logprob: float | None
    top: tuple[tuple[str, bytes, float], ...]
    offset: int


def _value(x: float) -> float:
    return x if x >= FLOOR else FLOOR


class TokenNames:
    """Raw bytes and display strings of every id of a tokenizer (built once per server)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        alphabet = gpt2_byte_alphabet() if isinstance(tokenizer.decoder, decoders.ByteLevel) else None
        self.data: list[bytes] = []
        for i in range(tokenizer.get_vocab_size(with_added_tokens=True)):
            piece = tokenizer.id_to_token(i)
            if i in added or piece is None:
                raw = (added.get(i) or "").encode("utf-8")
            elif alphabet is not None and all(c in alphabet for c in piece):
                raw = bytes(alphabet[c] for c in piece)
            else:
                raw = tokenizer.decode([i], skip_special_tokens=False).encode("utf-8")
            self.data.append(raw)
        self.names = [self._name(raw) for raw in self.data]

    @staticmethod
    def _name(raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def entry(self, row: Tensor | None, token: int, k: int, offset: int) -> TokenLogprob:
        """The entry of ``token`` given the log-probabilities ``row`` [V] of its position (None: no
        context, the prompt's first token), with the ``k`` most likely alternatives."""
        if row is None:
            return TokenLogprob(self.names[token], self.data[token], None, (), offset)
        top: tuple[tuple[str, bytes, float], ...] = ()
        if k > 0:
            values, ids = torch.topk(row, min(k, row.numel()))
            top = tuple((self.names[i], self.data[i], _value(v))
                        for i, v in zip(ids.tolist(), values.tolist(), strict=True))
        return TokenLogprob(self.names[token], self.data[token], _value(float(row[token])), top, offset)


def log_probs(logits: Tensor) -> Tensor:
    """log_softmax over the last dimension in float32 (the scoring every entry uses)."""
    return torch.log_softmax(logits.float(), dim=-1)


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    """Chat completions' ``choices[i].logprobs``."""
    return {"content": [{"token": e.token, "logprob": e.logprob if e.logprob is not None else FLOOR,
                         "bytes": list(e.data),
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(b)} for t, b, v in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], shift: int = 0) -> dict:
    """Legacy completions' ``choices[i].logprobs``; ``shift`` is added to every text offset."""
    tops: list[dict[str, float] | None] = []
    for e in entries:
        if e.logprob is None:
            tops.append(None)
            continue
        top = {t: v for t, _, v in e.top}
        top.setdefault(e.token, e.logprob)
        tops.append(top)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": tops, "text_offset": [e.offset + shift for e in entries]}
