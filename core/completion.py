"""Incremental parsing of a model's generated ids into reasoning, answer text and tool calls.

Contract: :class:`CompletionParser` receives the **generated ids** of one completion (the ids the model
writes after the generation prompt), decodes the text itself (a piece never splits a UTF-8 character) and
returns :class:`Event` s that can be routed at once: ``reasoning`` and ``content`` text, and ``tool_call`` s.
It is told what the request made meaningful: ``tools``, the names of the functions offered (empty: no call
can be made), and ``thinking``, the request's ``enable_thinking`` (True: the prompt opened the reasoning,
so the completion starts inside it; False: the prompt holds an empty reasoning block; None: the model
decides). :func:`parse_completion` gives the same events for a whole completion at once. It knows nothing
of HTTP or the terminal; bin/serve, bin/chat and any other consumer of model output use it, one parser per
sequence.

Structure comes only from control ids. A tag (``<think>`` ``</think>`` ``<answer>`` ``</answer>``
``<tool_call>`` ``</tool_call>``) that the tokenizer has as a single id is structure only when the model
generated that id; the same characters written as ordinary text pieces are text. A tag the tokenizer lacks
as one id (MiniMind-2's tokenizer has none) is recognised in the decoded text instead, but only where the
request made it meaningful: the call tags only when ``tools`` is not empty, the reasoning tags only when
``thinking`` is not False. Rules, for a tag seen either way:

- ``<think>`` opens reasoning only before any content or call and only when ``thinking`` is None (True:
  the completion starts inside reasoning; False: the prompt closed it); ``</think>`` closes it; inside
  reasoning no other tag is structure (each is written as its text).
- ``<tool_call>`` in content (with ``tools`` offered) starts a call; everything up to ``</tool_call>`` is
  held back. A body that is a JSON object with a ``name`` among ``tools`` and ``arguments`` that are an
  object (or a string holding the JSON of an object; missing = ``{}``) becomes a :class:`ToolCall`; anything
  else (malformed, a function that was not offered), and a call left open at the end, is sent as plain
  content, tags included (never lost, never an error).
- ``<answer>`` / ``</answer>`` in content are dropped (they are the reasoning format's structure).
- A control id that is not structure where it stands (``</think>`` in content, ``<tool_call>`` with no
  tools, ``<tool_response>``) is text: its string, as the tokenizer decodes it.
- Whitespace: each of reasoning and content starts at its first non-space character; trailing whitespace is
  held and sent only when more text of the same kind follows (so the newlines around tags never show).
- Text that may be the start of a text-recognised tag is held back until it is decided; a control id
  decides it (a tag never spans a control id).

Invariant (tested at every split point): the events, with adjacent text events of one kind merged, depend
only on the ids fed, not on how they were split into :meth:`~CompletionParser.feed` calls.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from core.chat_template import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
)
from core.detokenize import IncrementalDecoder

if TYPE_CHECKING:
    from core.tokenizer import TokenizerInfo

ANSWER_TAGS = (ANSWER_OPEN, ANSWER_CLOSE)
CALL_OPEN, CALL_CLOSE = TOOL_CALL_OPEN, TOOL_CALL_CLOSE
THINK_TAGS = (THINK_OPEN, THINK_CLOSE)
CALL_TAGS = (CALL_OPEN, CALL_CLOSE)
PARSED_TAGS = (*THINK_TAGS, *ANSWER_TAGS, *CALL_TAGS)  # the tags that can be structure in a completion
REASONING, CONTENT, TOOL_CALL = "reasoning", "content", "tool_call"


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function name and its arguments as the JSON text of an object."""

    name: str
    arguments: str


class Event(NamedTuple):
    """``kind`` is REASONING or CONTENT (``text`` set) or TOOL_CALL (``call`` set)."""

    kind: str
    text: str = ""
    call: ToolCall | None = None


def _refuse_constant(text: str) -> None:
    raise ValueError(f"{text} is not JSON")


def parse_json_object(text: str) -> dict | None:
    """``text`` parsed as a JSON object (NaN/Infinity refused), else None (tool arguments must be one)."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def parse_tool_call(body: str) -> ToolCall | None:
    """The call written between ``<tool_call>`` and ``</tool_call>``, or None when it is malformed."""
    value = parse_json_object(body.strip())
    if value is None or not isinstance(value.get("name"), str) or not value["name"].strip():
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):
        arguments = parse_json_object(arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


class CompletionParser:
    """Feed generated ids with :meth:`feed`; call :meth:`finish` at the end. Each returns the new events.

    ``tokenizer``: the model's tokenizer (which tags are single ids, and how to decode the rest);
    ``tools``: names of the offered functions (empty: calls stay text, e.g. no ``tools`` or
    ``tool_choice="none"``); ``thinking``: the request's ``enable_thinking`` (see the module docstring);
    ``prefill``: ids the prompt already holds after the generation prompt and its thinking switch (a forced
    call's start), parsed first as if generated. ``calls`` counts the tool calls parsed so far.
    """

    def __init__(self, tokenizer: TokenizerInfo, tools: Collection[str] = (), thinking: bool | None = None,
                 prefill: Iterable[int] = ()) -> None:
        self.tools = frozenset(tools)
        self.thinking = thinking
        meaningful = (CALL_TAGS if self.tools else ()) + (THINK_TAGS + ANSWER_TAGS if thinking is not False else ())
        ids = tokenizer.special_ids
        self.control = {ids[tag]: tag for tag in PARSED_TAGS if tag in ids}  # id -> tag, for tags that are ids
        self.text_tags = frozenset(tag for tag in meaningful if tag not in ids)  # tags parsed in decoded text
        self.longest = max(map(len, self.text_tags), default=0)
        self.decoder = IncrementalDecoder(tokenizer.tokenizer)
        self.mode = REASONING if thinking else CONTENT  # CONTENT, REASONING or TOOL_CALL (inside a call)
        self.opened = bool(thinking)  # whether reasoning was opened (it opens at most once)
        self.buf = ""  # text not yet decided (a possible text tag's start, or a call's body)
        self.held = {REASONING: "", CONTENT: ""}  # trailing whitespace, sent only if more text follows
        self.started = {REASONING: False, CONTENT: False}
        self.calls = 0
        self.scanned = 0  # inside a call: how much of buf is known to hold no text </tool_call>
        self.events: list[Event] = []
        self.feed(prefill)

    # ---- public ----
    def feed(self, ids: Iterable[int]) -> list[Event]:
        """Parse more generated ids; return the events they decide."""
        for token in ids:
            tag = self.control.get(token)
            if tag is None:
                self._feed_text(self.decoder.push(token))
            else:
                self._feed_text(self.decoder.flush())
                self._control(tag)
        return self._take()

    def finish(self) -> list[Event]:
        """End of the completion: an open call becomes content; held text is sent, trailing spaces dropped."""
        self._feed_text(self.decoder.flush())
        if self.mode == TOOL_CALL:
            self.mode, self.buf = CONTENT, CALL_OPEN + self.buf
        self._text(self.buf)
        self.buf = ""
        return self._take()

    # ---- the state machine ----
    def _structure(self) -> tuple[str, ...]:
        """The tags that are structure in the current state (however they arrive)."""
        if self.mode == REASONING:
            return (THINK_CLOSE,)
        may_think = self.thinking is None and not (self.opened or self.started[CONTENT] or self.calls)
        return (*((CALL_OPEN,) if self.tools else ()), *ANSWER_TAGS, *((THINK_OPEN,) if may_think else ()))

    def _control(self, tag: str) -> None:
        """A generated control id: structure where it stands, else its text."""
        if self.mode == TOOL_CALL:
            if tag == CALL_CLOSE:
                self._close_call(len(self.buf), 0)
            else:
                self.buf += tag
            return
        self._text(self.buf)  # an undecided tail cannot become a tag across a control id
        self.buf = ""
        if tag in self._structure():
            self._tag(tag)
        else:
            self._text(tag)

    def _feed_text(self, text: str) -> None:
        if text:
            self.buf += text
            while self._step():
                pass

    def _step(self) -> bool:
        """Decide as much of ``buf`` as possible; True when a tag was consumed (call again)."""
        if self.mode == TOOL_CALL:
            if CALL_CLOSE not in self.text_tags:
                return False  # only the control id closes the call
            end = self.buf.find(CALL_CLOSE, max(0, self.scanned - len(CALL_CLOSE) + 1))
            if end < 0:
                self.scanned = len(self.buf)  # a long call is searched once, not again at every piece
                return False
            self._close_call(end, len(CALL_CLOSE))
            return True
        tags = [tag for tag in self._structure() if tag in self.text_tags]
        found = [(i, tag) for tag in tags if (i := self.buf.find(tag)) >= 0
                 and (tag != THINK_OPEN or not self.buf[:i].strip())]  # <think> only before any text
        if found:
            i, tag = min(found)
            self._text(self.buf[:i])
            self.buf = self.buf[i + len(tag):]
            self._tag(tag)
            return True
        cut = self._undecided(tags)
        self._text(self.buf[:cut])
        self.buf = self.buf[cut:]
        return False

    def _undecided(self, tags: list[str]) -> int:
        """Where the tail of ``buf`` that may still become one of ``tags`` starts (len(buf): none). Tags hold
        "<" only as their first character, so only the last "<" can start such a tail."""
        if not tags:
            return len(self.buf)
        start = self.buf.rfind("<", max(0, len(self.buf) - self.longest))
        if start >= 0 and any(tag.startswith(self.buf[start:]) for tag in tags):
            return start
        return len(self.buf)

    def _tag(self, tag: str) -> None:
        if tag == THINK_OPEN:
            self.mode, self.opened = REASONING, True
        elif tag == THINK_CLOSE:
            self.held[REASONING] = ""
            self.mode = CONTENT
        elif tag == CALL_OPEN:
            self.mode = TOOL_CALL
            self.scanned = 0
        # ANSWER_TAGS: dropped

    def _close_call(self, end: int, tag_len: int) -> None:
        """The call's body is ``buf[:end]``; the closing tag (``tag_len`` characters of text, 0 for an id)
        follows it."""
        body, self.buf = self.buf[:end], self.buf[end + tag_len:]
        self.mode, self.scanned = CONTENT, 0
        call = parse_tool_call(body)
        if call is None or call.name not in self.tools:
            self._text(CALL_OPEN + body + CALL_CLOSE)
            return
        self.held[CONTENT] = ""
        self.calls += 1
        self.events.append(Event(TOOL_CALL, call=call))

    def _text(self, text: str) -> None:
        """Send ``text`` of the current kind under the whitespace rule (see the module docstring)."""
        kind = self.mode
        text = self.held[kind] + text if self.started[kind] else text.lstrip()
        body = text.rstrip()
        self.held[kind] = text[len(body):]
        if body:
            self.started[kind] = True
            self.events.append(Event(kind, body))

    def _take(self) -> list[Event]:
        events, self.events = self.events, []
        return events


def parse_completion(tokenizer: TokenizerInfo, ids: Iterable[int], tools: Collection[str] = (),
                     thinking: bool | None = None, prefill: Iterable[int] = ()) -> list[Event]:
    """The events of a whole completion at once, adjacent text of one kind merged (evaluation, rollouts):
    what :class:`CompletionParser` streams, for callers that have all the ids."""
    parser = CompletionParser(tokenizer, tools, thinking, prefill)
    return merged(parser.feed(ids) + parser.finish())


def merged(events: list[Event]) -> list[Event]:
    """``events`` with adjacent text events of the same kind joined (what a non-streaming answer holds)."""
    out: list[Event] = []
    for e in events:
        if out and e.kind != TOOL_CALL and out[-1].kind == e.kind:
            out[-1] = Event(e.kind, out[-1].text + e.text)
        else:
            out.append(e)
    return out
