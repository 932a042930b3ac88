"""Server-side tool execution for chat requests that ask for it (``"run_tools": true``, a tinylm extension).

Contract: a server started with ``bin/serve --tools NAMES`` holds a :class:`ServerTools` (the built-in tools
of ``core/tools.py`` it may run, and ``max_rounds``); ``GET /v1/tools`` lists them (:meth:`ServerTools.listing`).
A chat request without ``run_tools`` is answered exactly as OpenAI does (a call comes back as ``tool_calls``
for the client to run), whatever ``--tools`` says. With ``"run_tools": true`` (:func:`check_run_tools`: 400 on
``run_tools`` when the server runs no tools, on ``n`` above 1, on ``logprobs``, and on
``tools[i].function.name`` for an offered function the server does not run), :func:`run_rounds` loops:
generate one completion; if it ended with calls (finish ``tool_calls``; the parser,
``core/completion.py``, makes a call only from the control ids of an offered tool, so anything else is
content), run each call through ``core.tools.execute`` (never raises: a bad call, a tool's error, its time
or size limit is an ``{"error": ...}`` result the model reads) off the event loop, append the assistant
turn and one ``tool`` turn per call to the conversation, render the next prompt through the chat template
exactly as a client running the tools would (``tool_choice`` and its prefill apply to the first round
only; later rounds are ``auto``) and generate again. At most ``max_rounds`` rounds of calls are run; the
calls of a completion after that are returned unrun (finish ``tool_calls``). Each round's answer budget is
the request's (capped by the room the longer prompt leaves; no room at all ends the answer with
``length``). Usage counts every round's prompt and completion tokens.

What :func:`run_rounds` yields, in order, for the app to send: ``("event", (Event, call id or None))`` per
parsed event, ``("tool", message)`` per run call (``{"role": "tool", "tool_call_id", "name", "content"}``),
``("round", None)`` when the next assistant message starts, and last ``("done", (finish, usage, messages))``
(``messages``: every assistant and tool message the request added) or ``("error", APIError)`` (a full queue
is the 503 a request gets, a failed generation a 500).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from core import tools as builtin_tools
from core.completion import TOOL_CALL, Event
from serve.answers import answer_message, call_id
from serve.engine import FINISH_TOOL_CALLS, Engine, Job, Sampling
from serve.openai_request import (
    SEED_LIMIT,
    APIError,
    Parsed,
    encode_prompt,
    flag_field,
    parse_messages,
    show_value,
)

RUN_TOOLS = "run_tools"  # the request field that asks the server to run its tools
FINISH_LENGTH = "length"


@dataclass(frozen=True)
class ServerTools:
    """The built-in tools this server runs (``core/tools.py`` names) and the rounds of calls per request."""

    names: tuple[str, ...]
    max_rounds: int

    def listing(self) -> dict:
        """``GET /v1/tools``: the tools' OpenAI definitions, ready to send as a request's ``tools``."""
        return {"object": "list", "data": builtin_tools.tools_schema(self.names), "max_rounds": self.max_rounds}


def check_run_tools(body: dict, parsed: Parsed, server: ServerTools | None) -> Parsed:
    """``parsed`` with ``run_tools`` set when the body asks for it and may have it; a 400 naming the param
    otherwise. Called after validation, so ``tools`` has OpenAI's wrapped shape."""
    if not flag_field(body, RUN_TOOLS):
        return parsed
    if server is None:
        raise APIError(400, "this server does not run tools: start it with bin/serve --tools builtin",
                       RUN_TOOLS, "unsupported_parameter")
    if parsed.n > 1:
        raise APIError(400, "'run_tools' answers one choice: 'n' must be 1", "n", "invalid_value")
    if parsed.prompts[0].logprobs is not None:
        raise APIError(400, "'logprobs' cannot be combined with 'run_tools'", "logprobs", "unsupported_parameter")
    for i, tool in enumerate(body.get("tools") or ()):
        name = tool["function"]["name"]
        if name not in server.names:
            raise APIError(400, f"tools[{i}] is the function {show_value(name)}, which this server does not run "
                           f"(it runs: {', '.join(server.names)})", f"tools[{i}].function.name", "invalid_value")
    return replace(parsed, run_tools=True)


def tool_message(call: dict) -> dict:
    """The ``tool`` turn that answers ``call`` (an answer message's call): the built-in tool's result text."""
    name, arguments = call["function"]["name"], call["function"]["arguments"]
    return {"role": "tool", "tool_call_id": call["id"], "name": name,
            "content": builtin_tools.run_call(name, arguments)}


def next_sampling(engine: Engine, parsed: Parsed, added: list[dict], round_: int) -> Sampling | None:
    """The Sampling of round ``round_`` (1, 2, ...): the request's conversation plus the ``added`` messages,
    rendered by the template with the request's tools and thinking switch, no prefill, seed ``seed +
    round_``; None when the prompt leaves no room for an answer."""
    first, conversation = parsed.prompts[0], parsed.conversation
    assert conversation is not None, "a chat request keeps its conversation"
    turns = conversation.turns + parse_messages({"messages": added})
    prompt = encode_prompt(engine, turns, conversation.tools, conversation.thinking)
    room = engine.context - len(prompt)
    if room < 1:
        return None
    budget = min(conversation.asked or conversation.default_max_tokens, room)
    return replace(first, prompt=prompt, max_tokens=budget, prefill=(), seed=(first.seed + round_) % SEED_LIMIT)


async def run_rounds(engine: Engine, parsed: Parsed, server: ServerTools, start: Callable[[Sampling], Job],
                     relay: Callable[[Job], AsyncIterator[tuple[int, str, Any]]],
                     blocking: Callable[..., Awaitable[Any]]) -> AsyncIterator[tuple[str, Any]]:
    """The rounds of one ``run_tools`` request (see the module docstring). ``start`` queues a job (an
    APIError when the queue is full), ``relay`` yields its messages until done (and stops early when the
    client goes), ``blocking(fn, *args)`` runs ``fn`` off the event loop."""
    sampling: Sampling | None = parsed.prompts[0]
    added: list[dict] = []
    prompt_tokens = completion_tokens = 0
    round_ = 0
    while True:
        assert sampling is not None
        try:
            job = start(sampling)
        except APIError as e:  # the queue is full
            yield "error", e
            return
        events: list[Event] = []
        ids: list[str] = []
        finish = ""
        try:
            async for _, kind, value in relay(job):
                if kind == "event":
                    events.append(value)
                    if value.kind == TOOL_CALL:
                        ids.append(call_id())
                    yield "event", (value, ids[-1] if value.kind == TOOL_CALL else None)
                elif kind == "error":
                    yield "error", APIError(500, value, kind="server_error")
                    return
                elif kind == "done":
                    finish, usage = value
                    prompt_tokens += usage["prompt_tokens"]
                    completion_tokens += usage["completion_tokens"]
        finally:
            job.cancelled.set()
        if not finish:  # the client went away
            return
        message = answer_message(events, ids)
        added.append(message)
        if finish == FINISH_TOOL_CALLS and round_ < server.max_rounds:
            round_ += 1
            for call in message["tool_calls"]:
                answer = await blocking(tool_message, call)
                added.append(answer)
                yield "tool", answer
            try:
                sampling = await blocking(next_sampling, engine, parsed, added, round_)
            except APIError as e:  # the tokenizer refused a tool's result
                yield "error", APIError(500, e.message, kind="server_error")
                return
            if sampling is not None:
                yield "round", None
                continue
            finish = FINISH_LENGTH
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        yield "done", (finish, usage, added)
        return

