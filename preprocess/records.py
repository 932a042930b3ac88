"""Decode and validate one raw record for a stage; every failure is a :class:`RecordError`.

Schemas:
- pretrain: ``{"text": str}``
- sft / reason: ``{"conversations": [turn, ...], "tools"?: [...]}``: the OpenAI / MiniMind chat schema of
  ``core.chat_schema`` (record shapes: tools and tool calls as lists or JSON strings, flat or OpenAI-wrapped;
  ``reasoning_content``; ``tool`` turns), ending with an ``assistant`` turn, returned in its normalised form.
- dpo: ``{"chosen": [turns], "rejected": [turns]}``, both plain conversations (``role`` / ``content``) with
  the same prompt (``chosen[:-1] == rejected[:-1]``) and different final answers. Tools, tool calls,
  reasoning_content and tool turns are refused by name (``unsupported_field``): the pair's rendering
  would otherwise silently strip them.
Contents must be non-empty strings of valid Unicode (no lone UTF-16 surrogates); other keys are ignored.
A record whose contents hold more than ``max_chars`` characters in all is refused (``too_long``) before it
is tokenized.

A RecordError carries a short ``reason`` (the key under which ``--skip-bad`` counts it) and the
offending ``field``; a ``core.chat_schema.SchemaError`` becomes one with the same reason and field.
:func:`parse_record` turns every failure a record can cause (deep nesting, odd types) into one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import orjson

from core import chat_schema
from core.chat_schema import OTHER_TOOL_ROLES, RICH_HINT, RICH_KEYS, TOOL_ROLE, SchemaError, check_text, present
from core.errors import TinyLMError
from preprocess.sources import BYTES_PER_CHAR_MAX, Item

STAGES = ("pretrain", "sft", "reason", "dpo")
DEFAULT_MAX_RECORD_CHARS = 1_000_000
RICH_ONLY_HINT = f"{RICH_HINT} in sft / reason records only"


class RecordError(TinyLMError):
    """A bad record: ``reason`` is the key ``--skip-bad`` counts it under; :meth:`at` locates it."""

    def __init__(self, reason: str, message: str, field: str | None = None):
        super().__init__(message, field=field)
        self.reason = reason

    def at(self, item: Item) -> RecordError:
        """This error located at the item (``file:line: field 'x': message``; an empty file's marker,
        line 0, names the file alone); returns it."""
        self.path, self.line = item.source, item.line or None
        return self

    @classmethod
    def of(cls, error: SchemaError) -> RecordError:
        """The record error of a schema error: the same reason, message and field."""
        return cls(error.reason, error.message, error.field)


@dataclass(frozen=True)
class Pair:
    chosen: list[dict]
    rejected: list[dict]


def decode_payload(item: Item) -> dict:
    """The JSON object of an item (UTF-8 strict); Parquet rows are already objects.

    orjson parses the line first (the hot path). It accepts a subset of what the standard library
    accepts, and gives the same object for it; every line it refuses (invalid JSON, a byte-order mark,
    a lone surrogate escape, NaN, a huge integer, deep nesting) goes through :func:`_decode_slow`,
    which accepts or refuses it exactly as ``json.loads`` does, with its precise message.
    """
    if item.payload is None:
        raise RecordError("empty_file", "the file contains no records")
    if isinstance(item.payload, dict):
        return item.payload
    try:
        obj = orjson.loads(item.payload)
    except orjson.JSONDecodeError:
        obj = _decode_slow(item)
    if not isinstance(obj, dict):
        hint = " (pack.py reads JSON Lines: one object per line, not one array)" if isinstance(obj, list) else ""
        raise RecordError("not_object", f"expected a JSON object, got {type(obj).__name__}{hint}")
    return obj


def _decode_slow(item: Item) -> object:
    """``json.loads`` of the payload: the value, or the RecordError that says why it is not JSON."""
    try:
        text = item.payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError("not_utf8", f"invalid UTF-8 byte at column {e.start + 1}") from None
    try:
        return json.loads(text.removeprefix("\ufeff"))  # a byte-order mark (first line of some exports)
    except json.JSONDecodeError as e:
        if item.unterminated:
            raise RecordError("truncated_record", f"the file ends inside this record ({e.msg} at column "
                              f"{e.colno}, no final newline): the file looks truncated") from None
        raise RecordError("invalid_json", f"invalid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise RecordError("too_deep", "JSON nested too deeply") from None


def parse_text(obj: dict) -> str:
    try:
        return check_text(obj.get("text"), "text")
    except SchemaError as e:
        raise RecordError.of(e) from None


def parse_conversation(obj: dict, key: str = "conversations") -> list[dict]:
    """The validated, normalised turns under ``key`` (``core.chat_schema.parse_conversation`` with the
    record's own ``tools``); the last turn is ``assistant``."""
    if key not in obj and key == "conversations" and "messages" in obj:
        raise RecordError("missing_field", "missing (this record has 'messages': rename it to 'conversations')", key)
    try:
        return chat_schema.parse_conversation(obj.get(key), key, tools=obj.get("tools"))
    except SchemaError as e:
        raise RecordError.of(e) from None


def refuse_rich_fields(obj: dict, keys: tuple[str, ...]) -> None:
    """Refuse (``unsupported_field``) tools, tool calls, reasoning_content and tool turns in a record whose
    stage would silently strip them: on the record and on each turn under ``keys``."""
    for key in RICH_KEYS:
        if present(obj.get(key)):
            raise RecordError("unsupported_field", f"{RICH_ONLY_HINT}; remove the key or the record", key)
    for key in keys:
        turns = obj.get(key)
        for i, turn in enumerate(turns if isinstance(turns, list) else ()):
            if not isinstance(turn, dict):
                continue
            if turn.get("role") in (TOOL_ROLE, *OTHER_TOOL_ROLES):
                raise RecordError("unsupported_field", f"role {turn['role']!r}: {RICH_ONLY_HINT}", f"{key}[{i}].role")
            for rich in RICH_KEYS if len(turn) > 2 else ():
                if present(turn.get(rich)):
                    raise RecordError("unsupported_field", f"{RICH_ONLY_HINT}; remove the key or the record",
                                      f"{key}[{i}].{rich}")


def parse_pair(obj: dict) -> Pair:
    refuse_rich_fields(obj, ("chosen", "rejected"))
    chosen, rejected = parse_conversation(obj, "chosen"), parse_conversation(obj, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise RecordError("dpo_prompt_mismatch", "chosen and rejected must share the same prompt turns", "rejected")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise RecordError("dpo_identical", "chosen and rejected final answers are identical", "rejected")
    return Pair(chosen, rejected)


def _chars(record: str | list[dict] | Pair) -> int:
    if isinstance(record, str):
        return len(record)
    if isinstance(record, Pair):
        return _chars(record.chosen) + len(record.rejected[-1]["content"])
    return sum(len(t["content"]) for t in record)


def _parse(item: Item, stage: str) -> str | list[dict] | Pair:
    obj = decode_payload(item)
    if stage == "pretrain":
        return parse_text(obj)
    if stage in ("sft", "reason"):
        return parse_conversation(obj)
    if stage == "dpo":
        return parse_pair(obj)
    raise ValueError(f"unknown stage {stage!r}")


def parse_record(item: Item, stage: str, max_chars: int = DEFAULT_MAX_RECORD_CHARS) -> str | list[dict] | Pair:
    """Text (pretrain), turns (sft / reason) or a Pair (dpo) of at most ``max_chars`` content characters.

    Raises RecordError for every way a record can be bad; a failure this module did not foresee (an
    exception from an odd value) is still a bad record (``unreadable``), never a crash of the whole pack.
    """
    size = item.oversize or (len(item.payload) if isinstance(item.payload, bytes) else 0)
    if size > BYTES_PER_CHAR_MAX * max_chars:
        raise RecordError("too_long", f"the line has {size:,} bytes, more than any record within "
                          f"--max-record-chars {max_chars:,} can have")
    try:
        record = _parse(item, stage)
    except RecordError:
        raise
    except RecursionError:
        raise RecordError("too_deep", "nested too deeply") from None
    except Exception as e:  # noqa: BLE001  (a record must never take the whole pack down)
        raise RecordError("unreadable", f"cannot read this record ({type(e).__name__}: {e})") from None
    if (n := _chars(record)) > max_chars:
        raise RecordError("too_long", f"{n:,} characters of content, more than --max-record-chars {max_chars:,}")
    return record
