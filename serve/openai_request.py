"""OpenAI chat-completion requests: untrusted JSON in, a validated :class:`~serve.engine.Sampling` out.

Contract: :func:`parse_body` turns the raw body into a JSON object whose every number is finite and every
string is text (``NaN``, ``Infinity``, floats that overflow and integers over ``MAX_INT_DIGITS`` digits parse
to a marker that is refused with ``param`` naming where it was; a lone UTF-16 surrogate in any string or key
and nesting deeper than ``MAX_DEPTH`` are refused too); :func:`validate` checks every field against OpenAI's
schema and this server's limits and encodes the prompt (content as text, never control tokens, by
``core.tokenizer.prompt_ids``). Every refusal is an :class:`APIError` carrying the HTTP status and an
OpenAI-style ``{"error": {"message", "type", "param", "code"}}`` body: a wrong type (booleans are not
numbers), an out-of-range value, a feature this server does not implement and text the tokenizer refuses are
400 with ``param``. Pure functions of the body and the engine's tokenizer and context; no web framework.

Thinking and tools: ``tools``, the history's ``tool_calls`` and ``reasoning_content`` are checked by
``core.chat_schema`` (the rules pack applies to records, in OpenAI's wire shapes: wrapped definitions and
calls, no JSON strings; a schema error is a 400 whose ``param`` is its field). ``tools`` are rendered into
the system turn by the template; ``tool_choice`` ``"auto"`` (default) lets the model decide, ``"none"``
renders no tools (and the parser is offered none, so a call the model writes anyway is text), ``"required"``
prefills ``<tool_call>\n`` and ``{"type": "function", "function": {"name": N}}`` also the call's name (both cut
from the template's own rendering of a call; their ids are the parser's ``prefill``).
``chat_template_kwargs.enable_thinking`` is the parser's ``thinking``. A ``tool`` message must answer a call
of the assistant message before its run of tool messages (:func:`check_tool_answers`).
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass, replace
from typing import Any

from core import chat_schema
from core.chat_families import TINYLM, ChatFamily
from core.chat_schema import API_SHAPES, SchemaError, given, parse_reasoning, parse_tool_calls
from core.chat_template import CONTROL, TEXT, Piece, render_text
from core.completion import CALL_CLOSE, CALL_OPEN
from core.errors import TinyLMError
from core.tokenizer import TokenizerInfo, encode_documents, prompt_ids
from serve.engine import Engine, Sampling

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_DEPTH = 32  # nesting of arrays/objects in a request body
MAX_INT_DIGITS = 40  # longer integer literals are refused without converting them
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 256  # characters per stop string (the filter's hold-back is O(length) per token)
MAX_TOOLS = 128  # function definitions per request (OpenAI's limit)
MAX_CHOICES = 16  # choices per request (n times the prompts): each is one generation
MAX_TOP_LOGPROBS = 20  # chat completions' top_logprobs (OpenAI's limit)
SEED_LIMIT = 1 << 63  # seeds are in [0, 2^63)
_SURROGATE = re.compile("[\ud800-\udfff]")


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status (and optional extra headers)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- untrusted JSON -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Refused:
    """What the parser puts in place of a number the server will not take (NaN, Infinity, 1e999, 10**99)."""

    text: str
    why: str


def _parse_float(text: str) -> float | Refused:
    value = float(text)
    return value if math.isfinite(value) else Refused(text, "overflows a 64-bit float")


def _parse_int(text: str) -> int | Refused:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        return Refused(f"{text[:12]}...", f"has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _parse_constant(text: str) -> Refused:
    return Refused(text, "is not a finite number")


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def check_tree(body: Any) -> None:
    """Walk the parsed body (iteratively: depth is bounded here, not by the C stack) and refuse the first
    Refused number, lone surrogate (in a string or a key) or nesting deeper than MAX_DEPTH, naming its path."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, Refused):
            raise APIError(400, f"'{path}' {value.why}: {value.text}", path, "invalid_value")
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise APIError(400, f"'{path}' contains a lone UTF-16 surrogate, which is not text", path,
                               "invalid_value")
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth >= MAX_DEPTH:
            raise APIError(400, f"'{path}' is nested deeper than {MAX_DEPTH} levels", path, "invalid_value")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in reversed(list(items)):  # reversed: the first item is checked first
            where = _join(path, key)
            if isinstance(key, str) and _SURROGATE.search(key):
                raise APIError(400, f"a key in '{path or 'the body'}' contains a lone UTF-16 surrogate",
                               path or None, "invalid_value")
            stack.append((item, where, depth + 1))


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object whose every number is finite and every string is valid text."""
    try:
        body = json.loads(raw, parse_float=_parse_float, parse_int=_parse_int, parse_constant=_parse_constant)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply to parse", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError (bytes that are not UTF-8)
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    check_tree(body)
    return body


# ---- request validation ------------------------------------------------------------------------------------

def show_value(value: Any) -> str:
    """A short, safe rendering of a client's value for an error message."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else f"{text[:37]}..."


def number_field(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"'{name}' must be a number, got {show_value(value)}", name, "invalid_type")
    if value < low or (low_open and value == low) or value > high:
        span = f"{'(' if low_open else '['}{low}, {high}]"
        raise APIError(400, f"'{name}' must be in {span}, got {show_value(value)}", name, "invalid_value")
    return float(value)


def integer_field(body: dict, name: str, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {show_value(value)}", name, "invalid_type")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise APIError(400, f"'{name}' must be in {span}, got {show_value(value)}", name, "invalid_value")
    return value


def flag_field(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        param = param or name
        raise APIError(400, f"'{param}' must be a boolean, got {show_value(value)}", param, "invalid_type")
    return value


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None and message.get("role") == "assistant" and message.get("tool_calls"):
        return ""  # an assistant turn that only calls tools
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               f"messages[{i}].content", "invalid_value")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                   f"messages[{i}].content", "invalid_type")


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array", "messages", "invalid_value")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if not (isinstance(role, str) and role in ROLES):
            raise APIError(400, f"messages[{i}].role {show_value(role)} is not supported; use one of "
                           "system, developer, user, assistant, tool", f"messages[{i}].role", "invalid_value")
        turn = {"role": ROLES[role], "content": _content(m, i)}
        if role == "assistant":
            turn.update(_assistant_fields(m, turn["content"], i))
        elif role == "tool":
            turn.update(_tool_fields(m, i))
        turns.append(turn)
    return turns


def _optional_string(message: dict, name: str, where: str) -> dict:
    """``{name: value}`` when the message has a string ``name``, {} when absent or null, else 400."""
    value = message.get(name)
    if value is None:
        return {}
    if not isinstance(value, str):
        raise APIError(400, f"{where}.{name} must be a string, got {show_value(value)}", f"{where}.{name}",
                       "invalid_type")
    return {name: value}


def _schema(error: SchemaError) -> APIError:
    """The 400 of a schema error: ``param`` is its field; a value of the wrong JSON type is ``invalid_type``."""
    return APIError(400, f"{error.field}: {error.message}", error.field,
                    "invalid_type" if error.reason == "bad_type" else "invalid_value")


def _assistant_fields(message: dict, content: str, i: int) -> dict:
    """``reasoning_content`` and ``tool_calls`` of an assistant history turn, validated by ``core.chat_schema``
    (OpenAI's wire shapes: wrapped calls, no JSON strings; the names are not checked against ``tools``)."""
    fields: dict = {}
    try:
        if given(message.get("reasoning_content")):
            fields["reasoning_content"] = parse_reasoning(message["reasoning_content"], content,
                                                          f"messages[{i}].reasoning_content")
        calls = message.get("tool_calls")
        if calls is None:
            return fields
        where = f"messages[{i}].tool_calls"
        if not isinstance(calls, list) or not calls:
            raise APIError(400, f"{where} must be a non-empty array", where, "invalid_value")
        fields["tool_calls"] = parse_tool_calls(calls, where, shapes=API_SHAPES)
    except SchemaError as e:
        raise _schema(e) from None
    return fields


def _tool_fields(message: dict, i: int) -> dict:
    where = f"messages[{i}]"
    return {**_optional_string(message, "tool_call_id", where), **_optional_string(message, "name", where)}


def check_tool_answers(turns: list[dict]) -> None:
    """Each ``tool`` message answers one call of the assistant message before its run of tool messages: a 400
    on ``messages[i].role`` when no call is left to answer, on ``messages[i].tool_call_id`` when the id names
    none of the calls not yet answered (a message without an id answers the next call)."""
    open_calls: list[str | None] = []  # ids of the calls not yet answered (None: a call without an id)
    for i, turn in enumerate(turns):
        if turn["role"] != "tool":
            open_calls = [call.get("id") for call in turn.get("tool_calls", ())]
            continue
        where = f"messages[{i}]"
        if not open_calls:
            raise APIError(400, f"{where} has role 'tool' but answers no call: it must follow an assistant message "
                           "with 'tool_calls' (one tool message per call)", f"{where}.role", "invalid_value")
        answered = turn.get("tool_call_id")
        if answered is None:
            open_calls.pop(0)
        elif answered in open_calls:
            open_calls.remove(answered)
        else:
            raise APIError(400, f"{where}.tool_call_id {show_value(answered)} is not the id of an unanswered call of "
                           "the preceding assistant message", f"{where}.tool_call_id", "invalid_value")


def parse_tools(body: dict) -> list[dict] | None:
    """The request's function definitions (``core.chat_schema.parse_tools`` with OpenAI's wire shapes: names of
    1-64 letters, digits, ``_`` or ``-``, each defined once), as ``[{"type": "function", "function": {"name",
    "description"?, "parameters"?}}]`` (None when there are none)."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise APIError(400, f"'tools' must be an array of at most {MAX_TOOLS} tools", "tools", "invalid_value")
    try:
        tools = chat_schema.parse_tools(tools, "tools", API_SHAPES)
    except SchemaError as e:
        raise _schema(e) from None
    return [{"type": "function", "function": {k: t["function"][k] for k in ("name", "description", "parameters")
                                              if t["function"].get(k) is not None}} for t in tools] or None


def parse_tool_choice(body: dict, tools: list[dict] | None) -> tuple[list[dict] | None, str | None]:
    """(tools to render, forced call: None, "" = any function, or a function's name)."""
    choice = body.get("tool_choice")
    if choice is None or choice == "auto":
        return tools, None
    if choice == "none":
        return None, None
    if choice == "required":
        forced = ""
    elif (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
          and isinstance(choice["function"].get("name"), str)):
        forced = choice["function"]["name"]
    else:
        raise APIError(400, "'tool_choice' must be \"auto\", \"none\", \"required\" or "
                       '{"type": "function", "function": {"name": ...}}', "tool_choice", "invalid_value")
    if tools is None:
        raise APIError(400, "'tool_choice' asks for a tool call but the request has no 'tools'", "tool_choice",
                       "invalid_value")
    if forced and forced not in {t["function"]["name"] for t in tools}:
        raise APIError(400, f"'tool_choice' names the function {show_value(forced)}, which is not in 'tools'",
                       "tool_choice", "invalid_value")
    return tools, forced


THINKING_SWITCHES = ("enable_thinking", "open_thinking")  # vLLM / Qwen3's name, MiniMind-3's name


def parse_thinking(body: dict) -> bool | None:
    """The thinking switch: ``enable_thinking`` (vLLM, Qwen3) or ``open_thinking`` (MiniMind-3), in
    ``chat_template_kwargs`` or at the top level of the body; None = the template's default. Values given in
    several places must agree."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise APIError(400, "'chat_template_kwargs' must be an object", "chat_template_kwargs", "invalid_type")
    for key in kwargs or {}:
        if key not in THINKING_SWITCHES:
            raise APIError(400, f"chat_template_kwargs.{key} is not supported (only "
                           f"{' and '.join(THINKING_SWITCHES)})", f"chat_template_kwargs.{key}",
                           "unsupported_parameter")
    found: dict[str, bool] = {}
    for where, params in (("chat_template_kwargs.", kwargs or {}), ("", body)):
        for key in THINKING_SWITCHES:
            value = params.get(key)
            if value is not None and not isinstance(value, bool):
                raise APIError(400, f"{where}{key} must be a boolean, got {show_value(value)}", f"{where}{key}",
                               "invalid_type")
            if value is not None:
                found[where + key] = value
    if len(set(found.values())) > 1:
        raise APIError(400, f"{' and '.join(found)} disagree", next(iter(found)), "invalid_value")
    return next(iter(found.values()), None)


def forced_call_text(name: str, family: ChatFamily = TINYLM) -> str:
    """The start of a forced call: the template's rendering of a call cut before its JSON object
    (``<tool_call>\n``) or, for a named function, before its arguments."""
    call = {"type": "function", "function": {"name": name or "f", "arguments": {}}}
    text = render_text([{"role": "assistant", "content": "", "tool_calls": [call]}], family=family)
    start = text.index(CALL_OPEN)
    end = text.rindex("{}", start, text.index(CALL_CLOSE, start)) if name else text.index("{", start)
    return text[start:end]


def forced_call_ids(tok: TokenizerInfo, text: str) -> list[int]:
    """Ids of a forced call's start: ``<tool_call>`` as its single id where the tokenizer has one, the rest
    as text (like the template encodes a call)."""
    if CALL_OPEN in tok.special_ids:
        pieces = [Piece(CALL_OPEN, CONTROL, False), Piece(text[len(CALL_OPEN):], TEXT, False)]
    else:
        pieces = [Piece(text, TEXT, False)]
    return encode_documents(tok, [[p for p in pieces if p.text]]).ids.tolist()


def parse_stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and len(stop) <= MAX_STOP
            and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
        raise APIError(400, f"'stop' must be a non-empty string or an array of up to {MAX_STOP} non-empty "
                       f"strings of at most {MAX_STOP_CHARS} characters", "stop", "invalid_value")
    return stop


# Request fields for features this server does not implement, with the values that ask for nothing.
UNSUPPORTED = {"logit_bias": (None, {}),
               "functions": (None, []), "function_call": (None, "none", "auto"),
               "response_format": (None, {"type": "text"}),
               "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,)}


def refuse_unsupported(body: dict) -> None:
    """400 for a request that asks for a feature this server would otherwise silently ignore."""
    for name, harmless in UNSUPPORTED.items():
        value = body.get(name)
        if not any(value == h and type(value) is type(h) for h in harmless):
            raise APIError(400, f"'{name}' is not supported by this server, got {show_value(value)}", name,
                           "unsupported_parameter")
    refuse_penalties_and_check_model(body)


def refuse_penalties_and_check_model(body: dict) -> None:
    """400 for OpenAI's presence/frequency penalties (tinylm has repetition_penalty) and a non-string model
    (both endpoints)."""
    for name in ("presence_penalty", "frequency_penalty"):
        if number_field(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise APIError(400, f"'{name}' is not supported (use 'repetition_penalty')", name,
                           "unsupported_parameter")
    if not isinstance(body.get("model", ""), str):
        raise APIError(400, f"'model' must be a string, got {show_value(body['model'])}", "model", "invalid_type")


def check_prompt_size(engine: Engine, turns: list[dict]) -> None:
    """Refuse, without tokenizing, messages whose byte count alone proves they cannot fit the context."""
    if engine.max_token_bytes is None:
        return
    size = sum(len(t["content"].encode("utf-8")) + len(t.get("reasoning_content", "").encode("utf-8"))
               for t in turns)
    least = -(-size // engine.max_token_bytes)
    if least >= engine.context:
        raise APIError(400, f"the messages are {size} bytes, so at least {least} tokens; this model's context is "
                       f"{engine.context} tokens", "messages", "context_length_exceeded")


def encode_prompt(engine: Engine, turns: list[dict], tools: list[dict] | None = None,
                  enable_thinking: bool | None = None) -> list[int]:
    """Prompt ids of ``turns`` (and ``tools``) plus the generation prompt (content encoded as text, never as
    control tokens); text the tokenizer refuses is a 400 on messages. ``prompt_ids`` tokenizes with
    ``encode_batch``, which releases the GIL, so the event loop runs on."""
    try:
        return prompt_ids(engine.tokenizer, turns, tools=tools, enable_thinking=enable_thinking)
    except TinyLMError as e:
        reason = " ".join(str(e).split())[:200]
        raise APIError(400, f"the tokenizer refused the messages ({reason})", "messages", "invalid_value") from None


@dataclass(frozen=True)
class Options:
    """The sampling and streaming fields that chat and text completions share."""

    n: int
    temperature: float
    top_p: float
    repetition_penalty: float
    top_k: int | None
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


def parse_options(body: dict) -> Options:
    """The shared fields (``n`` in [1, MAX_CHOICES]), each checked against OpenAI's schema."""
    n = integer_field(body, "n", 1, MAX_CHOICES)
    temperature = number_field(body, "temperature", 1.0, 0.0, 2.0)
    top_p = number_field(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    repetition_penalty = number_field(body, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True)
    top_k = integer_field(body, "top_k", 0)
    stream = flag_field(body, "stream")
    options = {} if body.get("stream_options") is None else body["stream_options"]
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = flag_field(options, "include_usage", "stream_options.include_usage")
    seed = integer_field(body, "seed", 0, SEED_LIMIT - 1)
    return Options(n or 1, temperature, top_p, repetition_penalty, top_k or None, seed, parse_stop(body), stream,
                   include_usage)


@dataclass(frozen=True)
class Conversation:
    """What a chat request's prompt was rendered from (the server-side tool rounds render the next one):
    the turns, the tools rendered (after ``tool_choice``), the thinking switch, and the answer budget asked
    (``max_tokens`` or ``max_completion_tokens``, None: ``default_max_tokens``)."""

    turns: list[dict]
    tools: list[dict] | None
    thinking: bool | None
    asked: int | None
    default_max_tokens: int


@dataclass(frozen=True)
class Parsed:
    """A validated request: one :class:`Sampling` per prompt, each generated ``n`` times (choice index
    ``prompt * n + i`` with seed ``seed + i``). A chat request also keeps its :class:`Conversation`;
    ``run_tools`` is set by :func:`serve.tool_rounds.check_run_tools`."""

    prompts: list[Sampling]
    n: int
    stream: bool
    include_usage: bool
    conversation: Conversation | None = None
    run_tools: bool = False

    @property
    def prompt_tokens(self) -> int:
        """Usage's prompt tokens: each prompt once, however many choices it has."""
        return sum(len(s.prompt) for s in self.prompts)

    def choices(self) -> list[Sampling]:
        """The Sampling of every choice, in index order."""
        return [replace(s, seed=(s.seed + i) % SEED_LIMIT) for s in self.prompts for i in range(self.n)]


def parse_chat_logprobs(body: dict) -> int | None:
    """``logprobs`` (bool) and ``top_logprobs`` (0..MAX_TOP_LOGPROBS, only with logprobs): the number of
    alternatives to report per token, or None for no log-probabilities."""
    wanted = flag_field(body, "logprobs")
    top = integer_field(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    return (top or 0) if wanted else None


def validate(engine: Engine, body: dict, default_max_tokens: int) -> Parsed:
    """The validated chat request of a parsed body, or an APIError naming the param."""
    turns = parse_messages(body)
    check_tool_answers(turns)
    refuse_unsupported(body)
    o = parse_options(body)
    logprobs = parse_chat_logprobs(body)
    tools, forced = parse_tool_choice(body, parse_tools(body))
    thinking = parse_thinking(body)
    if forced is not None and thinking:
        raise APIError(400, "a forced 'tool_choice' cannot be combined with chat_template_kwargs.enable_thinking="
                       "true (the call would start inside the reasoning)", "tool_choice", "invalid_value")
    family = engine.tokenizer.chat_family
    prefill = [] if forced is None else forced_call_ids(engine.tokenizer, forced_call_text(forced, family))
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    asked = integer_field(body, name, 1)
    check_prompt_size(engine, turns)
    prompt = encode_prompt(engine, turns, tools, thinking) + prefill
    room = engine.context - len(prompt)
    if room < 1:
        raise APIError(400, f"the prompt is {len(prompt)} tokens; this model's context is {engine.context} "
                       "tokens, so nothing is left for the answer", "messages", "context_length_exceeded")
    max_tokens = answer_budget(asked, default_max_tokens, room, len(prompt), engine.context, name)
    sampling = Sampling(prompt, max_tokens, o.temperature, o.top_p, o.top_k, o.repetition_penalty, o.stop,
                        secrets.randbits(63) if o.seed is None else o.seed,
                        frozenset(t["function"]["name"] for t in tools or ()), thinking, tuple(prefill), logprobs)
    return Parsed([sampling], o.n, o.stream, o.include_usage,
                  Conversation(turns, tools, thinking, asked, default_max_tokens))


def answer_budget(asked: int | None, default: int, room: int, prompt: int, context: int, name: str) -> int:
    """The answer's token budget: ``asked`` when it fits the ``room`` the prompt leaves, else a 400 on
    ``name``; without a limit, ``default`` capped by the room."""
    if asked is None:
        return min(default, room)
    if asked > room:
        raise APIError(400, f"'{name}' is {asked}, but the prompt uses {prompt} of the {context}-token context: "
                       f"at most {room} tokens are left", name, "context_length_exceeded")
    return asked
