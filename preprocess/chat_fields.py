"""Validate sft / reason conversations that carry thinking and tool calls (OpenAI / MiniMind-3 fields).

A record takes this path when it has any of (``None``, ``""`` and ``[]`` count as absent):
- ``tools``: OpenAI function definitions ``[{"type": "function", "function": {"name", "description"?,
  "parameters"?}}]``, on the record or on the leading system turn (not both; that turn's content may then be
  empty), a list or a JSON string of one;
- ``reasoning_content`` (assistant turns): the thinking, a string without ``</think>``, and then the
  content holds no ``<think>`` block of its own;
- ``tool_calls`` (assistant turns): ``[{"id"?, "type"?: "function", "function": {"name", "arguments"}}]``,
  ``arguments`` a JSON object or a string holding one; a name the record's tools list lacks is refused;
  such a turn's ``content`` may be empty or null;
- ``tool`` turns: ``content`` (the result), optional ``tool_call_id`` (one of the calls' ids, when the calls
  have ids) and ``name``.

Turn order: an optional system turn, then ``user`` first; ``user`` -> ``assistant``; an assistant turn
with calls -> one or more ``tool`` turns -> ``assistant``; the last turn is ``assistant``. Every failure is
one :class:`~preprocess.records.RecordError` naming the field (``conversations[2].tool_calls[0].function.
arguments``). The turns come back normalized (only the known keys; record-level tools moved onto the system
turn, an empty system turn added when there is none: it renders as the tools block alone), ready for
``core.chat_template.render_pieces``, which reads the tools from the system turn.
"""

from __future__ import annotations

import json

from core.chat_template import THINK_CLOSE, THINK_OPEN, tool_call_text
from preprocess.records import RecordError, _content, _expected_role

RICH_KEYS = ("reasoning_content", "tool_calls", "tools")
TOOL_ROLE = "tool"


def _present(value: object) -> bool:
    return value is not None and value != "" and value != []


def has_rich_fields(obj: dict, key: str = "conversations") -> bool:
    """Whether the record needs this module: a tools list, a tool turn or a rich key on a turn (cheap:
    a plain ``{"role", "content"}`` turn costs one ``len`` and one lookup)."""
    if _present(obj.get("tools")):
        return True
    turns = obj.get(key)
    if not isinstance(turns, list):
        return False
    for turn in turns:
        if isinstance(turn, dict) and (turn.get("role") == TOOL_ROLE
                                       or len(turn) > 2 and any(_present(turn.get(k)) for k in RICH_KEYS)):
            return True
    return False


def _type(value: object, expected: type, what: str, field: str) -> None:
    if not isinstance(value, expected):
        raise RecordError("bad_type", f"expected {what}, got {type(value).__name__}", field)


def parse_tools(value: object, field: str) -> list[dict]:
    """A validated tools list (a JSON string of one is decoded); each entry an OpenAI function definition."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RecordError("bad_tools", f"a string that is not JSON ({e.msg} at column {e.colno})", field) from None
    _type(value, list, "a list of function definitions", field)
    for i, tool in enumerate(value):
        where = f"{field}[{i}]"
        _type(tool, dict, "an object", where)
        if tool.get("type") != "function":
            raise RecordError("bad_tools", f"expected \"type\": \"function\", got {tool.get('type')!r}",
                              f"{where}.type")
        function = tool.get("function")
        _type(function, dict, 'an object {"name", "description", "parameters"}', f"{where}.function")
        _content(function.get("name"), f"{where}.function.name")
        if function.get("description") is not None:
            _type(function["description"], str, "a string", f"{where}.function.description")
        if function.get("parameters") is not None:
            _type(function["parameters"], dict, "a JSON-schema object", f"{where}.function.parameters")
    return value


def _arguments(value: object, field: str) -> str | dict:
    """Arguments: a JSON object, or a string holding one (kept verbatim: it renders as given)."""
    if value is None:
        raise RecordError("missing_field", "missing", field)
    if isinstance(value, str):
        try:
            decoded = json.loads(_content(value, field))
        except json.JSONDecodeError as e:
            raise RecordError("bad_arguments", f"not JSON ({e.msg} at column {e.colno})", field) from None
    else:
        decoded = value
    if not isinstance(decoded, dict):
        raise RecordError("bad_arguments", f"expected a JSON object, got {type(decoded).__name__}", field)
    return value


def parse_tool_calls(value: object, field: str, tool_names: set[str] | None) -> list[dict]:
    """Validated, normalized calls ``{"id"?, "type": "function", "function": {"name", "arguments"}}``."""
    _type(value, list, "a list of tool calls", field)
    calls = []
    for i, call in enumerate(value):
        where = f"{field}[{i}]"
        _type(call, dict, "an object", where)
        if call.get("type", "function") != "function":
            raise RecordError("bad_tool_call", f"expected \"type\": \"function\", got {call['type']!r}",
                              f"{where}.type")
        function = call.get("function")
        _type(function, dict, 'an object {"name", "arguments"}', f"{where}.function")
        name = _content(function.get("name"), f"{where}.function.name")
        if tool_names is not None and name not in tool_names:
            raise RecordError("unknown_tool", f"calls {name!r}, which the record's tools list does not define",
                              f"{where}.function.name")
        out = {"type": "function", "function": {"name": name,
                                                "arguments": _arguments(function.get("arguments"),
                                                                        f"{where}.function.arguments")}}
        if call.get("id") is not None:
            out = {"id": _content(call["id"], f"{where}.id"), **out}
        calls.append(out)
    return calls


def _assistant(turn: dict, field: str, tool_names: set[str] | None) -> dict:
    out: dict = {"role": "assistant"}
    calls = parse_tool_calls(turn["tool_calls"], f"{field}.tool_calls", tool_names) if _present(
        turn.get("tool_calls")) else []
    content = turn.get("content")
    out["content"] = "" if calls and (content is None or content == "") else _content(content, f"{field}.content")
    if _present(turn.get("reasoning_content")):
        reasoning = _content(turn["reasoning_content"], f"{field}.reasoning_content")
        if THINK_CLOSE in reasoning:
            raise RecordError("bad_reasoning", f"holds {THINK_CLOSE}, which would end the thinking early",
                              f"{field}.reasoning_content")
        if THINK_OPEN in out["content"]:
            raise RecordError("bad_reasoning", f"the turn has reasoning_content and a {THINK_OPEN} block in its "
                              "content: keep one", f"{field}.reasoning_content")
        out["reasoning_content"] = reasoning
    if calls:
        out["tool_calls"] = calls
    return out


def _tool(turn: dict, field: str, call_ids: set[str]) -> dict:
    out = {"role": TOOL_ROLE, "content": _content(turn.get("content"), f"{field}.content")}
    if turn.get("tool_call_id") is not None:
        call_id = _content(turn["tool_call_id"], f"{field}.tool_call_id")
        if call_ids and call_id not in call_ids:
            raise RecordError("bad_tool_call_id", f"{call_id!r} is not the id of a call in the assistant turn "
                              "before", f"{field}.tool_call_id")
        out["tool_call_id"] = call_id
    if turn.get("name") is not None:
        out["name"] = _content(turn["name"], f"{field}.name")
    return out


def _refuse_misplaced(turn: dict, role: str, field: str, index: int) -> None:
    """Rich keys only where they belong: tools on the first (system) turn, the rest on assistant turns."""
    for key in RICH_KEYS:
        if not _present(turn.get(key)):
            continue
        if key == "tools" and not (index == 0 and role == "system"):
            raise RecordError("misplaced_field", "tools belong on the record or on the leading system turn",
                              f"{field}.tools")
        if key != "tools" and role != "assistant":
            raise RecordError("misplaced_field", f"only assistant turns carry {key}", f"{field}.{key}")


def _expected(prev: dict | None, has_system: bool, index: int) -> tuple[str, ...]:
    """The roles allowed at ``index`` after turn ``prev`` (the normalized one before)."""
    if prev is None or prev["role"] == "system":
        return (_expected_role(index, has_system),)
    if prev["role"] == "user":
        return ("assistant",)
    if prev["role"] == TOOL_ROLE:
        return (TOOL_ROLE, "assistant")
    return (TOOL_ROLE,) if prev.get("tool_calls") else ("user",)


def parse_chat(obj: dict, key: str = "conversations") -> list[dict]:
    """The validated, normalized turns of a record with rich fields (see the module docstring)."""
    turns = obj.get(key)
    if turns is None:
        raise RecordError("missing_field", "missing", key)
    if not isinstance(turns, list) or not turns:
        raise RecordError("bad_type", "expected a non-empty list of turns", key)
    has_system = isinstance(turns[0], dict) and turns[0].get("role") == "system"
    tools = _record_tools(obj, turns, key, has_system)
    tool_names = {t["function"]["name"] for t in tools} if tools else None
    out: list[dict] = []
    for i, turn in enumerate(turns):
        field = f"{key}[{i}]"
        _type(turn, dict, "an object", field)
        role = turn.get("role")
        if role not in ("system", "user", "assistant", TOOL_ROLE):
            raise RecordError("bad_role", f"unknown role {role!r}", f"{field}.role")
        _refuse_misplaced(turn, role, field, i)
        allowed = _expected(out[-1] if out else None, has_system, i)
        if role not in allowed:
            raise RecordError("bad_role_order", f"expected {' or '.join(map(repr, allowed))}, got {role!r}",
                              f"{field}.role")
        if role == "assistant":
            out.append(_assistant(turn, field, tool_names))
        elif role == TOOL_ROLE:
            calls = next(t for t in reversed(out) if t["role"] == "assistant")["tool_calls"]
            out.append(_tool(turn, field, {c["id"] for c in calls if "id" in c}))
        elif i == 0 and role == "system" and tools and turn.get("content") in (None, ""):
            out.append({"role": role, "content": ""})  # a system turn that only holds the tools
        else:
            out.append({"role": role, "content": _content(turn.get("content"), f"{field}.content")})
    if out[-1]["role"] != "assistant":
        raise RecordError("bad_role_order", "the last turn must be 'assistant'", f"{key}[{len(out) - 1}].role")
    if tools:
        out = [{**out[0], "tools": tools}, *out[1:]] if has_system else [
            {"role": "system", "content": "", "tools": tools}, *out]
    return out


def _record_tools(obj: dict, turns: list, key: str, has_system: bool) -> list[dict] | None:
    """The tools list, from the record or the system turn (refused when on both)."""
    on_record = _present(obj.get("tools"))
    on_system = has_system and _present(turns[0].get("tools"))
    if on_record and on_system:
        raise RecordError("misplaced_field", "tools on both the record and the system turn: keep one",
                          f"{key}[0].tools")
    if on_record:
        return parse_tools(obj["tools"], "tools")
    return parse_tools(turns[0]["tools"], f"{key}[0].tools") if on_system else None


def chat_texts(turns: list[dict]) -> list[str]:
    """The strings a conversation holds, for tokenizer training: contents, thinking, call lines, schemas."""
    texts = []
    for turn in turns:
        texts += [json.dumps(tool, ensure_ascii=False) for tool in turn.get("tools") or ()]
        texts += [turn["reasoning_content"]] if turn.get("reasoning_content") else []
        texts += [turn["content"]] if turn["content"] else []
        texts += [tool_call_text(call) for call in turn.get("tool_calls") or ()]
    return texts
