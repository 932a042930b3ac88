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


class ThinkFilter:
    """Token-level filter for reasoning output: with ``hide=True`` the ids from ``<think>`` to ``</think>``
    (inclusive) and the ``<answer>``/``</answer>`` tags are dropped, so only the answer is shown.

    The tags are single ids (``chat_template.REASONING_TAGS``); ``special_ids`` maps tag -> id and may lack
    them (a tokenizer without reasoning tags: nothing is filtered).
    """

    def __init__(self, special_ids: dict[str, int], hide: bool) -> None:
        self.hide = hide
        self.open, self.close = special_ids.get("<think>"), special_ids.get("</think>")
        self.tags = {special_ids[t] for t in ("<answer>", "</answer>") if t in special_ids}
        self.inside = False

    def keep(self, token_id: int) -> bool:
        """Whether ``token_id`` is visible (updates the inside-think state)."""
        if not self.hide:
            return True
        if token_id == self.open:
            self.inside = True
            return False
        if token_id == self.close:
            self.inside = False
            return False
        return not self.inside and token_id not in self.tags
