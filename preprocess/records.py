"""Decode and validate one raw record for a stage; every failure is a :class:`RecordError`.

Schemas (``../shared/data/README.md``):
- pretrain: ``{"text": str}``
- sft / reason: ``{"conversations": [turn, ...]}``, a turn ``{"role", "content"}``; an optional leading
  ``system`` turn, then ``user`` / ``assistant`` strictly alternating, the last one ``assistant``.
- dpo: ``{"chosen": [turns], "rejected": [turns]}``, both valid conversations with the same prompt
  (``chosen[:-1] == rejected[:-1]``) and different final answers.
Contents must be non-empty strings of valid Unicode (no lone UTF-16 surrogates). Extra keys are ignored,
except the keys of the richer schema (MiniMind-3 / OpenAI ``reasoning_content``, ``tool_calls`` and
``tools`` on turns or records, a ``tool`` role): sft / reason records with them are validated and
normalized by ``preprocess/chat_fields.py`` (:func:`parse_conversation`); elsewhere (dpo) ignoring them
would silently strip part of the record, so such a record is refused (``unsupported_field``), as are the
roles ``function`` / ``ipython``. A record whose contents hold
more than ``max_chars`` characters in all is refused (``too_long``) before it is tokenized.

A RecordError carries a short ``reason`` (the key under which ``--skip-bad`` counts it) and the
offending ``field``; :func:`parse_record` turns every failure a record can cause (deep nesting, odd
types) into one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import orjson

from core.errors import TinyLMError
from preprocess.sources import BYTES_PER_CHAR_MAX, Item

STAGES = ("pretrain", "sft", "reason", "dpo")
DEFAULT_MAX_RECORD_CHARS = 1_000_000
UNSUPPORTED_KEYS = ("reasoning_content", "tool_calls", "tools")
UNSUPPORTED_ROLES = ("tool", "function", "ipython")
UNSUPPORTED_HINT = "tinylm renders tool calls, tools, reasoning_content and 'tool' turns in sft / reason records only"


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


def _content(value: object, field: str) -> str:
    if value is None:
        raise RecordError("missing_field", "missing", field)
    if not isinstance(value, str):
        raise RecordError("bad_type", f"expected a string, got {type(value).__name__}", field)
    if not value.strip():
        raise RecordError("empty_content", "empty", field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordError("bad_unicode", f"lone UTF-16 surrogate {value[e.start]!r} at character {e.start + 1}",
                          field) from None
    return value


def _refuse_richer_schema(obj: dict, field: str) -> None:
    """A key that tinylm would silently strip (tool calls, reasoning_content) -> ``unsupported_field``."""
    for key in UNSUPPORTED_KEYS:
        value = obj.get(key)
        if value is not None and value != "" and value != []:
            where = f"{field}.{key}" if field else key
            raise RecordError("unsupported_field", f"{UNSUPPORTED_HINT}; remove the key or the record", where)


def parse_text(obj: dict) -> str:
    return _content(obj.get("text"), "text")


def parse_turns(obj: dict, key: str = "conversations", final: str = "assistant") -> list[dict]:
    """The validated turns under ``key``; the last one must have role ``final`` (``"any"``: either role).

    A plain turn (a dict of ``role`` and ``content`` only, in the expected role) skips the checks of
    :func:`_check_turn`, which any other turn goes through (it accepts the turn or raises the precise
    error); every content goes through :func:`_content`."""
    turns = obj.get(key)
    if turns is None:
        renamed = key == "conversations" and "messages" in obj
        hint = " (this record has 'messages': rename it to 'conversations')" if renamed else ""
        raise RecordError("missing_field", f"missing{hint}", key)
    if not isinstance(turns, list) or not turns:
        raise RecordError("bad_type", "expected a non-empty list of turns", key)
    has_system = isinstance(turns[0], dict) and turns[0].get("role") == "system"
    out: list[dict] = []
    for i, turn in enumerate(turns):
        expected, field = _expected_role(i, has_system), f"{key}[{i}]"
        if not (type(turn) is dict and turn.keys() <= _PLAIN_TURN and turn.get("role") == expected):
            _check_turn(turn, field, expected)
        out.append({"role": expected, "content": _content(turn.get("content"), f"{field}.content")})
    if final != "any" and out[-1]["role"] != final:
        raise RecordError("bad_role_order", f"the last turn must be {final!r}", f"{key}[{len(out) - 1}].role")
    return out


_PLAIN_TURN = frozenset(("role", "content"))


def _check_turn(turn: object, field: str, expected: str) -> None:
    """Refuse a turn that is not an object, carries a key of the richer schema, or has a role that is
    unknown or out of order (in that order of precedence); return for a turn that is fine."""
    if not isinstance(turn, dict):
        raise RecordError("bad_type", f"expected an object, got {type(turn).__name__}", field)
    _refuse_richer_schema(turn, field)
    role = turn.get("role")
    if isinstance(role, str) and role in UNSUPPORTED_ROLES:
        raise RecordError("unsupported_field", f"role {role!r}: {UNSUPPORTED_HINT}", f"{field}.role")
    if role not in ("system", "user", "assistant"):
        raise RecordError("bad_role", f"unknown role {role!r}", f"{field}.role")
    if role != expected:
        raise RecordError("bad_role_order", f"expected {expected!r}, got {role!r}", f"{field}.role")


def parse_conversation(obj: dict) -> list[dict]:
    """sft / reason turns: a record with tools, tool calls, tool turns or reasoning_content goes through
    preprocess.chat_fields (validated there, normalized for the template); any other through parse_turns."""
    from preprocess import chat_fields  # imported here: chat_fields builds on this module

    return chat_fields.parse_chat(obj) if chat_fields.has_rich_fields(obj) else parse_turns(obj)


def _expected_role(i: int, has_system: bool) -> str:
    if has_system:
        if i == 0:
            return "system"
        i -= 1
    return "user" if i % 2 == 0 else "assistant"


def parse_pair(obj: dict) -> Pair:
    chosen, rejected = parse_turns(obj, "chosen"), parse_turns(obj, "rejected")
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
    _refuse_richer_schema(obj, "")
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
