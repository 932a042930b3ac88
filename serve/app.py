"""OpenAI-compatible chat API and web chat page over one loaded model.

Routes: ``POST /v1/chat/completions`` (JSON or SSE streaming), ``GET /v1/models``, ``GET /health``,
``GET /`` (the static chat page). With an API key, ``/v1/*`` requires ``Authorization: Bearer KEY``.

Concurrency: requests are validated on the event loop, then queued (bounded, FIFO) for **one**
generation worker thread that owns the model; /health and validation stay responsive while it runs.
The worker sends events to the request's asyncio queue with ``call_soon_threadsafe``. A streaming
client that disconnects cancels its job at the next token.

Text: token ids go through :class:`~core.detokenize.IncrementalDecoder` (a chunk never splits a
UTF-8 character), then through the ``stop`` strings filter: text that could be the start of a stop
string is held back until it is decided; at a stop string the answer ends there (finish "stop").
Every error is an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import nn

from core.detokenize import IncrementalDecoder
from core.tokenizer import TokenizerInfo, prompt_ids
from model.generate import FINISH_LENGTH, FINISH_STOP, Generation

STATIC = Path(__file__).resolve().parent / "static"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


@dataclass
class Job:
    """One validated request: prompt ids and sampling settings; events flow back through ``events``."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int | None
    repetition_penalty: float
    stop: list[str]
    seed: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


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


class Engine:
    """The model, its tokenizer and the single generation worker thread with its bounded queue."""

    def __init__(self, model: nn.Module, tokenizer: TokenizerInfo, stop_ids: list[int], max_queue: int = 64) -> None:
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, stop_ids
        self.context = model.config.max_position_embeddings
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.busy = False
        self.served = 0
        self.thread = threading.Thread(target=self._work, name="tinylm-generate", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(503, "the server is busy (generation queue full); retry later", code="server_busy",
                           kind="server_error") from None

    def close(self) -> None:
        self.jobs.put(None)

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            self.busy = True
            try:
                self._run(job)
            except Exception as e:  # report, never kill the worker
                job.send("error", f"generation failed: {type(e).__name__}: {e}")
            finally:
                self.busy = False
                self.served += 1

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        generator = torch.Generator(device=next(self.model.parameters()).device).manual_seed(job.seed)
        gen = Generation(self.model, [job.prompt], max_new_tokens=job.max_tokens, temperature=job.temperature,
                         top_k=job.top_k, top_p=job.top_p, repetition_penalty=job.repetition_penalty,
                         stop_ids=self.stop_ids, generator=generator)
        decoder = IncrementalDecoder(self.tokenizer.tokenizer)
        stops = StopFilter(job.stop)
        finish = None
        for (token,) in gen:
            if job.cancelled.is_set():
                return
            text, hit = stops.push(decoder.push(token))
            if text:
                job.send("text", text)
            if hit:
                finish = FINISH_STOP
                break
        if finish is None:
            text, hit = stops.push(decoder.flush())
            text += "" if hit else stops.flush()
            if text:
                job.send("text", text)
            finish = FINISH_STOP if hit else gen.finish_reasons[0] or FINISH_LENGTH
        usage = {"prompt_tokens": len(job.prompt), "completion_tokens": len(gen.tokens[0]),
                 "total_tokens": len(job.prompt) + len(gen.tokens[0])}
        job.send("done", (finish, usage))


# ---- request validation ------------------------------------------------------------------------------------

def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"'{name}' must be a number, got {json.dumps(value)}", name, "invalid_type")
    if value < low or (low_open and value == low) or value > high:
        span = f"{'(' if low_open else '['}{low}, {high}]"
        raise APIError(400, f"'{name}' must be in {span}, got {value}", name, "invalid_value")
    return float(value)


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {json.dumps(value)}", name, "invalid_type")
    return value


def _content(message: dict, i: int) -> str:
    content = message.get("content")
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
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role {json.dumps(role)} is not supported; use one of "
                           "system, developer, user, assistant", f"messages[{i}].role", "invalid_value")
        turns.append({"role": ROLES[role], "content": _content(m, i)})
    return turns


def parse_stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, "'stop' must be a non-empty string or an array of up to 4 non-empty strings",
                       "stop", "invalid_value")
    return stop


# ---- the app ------------------------------------------------------------------------------------------------

def create_app(engine: Engine, model_name: str, api_key: str | None = None, default_max_tokens: int = 512) -> FastAPI:
    """The FastAPI app over ``engine``; ``default_max_tokens`` caps answers when the request sets no limit."""
    app = FastAPI(title="tinylm", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

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
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not (header.startswith("Bearer ") and secrets.compare_digest(header[7:].strip(), api_key)):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "busy": engine.busy, "queued": engine.jobs.qsize(),
                "served": engine.served}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "tinylm"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_key(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        job, stream, include_usage = validate(body, request)
        completion_id = f"chatcmpl-{secrets.token_hex(12)}"
        now = int(time.time())
        engine.submit(job)
        if stream:
            return StreamingResponse(sse(job, completion_id, now, include_usage, request),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces = []
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    pieces.append(value)
                elif kind == "error":
                    raise APIError(500, value, kind="server_error")
                else:
                    finish, usage = value
                    break
        finally:
            job.cancelled.set()
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": now, "model": model_name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage})

    def validate(body: dict, request: Request) -> tuple[Job, bool, bool]:
        turns = parse_messages(body)
        n = _integer(body, "n")
        if n is not None and n != 1:
            raise APIError(400, f"only n=1 is supported, got n={n}", "n", "invalid_value")
        for name in ("presence_penalty", "frequency_penalty"):
            if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
                raise APIError(400, f"'{name}' is not supported (use 'repetition_penalty')", name, "unsupported")
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
        repetition_penalty = _number(body, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True)
        top_k = _integer(body, "top_k")
        if top_k is not None and top_k < 0:
            raise APIError(400, f"'top_k' must be >= 0, got {top_k}", "top_k", "invalid_value")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, "'stream' must be a boolean", "stream", "invalid_type")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise APIError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
        seed = _integer(body, "seed")
        stop = parse_stop(body)
        prompt = prompt_ids(engine.tokenizer, turns)
        room = engine.context - len(prompt)
        if room < 1:
            raise APIError(400, f"the prompt is {len(prompt)} tokens; this model's context is {engine.context} "
                           "tokens, so nothing is left for the answer", "messages", "context_length_exceeded")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _integer(body, name)
        if max_tokens is None:
            max_tokens = min(default_max_tokens, room)
        elif max_tokens < 1:
            raise APIError(400, f"'{name}' must be >= 1, got {max_tokens}", name, "invalid_value")
        elif max_tokens > room:
            raise APIError(400, f"'{name}' is {max_tokens}, but the prompt uses {len(prompt)} of the "
                           f"{engine.context}-token context: at most {room} tokens are left", name,
                           "context_length_exceeded")
        job = Job(prompt, max_tokens, temperature, top_p, top_k or None, repetition_penalty, stop,
                  secrets.randbits(63) if seed is None else seed, asyncio.get_running_loop(), asyncio.Queue())
        return job, stream, bool(options.get("include_usage"))

    async def sse(job: Job, completion_id: str, now: int, include_usage: bool,
                  request: Request) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
            payload = {"id": completion_id, "object": "chat.completion.chunk", "created": now, "model": model_name,
                       "system_fingerprint": None,
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                       if choices else [], "usage": usage}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if kind == "text":
                    yield chunk({"content": value})
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
