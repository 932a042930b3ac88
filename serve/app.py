"""OpenAI-compatible chat API and web chat page over one loaded model.

Routes: ``POST /v1/chat/completions`` (JSON or SSE streaming), ``GET /v1/models``, ``GET /health``,
``GET /`` (the static chat page). With an API key, ``/v1/*`` requires ``Authorization: Bearer KEY``
(compared as bytes in constant time: any header a client sends is a 401 or a pass, never a 500).

A request's life, and the invariant at each step (no client can stall the event loop or the worker):
1. the body is read on the event loop under two limits: a declared ``Content-Length`` over
   ``max_body_bytes`` is a 413 before any body byte is read; a chunked body is counted as it arrives
   and refused (413) the moment it passes the limit; the whole body must arrive within
   ``body_timeout`` seconds (else 408, connection closed). uvicorn discards what a refused client
   still sends, so the client reads its 413;
2. JSON parsing, validation and prompt tokenization run in a small thread pool (``PARSE_THREADS``),
   never on the event loop; prompts are encoded by ``core.tokenizer.prompt_ids`` (content as text,
   never control tokens) with ``encode_batch``, which releases the GIL, so the loop keeps running. A
   prompt that cannot fit the context by a byte count (each token covers at most
   ``Engine.max_token_bytes`` bytes) is refused before it is tokenized;
3. the job is queued (bounded, FIFO; full: 503 with ``Retry-After``) for **one** generation worker
   thread that owns the model. It sends events to the request's asyncio queue with
   ``call_soon_threadsafe``. A client that disconnects, streaming or not, cancels its job: a queued job
   is skipped, a running one stops at its next token (``/health`` counts them as ``cancelled``).

Untrusted JSON: ``NaN``, ``Infinity``, floats that overflow to infinity and integers over
``MAX_INT_DIGITS`` digits parse to a marker that is refused with ``param`` naming where it was; a lone
UTF-16 surrogate in any string or key, nesting deeper than ``MAX_DEPTH`` (or deep enough to exhaust the
parser's recursion), a wrong type (booleans are not numbers), an out-of-range value and a feature this
server does not implement are all 400 with ``param``. Text the tokenizer refuses is a 400 on ``messages``.

Text: token ids go through :class:`~core.detokenize.IncrementalDecoder` (a chunk never splits a
UTF-8 character), then through the ``stop`` strings filter: text that could be the start of a stop
string is held back until it is decided; at a stop string the answer ends there (finish "stop"). Then
:class:`~core.completion.CompletionParser` splits it into ``reasoning_content``, ``content`` and tool calls
(a call is held back until its ``</tool_call>``; a malformed one is content; with ``tool_choice="none"``
the tags stay text); an answer with a call finishes ``"tool_calls"``.

Thinking and tools: ``tools`` are rendered into the system turn by the template; ``tool_choice`` ``"auto"``
(default) lets the model decide, ``"none"`` renders no tools, ``"required"`` prefills ``<tool_call>\n``
and ``{"type": "function", "function": {"name": N}}`` also the call's name (both cut from the template's
own rendering of a call, and fed to the parser as the completion's start, like the ``<think>\n`` that
``chat_template_kwargs.enable_thinking=true`` appends).
Every error is an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import queue
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from tokenizers import Tokenizer
from tokenizers.models import BPE
from torch import nn

from core.chat_template import CONTROL, TEXT, THINKING_PROMPTS, Piece, render_text
from core.completion import (
    CALL_CLOSE,
    CALL_OPEN,
    CONTENT,
    REASONING,
    TOOL_CALL,
    CompletionParser,
    Event,
    parse_json_object,
)
from core.detokenize import IncrementalDecoder
from core.errors import TinyLMError
from core.tokenizer import TokenizerInfo, encode_documents, prompt_ids
from model.generate import FINISH_LENGTH, FINISH_STOP, Generation

STATIC = Path(__file__).resolve().parent / "static"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_BODY_BYTES = 1 << 20  # 1 MiB
BODY_TIMEOUT = 30.0  # seconds for the whole request body
PARSE_THREADS = 2  # JSON parsing + validation + tokenization threads
MAX_DEPTH = 32  # nesting of arrays/objects in a request body
MAX_INT_DIGITS = 40  # longer integer literals are refused without converting them
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 256  # characters per stop string (the filter's hold-back is O(length) per token)
MAX_TOOLS = 128  # function definitions per request (OpenAI's limit)
FINISH_TOOL_CALLS = "tool_calls"
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
SEED_LIMIT = 1 << 63  # seeds are in [0, 2^63)
CLIENT_CLOSED = 499  # status of a request whose client went away (never seen by anyone)
_SURROGATE = re.compile("[\ud800-\udfff]")


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status (and optional extra headers)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass(frozen=True)
class Sampling:
    """A validated request: prompt ids and sampling settings."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int | None
    repetition_penalty: float
    stop: list[str]
    seed: int
    prefill: str = ""  # the completion's start already in the prompt (<think>\n, a forced call's start)
    tool_calls: bool = True  # parse <tool_call> blocks as calls (False: tool_choice "none", they stay text)


@dataclass
class Job:
    """One queued request; events flow back to its event loop through ``events``."""

    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def send_parsed(self, events: list[Event]) -> None:
        for event in events:
            self.send("event", event)


class StopFilter:
    """Cuts the text at the first stop string; holds back a tail that may still become one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, stopped?)."""
        text = self.held + text
        self.held = ""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            return text[:min(hits)], True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


def max_token_bytes(tokenizer: Tokenizer) -> int | None:
    """Most UTF-8 bytes of text one token can stand for, or None when no such bound holds.

    For a BPE model without an unknown token and without a normalizer, every token covers a substring
    of the text whose byte length is at most the UTF-8 length of its vocabulary string (a byte-level
    symbol is one byte written as one character of up to 2 bytes), so a text of B bytes needs at least
    ceil(B / bound) tokens. A normalizer (which may shrink text) or an unknown token voids the bound."""
    model = tokenizer.model
    if tokenizer.normalizer is not None or not isinstance(model, BPE) or model.unk_token is not None:
        return None
    return max(len(token.encode("utf-8")) for token in tokenizer.get_vocab(with_added_tokens=True))


class Engine:
    """The model, its tokenizer and the single generation worker thread with its bounded queue."""

    def __init__(self, model: nn.Module, tokenizer: TokenizerInfo, stop_ids: list[int], max_queue: int = 64) -> None:
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, stop_ids
        self.context = model.config.max_position_embeddings
        self.max_token_bytes = max_token_bytes(tokenizer.tokenizer)
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.busy = False
        self.served = 0
        self.cancelled = 0
        self.thread = threading.Thread(target=self._work, name="tinylm-generate", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(503, "the server is busy (generation queue full); retry later", code="server_busy",
                           kind="server_error", headers={"Retry-After": "1"}) from None

    def close(self) -> None:
        self.jobs.put(None)

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            self.busy = True
            try:
                if not self._run(job):
                    self.cancelled += 1
            except Exception as e:  # report, never kill the worker
                job.send("error", f"generation failed: {type(e).__name__}: {e}")
            finally:
                self.busy = False
                self.served += 1

    def _run(self, job: Job) -> bool:
        """Generate ``job``; False when it was cancelled (before it started or at a token)."""
        if job.cancelled.is_set():
            return False
        s = job.sampling
        generator = torch.Generator(device=next(self.model.parameters()).device).manual_seed(s.seed)
        gen = Generation(self.model, [s.prompt], max_new_tokens=s.max_tokens, temperature=s.temperature,
                         top_k=s.top_k, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
                         stop_ids=self.stop_ids, generator=generator)
        decoder = IncrementalDecoder(self.tokenizer.tokenizer)
        stops = StopFilter(s.stop)
        parser = CompletionParser(s.prefill, s.tool_calls)
        finish = None
        for (token,) in gen:
            if job.cancelled.is_set():
                return False
            text, hit = stops.push(decoder.push(token))
            if text:
                job.send_parsed(parser.feed(text))
            if hit:
                finish = FINISH_STOP
                break
        if finish is None:
            text, hit = stops.push(decoder.flush())
            text += "" if hit else stops.flush()
            job.send_parsed(parser.feed(text))
            finish = FINISH_STOP if hit else gen.finish_reasons[0] or FINISH_LENGTH
        job.send_parsed(parser.finish())
        if parser.calls and finish == FINISH_STOP:
            finish = FINISH_TOOL_CALLS
        usage = {"prompt_tokens": len(s.prompt), "completion_tokens": len(gen.tokens[0]),
                 "total_tokens": len(s.prompt) + len(gen.tokens[0])}
        job.send("done", (finish, usage))
        return True


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

def _show(value: Any) -> str:
    """A short, safe rendering of a client's value for an error message."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"'{name}' must be a number, got {_show(value)}", name, "invalid_type")
    if value < low or (low_open and value == low) or value > high:
        span = f"{'(' if low_open else '['}{low}, {high}]"
        raise APIError(400, f"'{name}' must be in {span}, got {_show(value)}", name, "invalid_value")
    return float(value)


def _integer(body: dict, name: str, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {_show(value)}", name, "invalid_type")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise APIError(400, f"'{name}' must be in {span}, got {_show(value)}", name, "invalid_value")
    return value


def _flag(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        param = param or name
        raise APIError(400, f"'{param}' must be a boolean, got {_show(value)}", param, "invalid_type")
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
            raise APIError(400, f"messages[{i}].role {_show(role)} is not supported; use one of "
                           "system, developer, user, assistant, tool", f"messages[{i}].role", "invalid_value")
        turn = {"role": ROLES[role], "content": _content(m, i)}
        if role == "assistant":
            turn.update(_assistant_fields(m, i))
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
        raise APIError(400, f"{where}.{name} must be a string, got {_show(value)}", f"{where}.{name}", "invalid_type")
    return {name: value}


def _assistant_fields(message: dict, i: int) -> dict:
    """``reasoning_content`` and validated ``tool_calls`` of an assistant history turn."""
    fields = _optional_string(message, "reasoning_content", f"messages[{i}]")
    calls = message.get("tool_calls")
    if calls is None:
        return fields
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list) or not calls:
        raise APIError(400, f"{where} must be a non-empty array", where, "invalid_value")
    fields["tool_calls"] = [_history_call(call, f"{where}[{j}]") for j, call in enumerate(calls)]
    return fields


def _history_call(call: Any, where: str) -> dict:
    """One ``{"id"?, "type": "function", "function": {"name", "arguments"}}``; arguments are the JSON text of
    an object (or an object)."""
    if not (isinstance(call, dict) and call.get("type", "function") == "function"
            and isinstance(call.get("function"), dict)):
        raise APIError(400, f'{where} must be {{"type": "function", "function": {{"name", "arguments"}}}}', where,
                       "invalid_value")
    function = call["function"]
    name = function.get("name")
    if not (isinstance(name, str) and name):
        raise APIError(400, f"{where}.function.name must be a non-empty string", f"{where}.function.name",
                       "invalid_value")
    arguments = function.get("arguments", "{}")
    if not (isinstance(arguments, dict) or isinstance(arguments, str) and parse_json_object(arguments) is not None):
        raise APIError(400, f"{where}.function.arguments must be the JSON text of an object, got {_show(arguments)}",
                       f"{where}.function.arguments", "invalid_value")
    return {**_optional_string(call, "id", where), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _tool_fields(message: dict, i: int) -> dict:
    where = f"messages[{i}]"
    return {**_optional_string(message, "tool_call_id", where), **_optional_string(message, "name", where)}


def parse_tools(body: dict) -> list[dict] | None:
    """The request's function definitions, ``[{"type": "function", "function": {"name", "description"?,
    "parameters"?}}]`` (None when there are none)."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise APIError(400, f"'tools' must be an array of at most {MAX_TOOLS} tools", "tools", "invalid_value")
    names: set[str] = set()
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict)):
            raise APIError(400, f'{where} must be {{"type": "function", "function": {{...}}}}', where,
                           "invalid_value")
        function = tool["function"]
        name = function.get("name")
        if not (isinstance(name, str) and _FUNCTION_NAME.fullmatch(name)) or name in names:
            raise APIError(400, f"{where}.function.name must be a new name of 1-64 letters, digits, _ or -, got "
                           f"{_show(name)}", f"{where}.function.name", "invalid_value")
        names.add(name)
        for key, kind in (("description", str), ("parameters", dict)):
            if function.get(key) is not None and not isinstance(function[key], kind):
                raise APIError(400, f"{where}.function.{key} must be a{'n object' if kind is dict else ' string'}",
                               f"{where}.function.{key}", "invalid_type")
        out.append({"type": "function", "function": {k: function[k] for k in ("name", "description", "parameters")
                                                      if function.get(k) is not None}})
    return out or None


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
        raise APIError(400, f"'tool_choice' names the function {_show(forced)}, which is not in 'tools'",
                       "tool_choice", "invalid_value")
    return tools, forced


def parse_thinking(body: dict) -> bool | None:
    """``chat_template_kwargs.enable_thinking`` (the vLLM convention): None = the model decides."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        return None
    if not isinstance(kwargs, dict):
        raise APIError(400, "'chat_template_kwargs' must be an object", "chat_template_kwargs", "invalid_type")
    for key in kwargs:
        if key != "enable_thinking":
            raise APIError(400, f"chat_template_kwargs.{key} is not supported (only enable_thinking)",
                           f"chat_template_kwargs.{key}", "unsupported_parameter")
    value = kwargs.get("enable_thinking")
    if value is not None and not isinstance(value, bool):
        raise APIError(400, f"chat_template_kwargs.enable_thinking must be a boolean, got {_show(value)}",
                       "chat_template_kwargs.enable_thinking", "invalid_type")
    return value


def forced_call_text(name: str) -> str:
    """The start of a forced call: the template's rendering of a call cut before its JSON object
    (``<tool_call>\n``) or, for a named function, before its arguments."""
    call = {"type": "function", "function": {"name": name or "f", "arguments": {}}}
    text = render_text([{"role": "assistant", "content": "", "tool_calls": [call]}])
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
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
               "functions": (None, []), "function_call": (None, "none", "auto"),
               "response_format": (None, {"type": "text"}),
               "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,)}


def refuse_unsupported(body: dict) -> None:
    """400 for a request that asks for a feature this server would otherwise silently ignore."""
    for name, harmless in UNSUPPORTED.items():
        value = body.get(name)
        if not any(value == h and type(value) is type(h) for h in harmless):
            raise APIError(400, f"'{name}' is not supported by this server, got {_show(value)}", name,
                           "unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise APIError(400, f"'{name}' is not supported (use 'repetition_penalty')", name,
                           "unsupported_parameter")
    if not isinstance(body.get("model", ""), str):
        raise APIError(400, f"'model' must be a string, got {_show(body['model'])}", "model", "invalid_type")


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
                  enable_thinking: bool | None = None, forced: str = "") -> list[int]:
    """Prompt ids of ``turns`` (and ``tools``) plus the generation prompt and a forced call's start (content
    encoded as text, never as control tokens); text the tokenizer refuses is a 400 on messages.
    ``prompt_ids`` tokenizes with ``encode_batch``, which releases the GIL, so the event loop runs on."""
    try:
        ids = prompt_ids(engine.tokenizer, turns, tools=tools, enable_thinking=enable_thinking)
        return ids + forced_call_ids(engine.tokenizer, forced) if forced else ids
    except TinyLMError as e:
        reason = " ".join(str(e).split())[:200]
        raise APIError(400, f"the tokenizer refused the messages ({reason})", "messages", "invalid_value") from None


def validate(engine: Engine, body: dict, default_max_tokens: int) -> tuple[Sampling, bool, bool]:
    """(sampling settings, stream?, include_usage?) of a parsed body, or an APIError naming the param."""
    turns = parse_messages(body)
    n = _integer(body, "n")
    if n not in (None, 1):
        raise APIError(400, f"only n=1 is supported, got n={_show(n)}", "n", "invalid_value")
    refuse_unsupported(body)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    repetition_penalty = _number(body, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True)
    top_k = _integer(body, "top_k", 0)
    stream = _flag(body, "stream")
    options = {} if body.get("stream_options") is None else body["stream_options"]
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = _flag(options, "include_usage", "stream_options.include_usage")
    seed = _integer(body, "seed", 0, SEED_LIMIT - 1)
    stop = parse_stop(body)
    tools, forced = parse_tool_choice(body, parse_tools(body))
    calls = body.get("tool_choice") != "none"
    thinking = parse_thinking(body)
    if forced is not None and thinking:
        raise APIError(400, "a forced 'tool_choice' cannot be combined with chat_template_kwargs.enable_thinking="
                       "true (the call would start inside the reasoning)", "tool_choice", "invalid_value")
    forced_text = "" if forced is None else forced_call_text(forced)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, 1)
    check_prompt_size(engine, turns)
    prompt = encode_prompt(engine, turns, tools, thinking, forced_text)
    room = engine.context - len(prompt)
    if room < 1:
        raise APIError(400, f"the prompt is {len(prompt)} tokens; this model's context is {engine.context} "
                       "tokens, so nothing is left for the answer", "messages", "context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(default_max_tokens, room)
    elif max_tokens > room:
        raise APIError(400, f"'{name}' is {max_tokens}, but the prompt uses {len(prompt)} of the "
                       f"{engine.context}-token context: at most {room} tokens are left", name,
                       "context_length_exceeded")
    sampling = Sampling(prompt, max_tokens, temperature, top_p, top_k or None, repetition_penalty, stop,
                        secrets.randbits(63) if seed is None else seed, THINKING_PROMPTS[thinking] + forced_text,
                        calls)
    return sampling, stream, include_usage


# ---- answers ------------------------------------------------------------------------------------------------

def call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def answer_message(events: list[Event]) -> dict:
    """The non-streamed ``message``: content (null when the answer is only calls), ``reasoning_content`` when
    the model reasoned, ``tool_calls`` when it called."""
    text = {kind: "".join(e.text for e in events if e.kind == kind) for kind in (REASONING, CONTENT)}
    calls = [{"id": call_id(), "type": "function", "function": {"name": e.call.name, "arguments": e.call.arguments}}
             for e in events if e.kind == TOOL_CALL]
    message: dict[str, Any] = {"role": "assistant", "content": text[CONTENT] or (None if calls else "")}
    if text[REASONING]:
        message["reasoning_content"] = text[REASONING]
    if calls:
        message["tool_calls"] = calls
    return message


def event_deltas(event: Event, index: int) -> list[dict]:
    """The stream deltas of one parsed event; a call (the ``index``-th) is sent as OpenAI does: a first delta
    with its id, type, name and empty arguments, then one with the arguments."""
    if event.kind != TOOL_CALL:
        return [{"reasoning_content" if event.kind == REASONING else "content": event.text}]
    head = {"index": index, "id": call_id(), "type": "function", "function": {"name": event.call.name,
                                                                              "arguments": ""}}
    return [{"tool_calls": [head]}, {"tool_calls": [{"index": index, "function": {"arguments": event.call.arguments}}]}]


# ---- the app ------------------------------------------------------------------------------------------------

async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, read as it arrives: 413 as soon as it is known to exceed ``limit`` bytes (from
    Content-Length, before reading, or from the running count of a chunked body), 408 when it has not
    all arrived within ``timeout`` seconds."""
    too_big = APIError(413, f"the request body is larger than this server's limit of {limit} bytes "
                       "(bin/serve --max-body-bytes)", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_big
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s (bin/serve --body-timeout)",
                       code="request_timeout", headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise APIError(CLIENT_CLOSED, "the client closed the connection", code="client_closed") from None
    return b"".join(chunks)


async def until_disconnected(request: Request) -> None:
    """Return when the client has gone (the body is already read, so only ``http.disconnect`` can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine: Engine, model_name: str, api_key: str | None = None, default_max_tokens: int = 512,
               max_body_bytes: int = MAX_BODY_BYTES, body_timeout: float = BODY_TIMEOUT) -> FastAPI:
    """The FastAPI app over ``engine``; ``default_max_tokens`` caps answers when the request sets no limit;
    request bodies over ``max_body_bytes`` are 413, bodies not in after ``body_timeout`` seconds 408."""
    app = FastAPI(title="tinylm", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    key = None if api_key is None else api_key.encode("utf-8")
    parsers = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="tinylm-parse")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return APIError(400, f"invalid request: {exc.errors()}").response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error").response()

    def check_key(request: Request) -> None:
        """Bearer token check on the header's raw bytes (latin-1 round-trips them), in constant time."""
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").encode("latin-1").partition(b" ")
        if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def prepare(raw: bytes) -> tuple[Sampling, bool, bool]:
        return validate(engine, parse_body(raw), default_max_tokens)

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "busy": engine.busy, "queued": engine.jobs.qsize(),
                "served": engine.served, "cancelled": engine.cancelled}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "tinylm"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_key(request)
        raw = await read_body(request, max_body_bytes, body_timeout)
        loop = asyncio.get_running_loop()
        sampling, stream, include_usage = await loop.run_in_executor(parsers, prepare, raw)
        job = Job(sampling, loop, asyncio.Queue())
        completion_id = f"chatcmpl-{secrets.token_hex(12)}"
        now = int(time.time())
        engine.submit(job)
        if stream:
            return StreamingResponse(sse(job, completion_id, now, include_usage, request),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        message, finish, usage = await collect(job, request)
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": now, "model": model_name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage})

    async def collect(job: Job, request: Request) -> tuple[dict, str, dict]:
        """(message, finish reason, usage) of a non-streaming job; the job is cancelled if the client goes."""
        gone = asyncio.ensure_future(until_disconnected(request))
        events: list[Event] = []
        try:
            while True:
                event = asyncio.ensure_future(job.events.get())
                await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()
                    raise APIError(CLIENT_CLOSED, "the client closed the connection", code="client_closed")
                kind, value = event.result()
                if kind == "event":
                    events.append(value)
                elif kind == "error":
                    raise APIError(500, value, kind="server_error")
                else:
                    return answer_message(events), *value
        finally:
            gone.cancel()
            job.cancelled.set()

    async def sse(job: Job, completion_id: str, now: int, include_usage: bool,
                  request: Request) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
            payload = {"id": completion_id, "object": "chat.completion.chunk", "created": now, "model": model_name,
                       "system_fingerprint": None,
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                       if choices else [], "usage": usage}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        calls = 0
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if kind == "event":
                    for delta in event_deltas(value, calls):
                        yield chunk(delta)
                    calls += value.kind == TOOL_CALL
                elif kind == "error":
                    body = {"error": {"message": value, "type": "server_error", "param": None, "code": None}}
                    yield f"data: {json.dumps(body)}\n\n"
                    break
                else:
                    finish, usage = value
                    yield chunk({}, finish, usage)
                    if include_usage:
                        yield chunk({}, usage=usage, choices=False)
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # client gone or done: the worker drops the job at its next token

    return app
