"""The OpenAI conversation / tool schema: validate chat turns, tools and tool calls, and normalise them.

Every failure is one :class:`SchemaError` holding a ``reason`` (a short snake_case kind), a ``message`` and
the ``field`` path of the offending value (``conversations[2].tool_calls[0].function.name``). The error is
neutral: ``preprocess/`` maps it to a record error (``file:line: field``), ``serve/`` to a 400 whose
``param`` is the field.

Shapes (:class:`Shapes` says which are accepted; :data:`API_SHAPES` is OpenAI's wire format,
:data:`RECORD_SHAPES` adds what data files such as MiniMind's hold):
- a tool definition: ``{"type": "function", "function": {"name", "description"?, "parameters"?}}``; flat
  ``{"name", "description"?, "parameters"?}`` (record shapes). Names match :data:`FUNCTION_NAME` and are
  unique within a list. Definitions are kept as given (a flat one renders flat, as its data file has it).
- a tool call: ``{"id"?, "type"?: "function", "function": {"name", "arguments"}}``; flat ``{"id"?, "name",
  "arguments"}`` (record shapes). ``arguments`` is a JSON object or a string holding one (kept verbatim).
- a list of definitions or calls may arrive as a JSON string holding the list (record shapes).
- ``None``, ``""`` and ``[]`` (and a JSON string of an empty list) count as absent.

Conversation (:func:`parse_conversation`): an optional leading ``system`` turn, then ``user`` first;
``user`` -> ``assistant``; an assistant turn without calls -> ``user``; an assistant turn with N calls ->
1..N ``tool`` turns -> ``assistant``. Results pair with calls in order: the k-th tool turn after a calling
turn answers its k-th call; a ``tool_call_id``, when given and the calls have ids, must name one of them.
An assistant turn without ``tool_calls`` whose content holds N ``<tool_call>`` blocks (a model's raw output)
may be followed by ``user`` or by 1..N ``tool`` turns.
``tools`` belong on the record (passed as ``tools``) or on the leading system turn, not both;
``reasoning_content`` and ``tool_calls`` on assistant turns only. Contents are non-empty strings of valid
Unicode; a calling assistant turn may have an empty or null content. A blank ``reasoning_content`` is
absent; a given one holds no ``</think>``, and a turn that has it holds no ``<think>`` in its content. The
roles ``function`` and ``ipython`` are refused by name (``unsupported_field``); other roles are unknown
(``bad_role``).

Normalised turn form (what ``core.chat_template`` renders; only these keys):
- ``{"role": "system" | "user", "content": str}``; the leading system turn also holds ``"tools": [...]``
  when the conversation lists tools (a system turn with empty content is added when there is none);
- ``{"role": "assistant", "content": str, "reasoning_content"?: str, "tool_calls"?: [{"id"?: str,
  "type": "function", "function": {"name": str, "arguments": str | dict}}]}``;
- ``{"role": "tool", "content": str, "tool_call_id"?: str, "name"?: str}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from core.chat_template import THINK_CLOSE, THINK_OPEN, TOOL_CALL_OPEN

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
ROLES = ("system", "user", "assistant", "tool")
TOOL_ROLE = "tool"
RICH_KEYS = ("reasoning_content", "tool_calls", "tools")  # the keys beyond {"role", "content"}
OTHER_TOOL_ROLES = ("function", "ipython")  # older spellings of a tool result: refused by name
RICH_HINT = "tinylm renders tool calls, tools, reasoning_content and 'tool' turns"
_PLAIN = frozenset(("role", "content"))


class SchemaError(ValueError):
    """A value outside the schema: ``reason`` (a snake_case kind), ``message`` and the ``field`` path."""

    def __init__(self, reason: str, message: str, field: str | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.reason, self.message, self.field = reason, message, field


@dataclass(frozen=True)
class Shapes:
    """Which shapes beyond OpenAI's wire format are accepted."""

    json_strings: bool  # tools / tool_calls as a JSON string holding the list
    flat: bool  # flat tool definitions {"name", ...} and flat calls {"name", "arguments"}


API_SHAPES = Shapes(json_strings=False, flat=False)
RECORD_SHAPES = Shapes(json_strings=True, flat=True)


def present(value: object) -> bool:
    """Whether a field counts as given (``None``, ``""`` and ``[]`` do not)."""
    return value is not None and value != "" and value != []


def check_text(value: object, field: str, allow_empty: bool = False) -> str:
    """``value`` when it is a string of valid Unicode (no lone UTF-16 surrogate), non-blank unless
    ``allow_empty``."""
    if value is None:
        raise SchemaError("missing_field", "missing", field)
    if not isinstance(value, str):
        raise SchemaError("bad_type", f"expected a string, got {type(value).__name__}", field)
    if not allow_empty and not value.strip():
        raise SchemaError("empty_content", "empty", field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SchemaError("bad_unicode", f"lone UTF-16 surrogate {value[e.start]!r} at character {e.start + 1}",
                          field) from None
    return value


def _expect(value: object, kind: type, what: str, field: str) -> None:
    if not isinstance(value, kind):
        raise SchemaError("bad_type", f"expected {what}, got {type(value).__name__}", field)


def _decoded(value: object, field: str, shapes: Shapes, reason: str) -> object:
    """A JSON string's value when the shapes allow JSON strings, else ``value`` itself."""
    if not (shapes.json_strings and isinstance(value, str)):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise SchemaError(reason, f"a string that is not JSON ({e.msg} at column {e.colno})", field) from None
    except RecursionError:
        raise SchemaError(reason, "a JSON string nested too deeply", field) from None


def _not_function(kind: object, reason: str, where: str) -> SchemaError:
    return SchemaError(reason, f"expected \"type\": \"function\", got {kind!r}", where)


def tool_name(tool: dict) -> str:
    """The function name of a validated definition, wrapped or flat."""
    function = tool.get("function")
    return (function if isinstance(function, dict) else tool)["name"]


def parse_tools(value: object, field: str = "tools", shapes: Shapes = RECORD_SHAPES) -> list[dict]:
    """The validated list of function definitions (entries kept as given; a JSON string is decoded)."""
    value = _decoded(value, field, shapes, "bad_tools")
    _expect(value, list, "a list of function definitions", field)
    names: set[str] = set()
    for i, tool in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(tool, dict):
            raise SchemaError("bad_tools", f"expected a function definition object, got {type(tool).__name__}", where)
        flat = shapes.flat and "function" not in tool and not (tool.get("type") == "function" and "name" not in tool)
        if flat:
            function, at = tool, where
            if tool.get("type", "function") != "function":
                raise _not_function(tool["type"], "bad_tools", where)
        else:
            if tool.get("type") != "function":
                raise _not_function(tool.get("type"), "bad_tools", where)
            function, at = tool.get("function"), f"{where}.function"
            _expect(function, dict, 'an object {"name", "description", "parameters"}', at)
        name = function.get("name")
        if name is None:
            raise SchemaError("missing_field", "missing", f"{at}.name")
        if not (isinstance(name, str) and FUNCTION_NAME.fullmatch(name)):
            raise SchemaError("bad_tools", f"expected 1-64 letters, digits, _ or -, got {_show(name)}", f"{at}.name")
        if name in names:
            raise SchemaError("bad_tools", f"{name!r} is defined twice", f"{at}.name")
        names.add(name)
        if function.get("description") is not None:
            _expect(function["description"], str, "a string", f"{at}.description")
        if function.get("parameters") is not None:
            _expect(function["parameters"], dict, "a JSON-schema object", f"{at}.parameters")
    return value


def parse_arguments(value: object, field: str) -> str | dict:
    """Call arguments: a JSON object, or a string holding one (returned verbatim: it renders as given)."""
    if value is None:
        raise SchemaError("missing_field", "missing", field)
    if isinstance(value, str):
        try:
            decoded = json.loads(check_text(value, field))
        except json.JSONDecodeError as e:
            raise SchemaError("bad_arguments", f"not JSON ({e.msg} at column {e.colno})", field) from None
        except RecursionError:
            raise SchemaError("bad_arguments", "JSON nested too deeply", field) from None
    else:
        decoded = value
    if not isinstance(decoded, dict):
        raise SchemaError("bad_arguments", f"expected a JSON object, got {type(decoded).__name__}", field)
    return value


def parse_tool_calls(value: object, field: str, tool_names: set[str] | None = None,
                     shapes: Shapes = RECORD_SHAPES) -> list[dict]:
    """Validated calls in the normalised form ``{"id"?, "type": "function", "function": {"name",
    "arguments"}}``; with ``tool_names`` (the listed tools), a call to another name is refused."""
    value = _decoded(value, field, shapes, "bad_tool_call")
    _expect(value, list, "a list of tool calls", field)
    calls = []
    for i, call in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(call, dict):
            raise SchemaError("bad_tool_call", f"expected a tool call object, got {type(call).__name__}", where)
        if call.get("type", "function") != "function":
            raise _not_function(call["type"], "bad_tool_call", where)
        if shapes.flat and "function" not in call:
            function, at = call, where
        else:
            function, at = call.get("function"), f"{where}.function"
            _expect(function, dict, 'an object {"name", "arguments"}', at)
        name = check_text(function.get("name"), f"{at}.name")
        if tool_names is not None and name not in tool_names:
            raise SchemaError("unknown_tool", f"calls {name!r}, which the record's tools list does not define",
                              f"{at}.name")
        out = {"type": "function", "function": {"name": name,
                                                "arguments": parse_arguments(function.get("arguments"),
                                                                             f"{at}.arguments")}}
        if call.get("id") is not None:
            out = {"id": check_text(call["id"], f"{where}.id"), **out}
        calls.append(out)
    return calls


def given(value: object) -> bool:
    """Present and, for a string, not blank (a blank reasoning_content is no reasoning)."""
    return present(value) and not (isinstance(value, str) and not value.strip())


def parse_reasoning(value: object, content: str, field: str) -> str:
    """An assistant turn's ``reasoning_content``: text without ``</think>``, beside a content without ``<think>``."""
    reasoning = check_text(value, field)
    if THINK_CLOSE in reasoning:
        raise SchemaError("bad_reasoning", f"holds {THINK_CLOSE}, which would end the thinking early", field)
    if THINK_OPEN in content:
        raise SchemaError("bad_reasoning", f"the turn has reasoning_content and a {THINK_OPEN} block in its "
                          "content: keep one", field)
    return reasoning


def parse_assistant(turn: dict, field: str, tool_names: set[str] | None = None,
                    shapes: Shapes = RECORD_SHAPES) -> dict:
    """One assistant turn in the normalised form (content, then reasoning_content and tool_calls if any)."""
    raw_calls = turn.get("tool_calls")
    calls = parse_tool_calls(raw_calls, f"{field}.tool_calls", tool_names, shapes) if present(raw_calls) else []
    content = turn.get("content")
    out: dict = {"role": "assistant",
                 "content": check_text("" if content is None and calls else content, f"{field}.content",
                                       allow_empty=bool(calls))}
    if given(turn.get("reasoning_content")):
        out["reasoning_content"] = parse_reasoning(turn["reasoning_content"], out["content"],
                                                   f"{field}.reasoning_content")
    if calls:
        out["tool_calls"] = calls
    return out


def parse_tool_result(turn: dict, field: str, calls: Sequence[dict] = ()) -> dict:
    """One tool turn in the normalised form; a ``tool_call_id`` must name one of ``calls`` when they have ids."""
    out = {"role": TOOL_ROLE, "content": check_text(turn.get("content"), f"{field}.content")}
    if turn.get("tool_call_id") is not None:
        call_id = check_text(turn["tool_call_id"], f"{field}.tool_call_id")
        ids = {c["id"] for c in calls if "id" in c}
        if ids and call_id not in ids:
            raise SchemaError("bad_tool_call_id", f"{call_id!r} is not the id of a call in the assistant turn before",
                              f"{field}.tool_call_id")
        out["tool_call_id"] = call_id
    if turn.get("name") is not None:
        out["name"] = check_text(turn["name"], f"{field}.name")
    return out


def _show(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 40 else f"{text[:37]}..."


def _listed_tools(tools: object, tools_field: str, system: dict | None, field: str,
                  shapes: Shapes) -> list[dict] | None:
    """The conversation's tools, from the record (``tools``) or its leading system turn (refused on both)."""
    on_record = present(tools)
    on_system = system is not None and present(system.get("tools"))
    if on_record and on_system:
        raise SchemaError("misplaced_field", "tools on both the record and the system turn: keep one",
                          f"{field}[0].tools")
    if on_record:
        return parse_tools(tools, tools_field, shapes)
    return parse_tools(system["tools"], f"{field}[0].tools", shapes) if on_system else None  # type: ignore[index]


def _check_role(turn: object, where: str, index: int, allowed: tuple[str, ...]) -> str:
    """The role of a turn that goes the full way: an object, a known role, its keys where they belong, in order."""
    _expect(turn, dict, "an object", where)
    role = turn.get("role")  # type: ignore[union-attr]
    if isinstance(role, str) and role in OTHER_TOOL_ROLES:
        raise SchemaError("unsupported_field", f"role {role!r}: {RICH_HINT}; write results as 'tool' turns",
                          f"{where}.role")
    if role not in ROLES:
        raise SchemaError("bad_role", f"unknown role {role!r}", f"{where}.role")
    for key in RICH_KEYS:
        if not present(turn.get(key)):  # type: ignore[union-attr]
            continue
        if key == "tools" and not (index == 0 and role == "system"):
            raise SchemaError("misplaced_field", "tools belong on the record or on the leading system turn",
                              f"{where}.tools")
        if key != "tools" and role != "assistant":
            raise SchemaError("misplaced_field", f"only assistant turns carry {key}", f"{where}.{key}")
    if role not in allowed and not (index == 0 and role == "system"):
        raise SchemaError("bad_role_order", f"expected {' or '.join(map(repr, allowed))}, got {role!r}",
                          f"{where}.role")
    return role


def parse_conversation(turns: object, field: str = "conversations", *, tools: object = None,
                       tools_field: str = "tools", final: tuple[str, ...] | None = ("assistant",),
                       shapes: Shapes = RECORD_SHAPES) -> list[dict]:
    """The validated turns of a conversation in the normalised form (see the module docstring).

    ``tools``: the record's own tools list (at ``tools_field``), if any; ``final``: the roles the last turn
    may have (None: any). A plain turn (only ``role`` and ``content``, in the expected role) costs one key
    check and the content check."""
    if turns is None:
        raise SchemaError("missing_field", "missing", field)
    if not isinstance(turns, list) or not turns:
        raise SchemaError("bad_type", "expected a non-empty list of turns", field)
    first = turns[0]
    system = first if isinstance(first, dict) and first.get("role") == "system" else None
    listed = _listed_tools(tools, tools_field, system, field, shapes)
    names = {tool_name(t) for t in listed} if listed else None
    out: list[dict] = []
    allowed: tuple[str, ...] = ("user",)
    calls: list[dict] = []
    answered = made = 0
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if type(turn) is dict and turn.keys() <= _PLAIN and (role := turn.get("role")) in allowed and role != TOOL_ROLE:
            content = check_text(turn.get("content"), f"{where}.content")
            out.append({"role": role, "content": content})
            if role == "user":
                allowed = ("assistant",)
            else:
                calls, answered, made = [], 0, content.count(TOOL_CALL_OPEN)
                allowed = ("user", TOOL_ROLE) if made else ("user",)
            continue
        role = _check_role(turn, where, i, allowed)
        if role == "assistant":
            out.append(parse_assistant(turn, where, names, shapes))  # type: ignore[arg-type]
            calls, answered = out[-1].get("tool_calls", []), 0
            made = len(calls) or out[-1]["content"].count(TOOL_CALL_OPEN)  # calls written into the content
            allowed = (TOOL_ROLE,) if calls else ("user", TOOL_ROLE) if made else ("user",)
        elif role == TOOL_ROLE:
            out.append(parse_tool_result(turn, where, calls))  # type: ignore[arg-type]
            answered += 1
            allowed = (TOOL_ROLE, "assistant") if answered < made else ("assistant",)
        else:
            content = turn.get("content")  # type: ignore[union-attr]
            empty_ok = role == "system" and bool(listed) and content in (None, "")  # a system turn of tools only
            out.append({"role": role, "content": "" if empty_ok else check_text(content, f"{where}.content")})
            allowed = ("assistant",) if role == "user" else ("user",)
    if final is not None and out[-1]["role"] not in final:
        raise SchemaError("bad_role_order", f"the last turn must be {' or '.join(map(repr, final))}",
                          f"{field}[{len(out) - 1}].role")
    if listed:
        out = [{**out[0], "tools": listed}, *out[1:]] if system is not None else [
            {"role": "system", "content": "", "tools": listed}, *out]
    return out
