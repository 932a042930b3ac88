"""Prompt records for reinforcement learning and prompt evaluation (``--prompts FILE.jsonl``).

A record is any chat / reasoning record: ``{"conversations": [turns], ...}`` validated exactly as
``pack.py`` validates conversations (:func:`preprocess.records.parse_turns`), except that it may end with a
user turn; or the shorthand ``{"prompt": "...", "system": "..."}`` (``system`` optional): one user turn
after an optional system turn, each content checked as pack checks contents. A final assistant turn is not
shown to the model: its content becomes the ``reference`` column (a record that also has its own
``reference`` field is refused: one of the two would be lost). Every other field of the record is a column,
handed unchanged to reward functions. After dropping the answer the conversation must end with a user turn.
Every failure is one :class:`~preprocess.records.RecordError` naming ``file:line: field``; nothing is
skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preprocess.records import RecordError, _content, _refuse_richer_schema, decode_payload, parse_turns
from preprocess.sources import InputError, SourceSpec, iter_items

PROMPT_KEY = "conversations"
SHORTHAND, SYSTEM = "prompt", "system"
REFERENCE = "reference"


@dataclass(frozen=True)
class Prompt:
    """One prompt: the turns shown to the model (ending with a user turn) and its other columns."""

    turns: list[dict]
    columns: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    line: int = 0


def parse_prompt(obj: dict) -> tuple[list[dict], dict[str, Any]]:
    """(turns ending with a user turn, columns) of one decoded record; RecordError names the field."""
    _refuse_richer_schema(obj, "")
    if PROMPT_KEY not in obj and SHORTHAND in obj:
        turns = [{"role": "user", "content": _content(obj[SHORTHAND], SHORTHAND)}]
        if obj.get(SYSTEM) is not None:
            turns.insert(0, {"role": "system", "content": _content(obj[SYSTEM], SYSTEM)})
        return turns, {k: v for k, v in obj.items() if k not in (SHORTHAND, SYSTEM)}
    if PROMPT_KEY not in obj and "messages" not in obj:
        raise RecordError("missing_field", "missing: a prompt record has a 'conversations' list or a 'prompt' "
                          "string", PROMPT_KEY)
    turns = parse_turns(obj, PROMPT_KEY, final="any")
    columns = {k: v for k, v in obj.items() if k != PROMPT_KEY}
    if turns[-1]["role"] == "assistant":
        if REFERENCE in columns:
            raise RecordError("conflicting_field", "the record has its own 'reference' and a final assistant turn "
                              "(which becomes 'reference'); keep one", REFERENCE)
        columns[REFERENCE] = turns[-1]["content"]
        turns = turns[:-1]
    if not turns or turns[-1]["role"] != "user":
        raise RecordError("bad_role_order", "a prompt must end with a user turn (after an optional final assistant "
                          "answer, which is kept as 'reference')", PROMPT_KEY)
    return turns, columns


def read_prompts(path: str | Path) -> list[Prompt]:
    """Every record of a JSONL / .jsonl.zst / Parquet file as a :class:`Prompt`, in file order; the first bad
    record stops the read with one line naming ``file:line: field``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such prompts file")
    out: list[Prompt] = []
    for item in iter_items([SourceSpec(path, 1.0)]):
        try:
            turns, columns = parse_prompt(decode_payload(item))
        except RecordError as e:
            raise e.at(item) from None
        out.append(Prompt(turns, columns, item.source, item.line))
    return out
