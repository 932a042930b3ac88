"""Decode and validate one raw record for a stage; every failure is a :class:`RecordError`.

Schemas (``../shared/data/README.md``):
- pretrain: ``{"text": str}``
- sft / reason: ``{"conversations": [turn, ...]}``, a turn ``{"role", "content"}``; an optional leading
  ``system`` turn, then ``user`` / ``assistant`` strictly alternating, the last one ``assistant``.
- dpo: ``{"chosen": [turns], "rejected": [turns]}``, both valid conversations with the same prompt
  (``chosen[:-1] == rejected[:-1]``) and different final answers.
Contents must be non-empty strings. Extra keys are ignored. A RecordError carries a short ``reason``
(the key under which ``--skip-bad`` counts it) and the offending ``field``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from core.errors import TinyLMError
from preprocess.sources import Item

STAGES = ("pretrain", "sft", "reason", "dpo")


class RecordError(TinyLMError):
    def __init__(self, reason: str, message: str, field: str | None = None):
        super().__init__(message, field=field)
        self.reason = reason

    def describe(self, item: Item) -> str:
        """``file:line: field 'x': message`` — the one line a user sees."""
        where = f"{item.source}:{item.line}" if item.line else item.source
        field = f" field '{self.field}':" if self.field else ""
        return f"{where}:{field} {self.message}"


@dataclass(frozen=True)
class Pair:
    chosen: list[dict]
    rejected: list[dict]


def decode_payload(item: Item) -> dict:
    """The JSON object of an item (UTF-8 strict); Parquet rows are already objects."""
    if item.payload is None:
        raise RecordError("empty_file", "the file contains no records")
    if isinstance(item.payload, dict):
        return item.payload
    try:
        text = item.payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError("not_utf8", f"invalid UTF-8 byte at column {e.start + 1}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError("invalid_json", f"invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise RecordError("not_object", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _content(value: object, field: str) -> str:
    if value is None:
        raise RecordError("missing_field", "missing", field)
    if not isinstance(value, str):
        raise RecordError("bad_type", f"expected a string, got {type(value).__name__}", field)
    if not value.strip():
        raise RecordError("empty_content", "empty", field)
    return value


def parse_text(obj: dict) -> str:
    return _content(obj.get("text"), "text")


def parse_turns(obj: dict, key: str = "conversations") -> list[dict]:
    turns = obj.get(key)
    if turns is None:
        raise RecordError("missing_field", "missing", key)
    if not isinstance(turns, list) or not turns:
        raise RecordError("bad_type", "expected a non-empty list of turns", key)
    out: list[dict] = []
    for i, turn in enumerate(turns):
        field = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError("bad_type", f"expected an object, got {type(turn).__name__}", field)
        role = turn.get("role")
        if role not in ("system", "user", "assistant"):
            raise RecordError("bad_role", f"unknown role {role!r}", f"{field}.role")
        expected = _expected_role(i, turns[0].get("role") == "system")
        if role != expected:
            raise RecordError("bad_role_order", f"expected {expected!r}, got {role!r}", f"{field}.role")
        out.append({"role": role, "content": _content(turn.get("content"), f"{field}.content")})
    if out[-1]["role"] != "assistant":
        raise RecordError("bad_role_order", "the last turn must be 'assistant'", f"{key}[{len(out) - 1}].role")
    return out


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


def parse_record(item: Item, stage: str) -> str | list[dict] | Pair:
    """Text (pretrain), turns (sft / reason) or a Pair (dpo); raises RecordError."""
    obj = decode_payload(item)
    if stage == "pretrain":
        return parse_text(obj)
    if stage in ("sft", "reason"):
        return parse_turns(obj)
    if stage == "dpo":
        return parse_pair(obj)
    raise ValueError(f"unknown stage {stage!r}")
