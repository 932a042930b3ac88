"""The generation engine: one model, one worker thread, a bounded FIFO queue of validated jobs, continuous batching.

Contract: :class:`Engine` takes :class:`Job` s (a validated :class:`Sampling` plus the asyncio loop and queue
of the request that waits for it; the jobs of one request, one per choice, share that queue and are told
apart by ``Job.index``); :meth:`Engine.submit` queues one or raises :class:`QueueFull` (``max_queue`` jobs
wait already). A single daemon thread owns the model. For a :class:`~model.transformer.TinyLM` (and
``max_batch`` > 1) it batches continuously: between decode steps it moves queued jobs into a
:class:`~serve.batch_decode.DecodeBatch` (up to ``max_batch`` rows; each prefilled alone, its first token
sampled at once), then steps every row by one token and retires the rows that finished; each row samples
with its own settings and its own seeded uniforms (:func:`~model.generate.row_uniforms`), so its tokens
depend on the batch only through floating-point effects (the policy in :mod:`serve.batch_decode`). Any
other module, or ``max_batch`` 1, generates the jobs one at a time with :class:`~model.generate.Generation`.
Per job, the generated ids go to
:class:`~core.completion.CompletionParser` (told the request's offered tools, thinking switch and prefilled
ids) or, for a text completion (``raw``), to :class:`RawText` (plain decoded text); the events go through the
``stop`` strings filter (:class:`StopFilter`: text that could be the start of a stop string is held back
until it is decided; at a stop string the answer ends there, finish ``"stop"``); an answer that stops with a
call finishes ``"tool_calls"``. The worker sends ``(index, kind, value)`` to the job's queue with
``call_soon_threadsafe``: ``("echo", (prompt text, entries))`` first when ``echo`` is set (the entries, with
``logprobs``, score every prompt token by one forward), ``("logprobs", entries)`` (with ``logprobs``: the
new tokens' :class:`~serve.token_logprobs.TokenLogprob` s, sent just before the events they produced, so
a stream can attach them to the next chunk), ``("event", Event)`` per event, then
``("done", (finish_reason, usage))`` or ``("error", message)``. A job whose ``cancelled`` flag is set is
skipped when queued and stops at its next token when running. Nothing here knows HTTP or JSON.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import Tokenizer
from tokenizers.models import BPE
from torch import Tensor, nn

from core.completion import CONTENT, TOOL_CALL, CompletionParser, Event
from core.detokenize import IncrementalDecoder
from core.tokenizer import TokenizerInfo
from model.generate import FINISH_LENGTH, FINISH_STOP, Generation, apply_repetition_penalty, row_uniforms, sample_next
from model.transformer import TinyLM
from serve.batch_decode import DecodeBatch
from serve.token_logprobs import TokenLogprob, TokenNames, log_probs

FINISH_TOOL_CALLS = "tool_calls"
MAX_BATCH = 16  # rows of the continuous decode batch (bin/serve --max-batch)


class QueueFull(Exception):
    """The engine's queue holds ``max_queue`` jobs already."""


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
    tools: frozenset[str] = frozenset()  # names of the offered functions (empty: calls stay text)
    thinking: bool | None = None  # enable_thinking: the prompt opened (True) or closed (False) the reasoning
    prefill: tuple[int, ...] = ()  # ids of the completion's start already in the prompt (a forced call's start)
    logprobs: int | None = None  # report each new token's log-probability and this many alternatives
    echo: bool = False  # first send the prompt's text (and, with logprobs, its tokens' log-probabilities)
    raw: bool = False  # plain text completion: no parser, special tokens decoded as their text


@dataclass
class Job:
    """One queued request; events flow back to its event loop through ``events``."""

    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    index: int = 0  # the request's choice this job generates (jobs of one request share ``events``)

    def send(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, value))

    def send_parsed(self, events: list[Event]) -> None:
        for event in events:
            self.send("event", event)


class StopFilter:
    """Cuts the parsed answer at the first stop string; holds back a tail that may still become one.

    Stop strings are matched in the text the client sees, within one run of reasoning or content events
    (never inside a tool call, never across a change of kind); the text before a hit is sent with its
    trailing whitespace dropped, and nothing after it."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = Event(CONTENT, "")

    def push(self, events: list[Event]) -> tuple[list[Event], bool]:
        """(events safe to send, stopped?)."""
        out: list[Event] = []
        for event in events:
            if event.kind == TOOL_CALL or event.kind != self.held.kind:
                out += self.flush()
            if event.kind == TOOL_CALL:
                out.append(event)
                continue
            text = self.held.text + event.text
            hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
            if hits:
                self.held = Event(event.kind, "")
                cut = text[:min(hits)].rstrip()
                return out + ([Event(event.kind, cut)] if cut else []), True
            keep = self._stop_prefix(text)
            if keep:  # and the whitespace before it: it is sent only if no stop string follows
                keep = len(text) - len(text[:len(text) - keep].rstrip())
            if keep < len(text):
                out.append(Event(event.kind, text[:len(text) - keep]))
            self.held = Event(event.kind, text[len(text) - keep:])
        return out, False

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is the start of a stop string."""
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        return keep

    def flush(self) -> list[Event]:
        """The held tail, which no stop string can complete any more."""
        held, self.held = self.held, Event(self.held.kind, "")
        return [held] if held.text else []


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

    def __init__(self, model: nn.Module, tokenizer: TokenizerInfo, stop_ids: list[int], max_queue: int = 64,
                 max_batch: int = MAX_BATCH) -> None:
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, stop_ids
        self.stop_set = frozenset(stop_ids)
        self.max_batch = max_batch
        self.running = 0  # jobs in the decode batch
        self.context = model.config.max_position_embeddings
        self.max_token_bytes = max_token_bytes(tokenizer.tokenizer)
        self.names = TokenNames(tokenizer.tokenizer)
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.busy = False
        self.served = 0
        self.cancelled = 0
        self.thread = threading.Thread(target=self._work, name="tinylm-generate", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; QueueFull when ``max_queue`` jobs are already waiting."""
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def close(self) -> None:
        self.jobs.put(None)

    def _work(self) -> None:
        if isinstance(self.model, TinyLM) and self.max_batch > 1:
            self._work_batched()
            return
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

    def _work_batched(self) -> None:
        """Continuous batching: between decode steps, admit queued jobs (up to ``max_batch`` rows; block for
        one only when none runs), then step every row once and retire the rows that finished."""
        self.model.eval()
        batch = DecodeBatch(self.model, self.max_batch)
        rows: list[Row] = []
        while True:
            while len(rows) < self.max_batch:
                if not rows:  # idle until a job comes
                    self.running, self.busy = 0, False
                try:
                    job = self.jobs.get(block=not rows)
                except queue.Empty:
                    break
                if job is None:
                    return
                self.busy = True
                row = self._admit(batch, job)
                if row is not None:
                    rows.append(row)
            self.running = len(rows)
            if not rows:
                self.busy = False
                continue
            try:
                with torch.inference_mode():
                    logits = batch.step([row.fed for row in rows])
            except Exception as e:  # report to every row, never kill the worker
                for row in rows:
                    self._fail(row.job, e)
                rows.clear()
                batch.n = 0
                self.running, self.busy = 0, False
                continue
            for i in reversed(range(len(rows))):  # reversed: a retired row's place goes to an already stepped one
                if not self._advance(rows[i], logits[i]):
                    batch.remove(i)
                    rows[i] = rows[-1]
                    rows.pop()
            self.running, self.busy = len(rows), bool(rows)

    def _fail(self, job: Job, e: Exception) -> None:
        job.send("error", f"generation failed: {type(e).__name__}: {e}")
        self.served += 1

    def _admit(self, batch: DecodeBatch, job: Job) -> Row | None:
        """Prefill ``job`` into the batch and take its first token; None when it is already finished."""
        if job.cancelled.is_set():
            self.cancelled += 1
            self.served += 1
            return None
        try:
            s = job.sampling
            answer = Answer(self, job)
            if s.max_tokens == 0:
                answer.end(FINISH_LENGTH)
                self.served += 1
                return None
            device = batch.device
            uniforms = row_uniforms(1, s.max_tokens, device, seeds=[s.seed])[0] if s.temperature > 0 else None
            seen = None
            if s.repetition_penalty != 1.0:
                seen = torch.zeros((1, self.model.config.vocab_size), dtype=torch.bool, device=device)
                seen[0, torch.tensor(s.prompt, device=device)] = True
            with torch.inference_mode():
                logits = batch.add(s.prompt)
        except Exception as e:
            self._fail(job, e)
            return None
        row = Row(job, answer, uniforms, seen)
        if not self._advance(row, logits):
            batch.remove(batch.n - 1)
            return None
        return row

    def _advance(self, row: Row, logits: Tensor) -> bool:
        """Sample ``row``'s next token from its ``logits`` [V] and send what it decides; False when the row
        is finished (a stop id, a stop string, its budget, cancelled or failed)."""
        job, s = row.job, row.job.sampling
        if job.cancelled.is_set():
            self.cancelled += 1
            self.served += 1
            return False
        try:
            scores = apply_repetition_penalty(logits[None], row.seen, s.repetition_penalty)
            uniform = None if row.uniforms is None else row.uniforms[row.steps:row.steps + 1]
            token = int(sample_next(scores, s.temperature, s.top_k, s.top_p, uniform=uniform)[0])
            row.steps += 1
            if token in self.stop_set:
                row.answer.end(FINISH_STOP)
            elif not row.answer.push(token, logits):
                if row.steps < s.max_tokens:
                    if row.seen is not None:
                        row.seen[0, token] = True
                    row.fed = token
                    return True
                row.answer.end(FINISH_LENGTH)
        except Exception as e:
            self._fail(job, e)
            return False
        self.served += 1
        return False

    def _run(self, job: Job) -> bool:
        """Generate ``job`` alone (any model); False when it was cancelled (before it started or at a token)."""
        if job.cancelled.is_set():
            return False
        s = job.sampling
        answer = Answer(self, job)
        generator = torch.Generator(device=next(self.model.parameters()).device).manual_seed(s.seed)
        gen = Generation(self.model, [s.prompt], max_new_tokens=s.max_tokens, temperature=s.temperature,
                         top_k=s.top_k, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
                         stop_ids=self.stop_ids, generator=generator)
        for (token,) in gen:
            if job.cancelled.is_set():
                return False
            if answer.push(token, gen.step_logits[0] if gen.step_logits is not None else None):
                return True
        answer.end(gen.finish_reasons[0] or FINISH_LENGTH)
        return True

    @staticmethod
    def _send(job: Job, events: list[Event], scored: list[TokenLogprob], flush: bool = False) -> list[TokenLogprob]:
        """Send the pending log-probability entries (when events follow, or at the end) then the events;
        returns the entries still pending."""
        if scored and (events or flush):
            job.send("logprobs", scored)
            scored = []
        job.send_parsed(events)
        return scored

    def _echo(self, s: Sampling) -> tuple[str, list[TokenLogprob]]:
        """The prompt's text and, when ``s.logprobs`` is set, its entries: position i > 0 scored by
        ``log_softmax`` of one forward's logits at i - 1 (the first token has no context: logprob None)."""
        decoder = IncrementalDecoder(self.tokenizer.tokenizer, skip_special_tokens=False)
        offsets, pieces = [], []
        for token in s.prompt:
            offsets.append(sum(map(len, pieces)))
            pieces.append(decoder.push(token))
        pieces.append(decoder.flush())
        if s.logprobs is None:
            return "".join(pieces), []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                ids = torch.tensor([s.prompt], dtype=torch.long, device=next(self.model.parameters()).device)
                rows = log_probs(self.model(ids).logits[0])
        finally:
            self.model.train(was_training)
        entries = [self.names.entry(rows[i - 1] if i else None, token, s.logprobs, offsets[i])
                   for i, token in enumerate(s.prompt)]
        return "".join(pieces), entries


@dataclass
class Row:
    """A job in the decode batch: its output side, sampling state and the token to feed next."""

    job: Job
    answer: Answer
    uniforms: Tensor | None  # [max_tokens] draws from the job's seed (None: greedy)
    seen: Tensor | None  # [1, V] ids in the prompt or answer (repetition penalty only)
    steps: int = 0  # tokens sampled
    fed: int = 0


class Answer:
    """One job's output side: its generated ids through the parser (or raw text), the stop strings and the
    log-probabilities, sent to the job as they are decided."""

    def __init__(self, engine: Engine, job: Job) -> None:
        self.engine, self.job, s = engine, job, job.sampling
        self.sampling = s
        if s.echo:
            job.send("echo", engine._echo(s))
        self.text = RawText(engine.tokenizer) if s.raw else CompletionParser(engine.tokenizer, s.tools, s.thinking,
                                                                              s.prefill)
        self.stops = StopFilter(s.stop)
        self.scored: list[TokenLogprob] = []  # entries not yet sent: they go just before the next events
        self.count = 0  # ids generated

    def push(self, token: int, logits: Tensor | None) -> bool:
        """Take one generated id (``logits``: the model's logits it was sampled from); True when a stop
        string ended the answer (then it is done and sent)."""
        self.count += 1
        s = self.sampling
        if s.logprobs is not None and logits is not None:
            offset = self.text.chars if isinstance(self.text, RawText) else 0
            self.scored.append(self.engine.names.entry(log_probs(logits), token, s.logprobs, offset))
        events, hit = self.stops.push(self.text.feed((token,)))
        self.scored = Engine._send(self.job, events, self.scored)
        if hit:
            self._done(FINISH_STOP)
        return hit

    def end(self, reason: str) -> None:
        """The generation ended (``reason``: a stop id or the budget): flush the held text and finish."""
        events, hit = self.stops.push(self.text.finish())
        self.scored = Engine._send(self.job, events if hit else events + self.stops.flush(), self.scored,
                                   flush=not hit)
        self._done(FINISH_STOP if hit else reason)

    def _done(self, finish: str) -> None:
        if isinstance(self.text, CompletionParser) and self.text.calls and finish == FINISH_STOP:
            finish = FINISH_TOOL_CALLS
        prompt = len(self.sampling.prompt)
        usage = {"prompt_tokens": prompt, "completion_tokens": self.count, "total_tokens": prompt + self.count}
        self.job.send("done", (finish, usage))


class RawText:
    """Generated ids as plain text events (special tokens as their text), counting the characters sent."""

    def __init__(self, tokenizer: TokenizerInfo) -> None:
        self.decoder = IncrementalDecoder(tokenizer.tokenizer, skip_special_tokens=False)
        self.chars = 0

    def feed(self, ids: tuple[int, ...]) -> list[Event]:
        text = "".join(self.decoder.push(i) for i in ids)
        return self._event(text)

    def finish(self) -> list[Event]:
        return self._event(self.decoder.flush())

    def _event(self, text: str) -> list[Event]:
        self.chars += len(text)
        return [Event(CONTENT, text)] if text else []
