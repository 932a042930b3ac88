"""OpenAI-compatible chat API and web chat page over one :class:`~serve.engine.Engine`: routes, SSE, answers.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON or SSE streaming),
``GET /v1/models``, ``GET /v1/tools`` (the built-in tools this server runs, ``bin/serve --tools``; empty when
none), ``GET /health``, ``GET /`` (the static chat page). With an API key, ``/v1/*`` requires
``Authorization: Bearer KEY`` (compared as bytes in constant time: any header a client sends is a 401 or a
pass, never a 500). Request validation lives in :mod:`serve.openai_request` (chat) and
:mod:`serve.completion_request` (text completions), generation in :mod:`serve.engine`; this module
turns their results and errors into HTTP. Every error is an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}``.

A request's life, and the invariant at each step (no client can stall the event loop or the worker):
1. the body is read on the event loop under two limits: a declared ``Content-Length`` over
   ``max_body_bytes`` is a 413 before any body byte is read; a chunked body is counted as it arrives
   and refused (413) the moment it passes the limit; the whole body must arrive within
   ``body_timeout`` seconds (else 408, connection closed). uvicorn discards what a refused client
   still sends, so the client reads its 413;
2. JSON parsing, validation and prompt tokenization run in a small thread pool (``PARSE_THREADS``),
   never on the event loop (``encode_batch`` releases the GIL, so the loop keeps running). A prompt that
   cannot fit the context by a byte count is refused before it is tokenized;
3. the request's jobs (one per choice: ``n`` per prompt) are queued (bounded, FIFO; full: 503 with
   ``Retry-After``, and the request's jobs already queued are cancelled) for the engine's single generation
   worker. A client that disconnects, streaming or not, cancels its job: a queued job is skipped, a
   running one stops at its next token (``/health`` counts them as ``cancelled``).

Answers: the parsed events become ``reasoning_content``, ``content`` and ``tool_calls``; an answer with a
call finishes ``"tool_calls"``; streamed, a call is one delta with its id, type and name, then one with its
arguments, as OpenAI sends them. A text completion's ``text`` is the echoed prompt (with ``echo``) then the
answer. Log-probabilities (chat ``logprobs``/``top_logprobs``, completions ``logprobs``) come from
:mod:`serve.token_logprobs`; streamed, each chunk carries the entries of the tokens that produced it (the
last ones ride on the finish chunk). Choices are streamed interleaved, each chunk naming its ``index``.

Server-side tools (:mod:`serve.tool_rounds`): a chat request with the tinylm field ``"run_tools": true`` on a
server started with ``--tools`` has its calls run here and its answer continued, round after round. Its
non-streamed choice carries ``messages`` (every assistant and tool message it added, in order) beside
``message`` (the last assistant one); streamed, each assistant message opens with a ``{"role": "assistant"}``
delta and each run call's result is one delta ``{"role": "tool", "tool_call_id", "name", "content"}``. A
request without the field is answered exactly as OpenAI does.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from core.completion import TOOL_CALL, Event
from serve.answers import answer_message, event_deltas
from serve.completion_request import validate_completion
from serve.engine import Engine, Job, QueueFull, Sampling
from serve.openai_request import APIError, Parsed, parse_body, validate
from serve.token_logprobs import TokenLogprob, chat_logprobs, completion_logprobs
from serve.tool_rounds import ServerTools, check_run_tools, run_rounds

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 1 << 20  # 1 MiB
BODY_TIMEOUT = 30.0  # seconds for the whole request body
PARSE_THREADS = 2  # JSON parsing + validation + tokenization threads
CLIENT_CLOSED = 499  # status of a request whose client went away (never seen by anyone)


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def submit(engine: Engine, jobs: list[Job]) -> None:
    """Queue every job of a request; a full queue is a 503 with ``Retry-After`` (the jobs already queued are
    cancelled, so the worker skips them)."""
    try:
        for job in jobs:
            engine.submit(job)
    except QueueFull:
        cancel(jobs)
        raise APIError(503, "the server is busy (generation queue full); retry later", code="server_busy",
                       kind="server_error", headers={"Retry-After": "1"}) from None


# ---- answers ------------------------------------------------------------------------------------------------

def sse_data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def streaming(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def cancel(jobs: list[Job]) -> None:
    for job in jobs:
        job.cancelled.set()


@dataclass
class Result:
    """What one choice's job sent: parsed events, log-probability entries, the echoed prompt, the end."""

    index: int
    sampling: Sampling
    events: list[Event] = field(default_factory=list)
    scored: list[TokenLogprob] = field(default_factory=list)
    echo_text: str = ""
    echo_scored: list[TokenLogprob] = field(default_factory=list)
    finish: str = ""
    usage: dict = field(default_factory=dict)

    def take(self, kind: str, value: Any) -> bool:
        """Record one message of the job; True when it was the last ("done")."""
        if kind == "event":
            self.events.append(value)
        elif kind == "logprobs":
            self.scored += value
        elif kind == "echo":
            self.echo_text, self.echo_scored = value
        elif kind == "done":
            self.finish, self.usage = value
            return True
        return False


def total_usage(parsed: Parsed, results: list[Result]) -> dict:
    """Usage of a request: each prompt counted once, every choice's answer tokens."""
    return usage_of(parsed.prompt_tokens, sum(r.usage.get("completion_tokens", 0) for r in results))


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def join_logprobs(first: dict, second: dict) -> dict:
    """Two completions ``logprobs`` objects as one (the echoed prompt's, then the answer's)."""
    return {key: first[key] + second[key] for key in first}


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
               max_body_bytes: int = MAX_BODY_BYTES, body_timeout: float = BODY_TIMEOUT,
               tools: ServerTools | None = None) -> FastAPI:
    """The FastAPI app over ``engine``; ``default_max_tokens`` caps answers when the request sets no limit;
    request bodies over ``max_body_bytes`` are 413, bodies not in after ``body_timeout`` seconds 408;
    ``tools``: the built-in tools a ``run_tools`` request may have run here (None: no tools are run)."""
    app = FastAPI(title="tinylm", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    key = None if api_key is None else api_key.encode("utf-8")
    parsers = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="tinylm-parse")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(APIError(400, f"invalid request: {exc.errors()}"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"))

    def check_key(request: Request) -> None:
        """Bearer token check on the header's raw bytes (latin-1 round-trips them), in constant time."""
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").encode("latin-1").partition(b" ")
        if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def prepare_chat(raw: bytes) -> Parsed:
        body = parse_body(raw)
        return check_run_tools(body, validate(engine, body, default_max_tokens), tools)

    def prepare_completion(raw: bytes) -> Parsed:
        return validate_completion(engine, parse_body(raw))

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "busy": engine.busy, "running": engine.running,
                "queued": engine.jobs.qsize(), "served": engine.served, "cancelled": engine.cancelled,
                "context": engine.context, "rope_scaling": engine.model.config.rope_scaling}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "tinylm", "max_model_len": engine.context,
                                            "rope_scaling": engine.model.config.rope_scaling}]}

    @app.get("/v1/tools")
    async def tool_listing(request: Request) -> dict:
        check_key(request)
        return tools.listing() if tools else {"object": "list", "data": [], "max_rounds": 0}

    async def read(request: Request, prepare: Callable[[bytes], Parsed]) -> Parsed:
        """Read and validate a request (off the event loop)."""
        check_key(request)
        raw = await read_body(request, max_body_bytes, body_timeout)
        return await asyncio.get_running_loop().run_in_executor(parsers, prepare, raw)

    def queue_jobs(parsed: Parsed, prompts: list[Sampling] | None = None) -> list[Job]:
        """Queue the jobs of a request's choices (or of ``prompts``), sharing one event queue."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        jobs = [Job(sampling, loop, events, index=i) for i, sampling in enumerate(prompts or parsed.choices())]
        submit(engine, jobs)
        return jobs

    async def start(request: Request, prepare: Callable[[bytes], Parsed]) -> tuple[Parsed, list[Job]]:
        """Read, validate and queue a request's jobs (one per choice)."""
        parsed = await read(request, prepare)
        return parsed, queue_jobs(parsed)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        parsed = await read(request, prepare_chat)
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": model_name,
                "system_fingerprint": None}
        if parsed.run_tools:
            return await tool_rounds_answer(parsed, head, request)
        jobs = queue_jobs(parsed)
        if parsed.stream:
            return streaming(chat_sse(jobs, head, parsed, request))
        results = await collect(jobs, request)
        choices = [{"index": r.index, "message": answer_message(r.events),
                    "logprobs": chat_logprobs(r.scored) if r.sampling.logprobs is not None else None,
                    "finish_reason": r.finish} for r in results]
        return JSONResponse({**head, "object": "chat.completion", "choices": choices,
                             "usage": total_usage(parsed, results)})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        parsed, jobs = await start(request, prepare_completion)
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": model_name, "system_fingerprint": None}
        if parsed.stream:
            return streaming(completion_sse(jobs, head, parsed, request))
        results = await collect(jobs, request)
        choices = []
        for r in results:
            text = "".join(e.text for e in r.events)
            logprobs = None
            if r.sampling.logprobs is not None:
                logprobs = join_logprobs(completion_logprobs(r.echo_scored),
                                         completion_logprobs(r.scored, len(r.echo_text)))
            choices.append({"index": r.index, "text": r.echo_text + text, "logprobs": logprobs,
                            "finish_reason": r.finish})
        return JSONResponse({**head, "choices": choices, "usage": total_usage(parsed, results)})

    async def tool_rounds_answer(parsed: Parsed, head: dict, request: Request) -> Response:
        """A ``run_tools`` request (serve/tool_rounds.py): its first job is queued now (a full queue is this
        request's 503), the later rounds' as the rounds go."""
        assert tools is not None
        first = queue_jobs(parsed)
        loop = asyncio.get_running_loop()

        def start_round(sampling: Sampling) -> Job:
            return first.pop() if first else queue_jobs(parsed, [sampling])[0]

        async def relay(job: Job) -> AsyncIterator[tuple[int, str, Any]]:
            async for message in messages([job], request):
                yield message

        rounds = run_rounds(engine, parsed, tools, start_round, relay,
                            lambda fn, *args: loop.run_in_executor(parsers, fn, *args))
        if parsed.stream:
            return streaming(tool_rounds_sse(rounds, head, parsed))
        try:
            async for kind, value in rounds:
                if kind == "error":
                    raise value
                if kind == "done":
                    finish, usage, added = value
                    final = next(m for m in reversed(added) if m["role"] == "assistant")
                    choice = {"index": 0, "message": final, "messages": added, "logprobs": None,
                              "finish_reason": finish}
                    return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": usage})
        finally:
            await rounds.aclose()
        raise APIError(CLIENT_CLOSED, "the client closed the connection", code="client_closed")

    async def tool_rounds_sse(rounds: AsyncIterator[tuple[str, Any]], head: dict,
                              parsed: Parsed) -> AsyncIterator[str]:
        """The rounds as one stream: each assistant message opens with a ``role`` delta, each run call's
        result is a delta ``{"role": "tool", "tool_call_id", "name", "content"}``; one finish chunk at the end."""
        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return sse_data({**head, "object": "chat.completion.chunk", "choices": [choice], "usage": usage})

        calls = 0
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for kind, value in rounds:
                if kind == "event":
                    event, id = value
                    for delta in event_deltas(event, calls, id):
                        yield chunk(delta)
                    calls += event.kind == TOOL_CALL
                elif kind == "tool":
                    yield chunk(value)
                elif kind == "round":
                    calls = 0
                    yield chunk({"role": "assistant", "content": ""})
                elif kind == "error":
                    yield error_chunk(value.message)
                    return
                else:
                    finish, usage, _ = value
                    yield chunk({}, finish, usage)
                    if parsed.include_usage:
                        yield sse_data({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
                    yield "data: [DONE]\n\n"
        finally:
            await rounds.aclose()

    async def collect(jobs: list[Job], request: Request) -> list[Result]:
        """Every choice's result; the jobs are cancelled if the client goes."""
        gone = asyncio.ensure_future(until_disconnected(request))
        results = [Result(job.index, job.sampling) for job in jobs]
        waiting = len(jobs)
        try:
            while waiting:
                event = asyncio.ensure_future(jobs[0].events.get())
                await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()
                    raise APIError(CLIENT_CLOSED, "the client closed the connection", code="client_closed")
                index, kind, value = event.result()
                if kind == "error":
                    raise APIError(500, value, kind="server_error")
                waiting -= results[index].take(kind, value)
            return results
        finally:
            gone.cancel()
            cancel(jobs)

    async def messages(jobs: list[Job], request: Request) -> AsyncIterator[tuple[int, str, Any]]:
        """The jobs' messages until each is done (or one failed); stops quietly when the client goes."""
        waiting = len(jobs)
        while waiting:
            try:
                index, kind, value = await asyncio.wait_for(jobs[0].events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            yield index, kind, value
            if kind == "error":
                return
            waiting -= kind == "done"

    def error_chunk(message: str) -> str:
        return sse_data({"error": {"message": message, "type": "server_error", "param": None, "code": None}})

    async def chat_sse(jobs: list[Job], head: dict, parsed: Parsed, request: Request) -> AsyncIterator[str]:
        def chunk(index: int, delta: dict, finish: str | None = None, usage: dict | None = None,
                  logprobs: dict | None = None) -> str:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return sse_data({**head, "object": "chat.completion.chunk", "choices": [choice], "usage": usage})

        calls = [0] * len(jobs)
        pending: list[list[TokenLogprob]] = [[] for _ in jobs]
        completion_tokens = 0
        try:
            for job in jobs:
                yield chunk(job.index, {"role": "assistant", "content": ""})
            async for index, kind, value in messages(jobs, request):
                if kind == "logprobs":
                    pending[index] += value
                elif kind == "event":
                    for delta in event_deltas(value, calls[index]):
                        scored, pending[index] = pending[index], []
                        yield chunk(index, delta, logprobs=chat_logprobs(scored) if scored else None)
                    calls[index] += value.kind == TOOL_CALL
                elif kind == "error":
                    yield error_chunk(value)
                    break
                else:
                    finish, usage = value
                    completion_tokens += usage["completion_tokens"]
                    scored, pending[index] = pending[index], []
                    yield chunk(index, {}, finish, usage, chat_logprobs(scored) if scored else None)
            else:
                if parsed.include_usage:
                    usage = usage_of(parsed.prompt_tokens, completion_tokens)
                    yield sse_data({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
                yield "data: [DONE]\n\n"
        finally:
            cancel(jobs)  # client gone or done: the worker drops the jobs at their next token

    async def completion_sse(jobs: list[Job], head: dict, parsed: Parsed, request: Request) -> AsyncIterator[str]:
        def chunk(index: int, text: str, scored: list[TokenLogprob] | None, finish: str | None = None,
                  usage: dict | None = None) -> str:
            logprobs = completion_logprobs(scored, shift[index]) if scored is not None else None
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            return sse_data({**head, "choices": [choice], "usage": usage})

        wants = [job.sampling.logprobs is not None for job in jobs]
        shift = [0] * len(jobs)  # characters of echoed prompt before the generated text
        pending: list[list[TokenLogprob]] = [[] for _ in jobs]
        completion_tokens = 0
        try:
            async for index, kind, value in messages(jobs, request):
                if kind == "echo":
                    text, scored = value
                    yield chunk(index, text, scored if wants[index] else None)
                    shift[index] = len(text)
                elif kind == "logprobs":
                    pending[index] += value
                elif kind == "event":
                    scored, pending[index] = pending[index], []
                    yield chunk(index, value.text, scored if wants[index] else None)
                elif kind == "error":
                    yield error_chunk(value)
                    break
                else:
                    finish, usage = value
                    completion_tokens += usage["completion_tokens"]
                    scored, pending[index] = pending[index], []
                    yield chunk(index, "", scored if wants[index] else None, finish, usage)
            else:
                if parsed.include_usage:
                    yield sse_data({**head, "choices": [], "usage": usage_of(parsed.prompt_tokens, completion_tokens)})
                yield "data: [DONE]\n\n"
        finally:
            cancel(jobs)

    return app
