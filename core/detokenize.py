"""Incremental detokenization for streaming: text pieces that never split a UTF-8 character.

Byte-level BPE maps a rare CJK character to two or three byte tokens; decoding a prefix that ends
inside it yields U+FFFD. :class:`IncrementalDecoder` keeps two offsets into the ids seen so far
(``prefix`` = start of a small decode window, ``read`` = end of the text already emitted) and, per
new id, decodes the window with and without the unread ids. The difference is emitted only when the
longer text does not end in U+FFFD, i.e. when the pending bytes form whole characters; then both
offsets move forward (the window stays a few tokens long, so each step costs O(1)). Decoding the
window from an earlier token (not from ``read``) keeps decoders that drop a leading space correct.

Invariant: the concatenation of everything :meth:`push` and :meth:`flush` returned equals
``tokenizer.decode(all_ids)``, except that an incomplete character left at the very end is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Feed token ids with :meth:`push`; each call returns the newly complete text (possibly "")."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still partial)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def push_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """Text still held back at the end; a trailing incomplete character is dropped, not emitted as U+FFFD."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):].rstrip(REPLACEMENT) if len(after) > len(before) else ""

