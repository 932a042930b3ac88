"""Incremental parsing of a model's completion into reasoning, answer text and tool calls.

A completion (the text the model writes after the generation prompt) has the layout the template trains::

    [<think>\\n{reasoning}\\n</think>\\n\\n]{content, possibly <answer>...</answer>}
    [<tool_call>\\n{json}\\n</tool_call>]...

:class:`CompletionParser` is fed text pieces as they are decoded and returns :class:`Event` s that can be
routed at once (``reasoning``, ``content``, ``tool_call``). Rules:

- ``<think>`` opens reasoning only before any content or call (a model's answer may start with it); the
  parser starts *inside* reasoning when the prompt already ended with ``<think>\\n`` (pass that prompt
  tail, ``core.chat_template.THINKING_PROMPTS[enable_thinking]``, as ``prefill``). ``</think>`` closes it;
  inside reasoning no other tag is structure.
- ``<tool_call>`` in content starts a call; everything up to ``</tool_call>`` is held back. A body that is a
  JSON object with a non-empty string ``name`` and ``arguments`` that are an object (or a string holding
  the JSON of an object; missing = ``{}``) becomes a :class:`ToolCall`; anything else, and a call left open
  at the end, is sent as plain content, tags included (never lost, never an error).
- ``<answer>`` / ``</answer>`` in content are dropped (they are the reasoning format's structure).
- Whitespace: each of reasoning and content starts at its first non-space character; trailing whitespace is
  held and sent only when more text of the same kind follows (so the newlines around tags never show).
- Text that may be the start of a tag is held back until it is decided.

Invariant (tested at every split point): the events, with adjacent text events of one kind merged, depend
only on the concatenation of the pieces fed, not on how it was split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import NamedTuple

from core.chat_template import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
)

ANSWER_TAGS = (ANSWER_OPEN, ANSWER_CLOSE)
CALL_OPEN, CALL_CLOSE = TOOL_CALL_OPEN, TOOL_CALL_CLOSE
REASONING, CONTENT, TOOL_CALL = "reasoning", "content", "tool_call"
_LONGEST_TAG = max(map(len, (THINK_OPEN, THINK_CLOSE, CALL_OPEN, *ANSWER_TAGS)))


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
    """Feed decoded text with :meth:`feed`; :meth:`finish` at the end. Each returns the new events."""

    def __init__(self, prefill: str = "", tool_calls: bool = True) -> None:
        """``prefill``: the completion's start that the prompt already holds (parsed first, e.g. ``<think>\\n``);
        ``tool_calls=False``: ``<tool_call>`` is plain text (a request with ``tool_choice="none"``)."""
        self.call_tags = (CALL_OPEN,) if tool_calls else ()
        self.mode = CONTENT  # CONTENT, REASONING or TOOL_CALL (inside a call, held back)
        self.buf = ""  # text not yet decided (a possible tag start, or a call's body)
        self.held = {REASONING: "", CONTENT: ""}  # trailing whitespace, sent only if more text follows
        self.started = {REASONING: False, CONTENT: False}
        self.calls = 0
        self.scanned = 0  # inside a call: how much of buf is known to hold no </tool_call>
        self.events: list[Event] = []
        if prefill:
            self.feed(prefill)

    # ---- public ----
    def feed(self, text: str) -> list[Event]:
        self.buf += text
        while self._step():
            pass
        return self._take()

    def finish(self) -> list[Event]:
        """End of the completion: an open call becomes content; held text is sent, trailing spaces dropped."""
        if self.mode == TOOL_CALL:
            self.mode, self.buf = CONTENT, CALL_OPEN + self.buf
        self._text(self.buf)
        self.buf = ""
        return self._take()

    # ---- the state machine ----
    def _tags(self) -> tuple[str, ...]:
        if self.mode == REASONING:
            return (THINK_CLOSE,)
        may_think = not (self.started[CONTENT] or self.started[REASONING] or self.calls)
        return (*self.call_tags, *ANSWER_TAGS, *((THINK_OPEN,) if may_think else ()))

    def _step(self) -> bool:
        """Decide as much of ``buf`` as possible; True when a tag was consumed (call again)."""
        if self.mode == TOOL_CALL:
            end = self.buf.find(CALL_CLOSE, max(0, self.scanned - len(CALL_CLOSE) + 1))
            if end < 0:
                self.scanned = len(self.buf)  # a long call is searched once, not again at every piece
                return False
            self.scanned = 0
            body, self.buf = self.buf[:end], self.buf[end + len(CALL_CLOSE):]
            self.mode = CONTENT
            self._call(body)
            return True
        tags = self._tags()
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

    def _undecided(self, tags: tuple[str, ...]) -> int:
        """Where the tail of ``buf`` that may still become one of ``tags`` starts (len(buf): none). Tags hold
        "<" only as their first character, so only the last "<" can start such a tail."""
        start = self.buf.rfind("<", max(0, len(self.buf) - _LONGEST_TAG))
        if start >= 0 and any(tag.startswith(self.buf[start:]) for tag in tags):
            return start
        return len(self.buf)

    def _tag(self, tag: str) -> None:
        if tag == THINK_OPEN:
            self.mode = REASONING
        elif tag == THINK_CLOSE:
            self.held[REASONING] = ""
            self.mode = CONTENT
        elif tag == CALL_OPEN:
            self.mode = TOOL_CALL
        # ANSWER_TAGS: dropped

    def _call(self, body: str) -> None:
        call = parse_tool_call(body)
        if call is None:
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


def merged(events: list[Event]) -> list[Event]:
    """``events`` with adjacent text events of the same kind joined (what a non-streaming answer holds)."""
    out: list[Event] = []
    for e in events:
        if out and e.kind != TOOL_CALL and out[-1].kind == e.kind:
            out[-1] = Event(e.kind, out[-1].text + e.text)
        else:
            out.append(e)
    return out
