"""Prompt records for reinforcement learning and prompt evaluation (``--prompts FILE.jsonl``).

A record is any chat record: ``{"conversations": [turns], "tools"?: [...], ...}`` validated by
``core.chat_schema`` with the shapes ``pack.py`` reads (tools on the record or the system turn, tool calls,
tool turns, reasoning_content), except that it need not end with an assistant turn; or the shorthand
``{"prompt": "...", "system": "..."}`` (``system`` optional): one user turn after an optional system turn.

The prompt shown to the model ends with a user or a tool turn. A final assistant turn is not shown:
- with no content (missing, null or blank) and no tool calls it is a placeholder (MiniMind's RL files hold
  one where the policy's answer goes) and is dropped;
- otherwise its content becomes the ``reference`` column (a record that also has its own ``reference``
  field is refused: one of the two would be lost).
Every other field of the record (``gt``, ``answer``, ...) is a column, handed unchanged to reward
functions; the record's ``tools`` are not a column, they are rendered with the prompt (on its system turn).
Every failure is one :class:`~preprocess.records.RecordError` naming ``file:line: field``; nothing is
skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.chat_schema import SchemaError, check_text, parse_conversation, present
from preprocess.records import RecordError, decode_payload
from preprocess.sources import InputError, SourceSpec, iter_items

PROMPT_KEY = "conversations"
SHORTHAND, SYSTEM = "prompt", "system"
REFERENCE = "reference"
TOOLS = "tools"
PROMPT_ENDS = ("user", "tool")  # the roles a prompt may end with: the model answers them


@dataclass(frozen=True)
class Prompt:
    """One prompt: the turns shown to the model (ending with a user or tool turn) and its other columns."""

    turns: list[dict]
    columns: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    line: int = 0


def is_placeholder(turn: object) -> bool:
    """Whether a final turn only marks where the answer goes: an assistant turn without content or calls."""
    if not (isinstance(turn, dict) and turn.get("role") == "assistant") or present(turn.get("tool_calls")):
        return False
    content = turn.get("content")
    return content is None or isinstance(content, str) and not content.strip()


def parse_prompt(obj: dict) -> tuple[list[dict], dict[str, Any]]:
    """(turns ending with a user or tool turn, columns) of one decoded record; RecordError names the field."""
    try:
        return _parse_prompt(obj)
    except SchemaError as e:
        raise RecordError.of(e) from None


def _parse_prompt(obj: dict) -> tuple[list[dict], dict[str, Any]]:
    if PROMPT_KEY not in obj and SHORTHAND in obj:
        turns = [{"role": "user", "content": check_text(obj[SHORTHAND], SHORTHAND)}]
        if obj.get(SYSTEM) is not None:
            turns.insert(0, {"role": "system", "content": check_text(obj[SYSTEM], SYSTEM)})
        return turns, {k: v for k, v in obj.items() if k not in (SHORTHAND, SYSTEM)}
    if PROMPT_KEY not in obj:
        hint = ("(this record has 'messages': rename it to 'conversations')" if "messages" in obj
                else "a prompt record has a 'conversations' list or a 'prompt' string")
        raise RecordError("missing_field", f"missing: {hint}", PROMPT_KEY)
    raw = obj[PROMPT_KEY]
    if isinstance(raw, list) and len(raw) > 1 and is_placeholder(raw[-1]):
        raw = raw[:-1]
    turns = parse_conversation(raw, PROMPT_KEY, tools=obj.get(TOOLS), final=None)
    columns = {k: v for k, v in obj.items() if k not in (PROMPT_KEY, TOOLS)}
    if turns[-1]["role"] == "assistant":
        if REFERENCE in columns:
            raise RecordError("conflicting_field", "the record has its own 'reference' and a final assistant turn "
                              "(which becomes 'reference'); keep one", REFERENCE)
        columns[REFERENCE] = turns[-1]["content"]
        turns = turns[:-1]
    if not turns or turns[-1]["role"] not in PROMPT_ENDS:
        raise RecordError("bad_role_order", "a prompt must end with a user or tool turn (after an optional final "
                          "assistant answer, which is kept as 'reference', or placeholder)", PROMPT_KEY)
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
