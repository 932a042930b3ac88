"""OpenAI's shapes of an answer: the parsed events of one completion as a ``message`` or as stream deltas.

Contract: :func:`answer_message` is the non-streamed ``message`` (``content``, null when the answer is only
calls; ``reasoning_content`` when the model reasoned; ``tool_calls`` when it called) and
:func:`event_deltas` the stream deltas of one event (a call: a first delta with its id, type, name and empty
arguments, then one with the arguments, as OpenAI sends them). A call's id is :func:`call_id`'s unless the
caller gives one (the server-side tool rounds give the id they answer). Pure functions; no HTTP.
"""

from __future__ import annotations

import secrets
from typing import Any

from core.completion import CONTENT, REASONING, TOOL_CALL, Event


def call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def answer_message(events: list[Event], ids: list[str] | None = None) -> dict:
    """The ``message`` of ``events``; ``ids`` are the calls' ids in order (new ones when None)."""
    text = {kind: "".join(e.text for e in events if e.kind == kind) for kind in (REASONING, CONTENT)}
    found = [e for e in events if e.kind == TOOL_CALL]
    ids = ids if ids is not None else [call_id() for _ in found]
    calls = [{"id": i, "type": "function", "function": {"name": e.call.name, "arguments": e.call.arguments}}
             for i, e in zip(ids, found, strict=True)]
    message: dict[str, Any] = {"role": "assistant", "content": text[CONTENT] or (None if calls else "")}
    if text[REASONING]:
        message["reasoning_content"] = text[REASONING]
    if calls:
        message["tool_calls"] = calls
    return message


def event_deltas(event: Event, index: int, id: str | None = None) -> list[dict]:
    """The stream deltas of one parsed event; a call is the message's ``index``-th (its id: ``id`` or new)."""
    if event.kind != TOOL_CALL:
        return [{"reasoning_content" if event.kind == REASONING else "content": event.text}]
    head = {"index": index, "id": id or call_id(), "type": "function",
            "function": {"name": event.call.name, "arguments": ""}}
    return [{"tool_calls": [head]}, {"tool_calls": [{"index": index, "function": {"arguments": event.call.arguments}}]}]
