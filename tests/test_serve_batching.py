"""Continuous batching in bin/serve: a request's tokens do not depend on what else is in the decode batch
(exactly, on a model whose greedy choices have clear margins), rows join and leave at token boundaries (a
prompt longer than the batch's history, a batch that reaches the end of the cache), cancelling one stream
leaves the others untouched, and the queue limit still answers 503."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch
from scripted import random_checkpoint
from test_serve import KEY, Server
from test_serve_hostile import connect, endless_checkpoint, health, post_head, wait_health

from core.tokenizer import load_tokenizer
from model import ModelConfig, TinyLM
from model.generate import Generation
from serve.batch_decode import DecodeBatch
from serve.engine import Engine, Job, Sampling
from train.loading import load_model

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("one_thread")
MARGIN = 1e-3  # smallest top-1 / top-2 logit gap the exact-equality tests rely on


def greedy(prompt: list[int], max_tokens: int, seed: int = 0, temperature: float = 0.0) -> Sampling:
    return Sampling(prompt, max_tokens, temperature, 1.0, None, 1.0, [], seed, raw=True)


async def answers(engine: Engine, groups: list[list[Sampling]]) -> list[tuple[str, str]]:
    """Submit each group after the previous group's first answers began; (text, finish) per request."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    jobs: list[Job] = []
    texts: dict[int, list[str]] = {}
    done: dict[int, str] = {}
    for group in groups:
        for s in group:
            job = Job(s, loop, events, index=len(jobs))
            jobs.append(job)
            texts[job.index] = []
            engine.submit(job)
        started = 0
        while started < 2 and len(done) < len(jobs):  # let the batch run a little before the next group
            index, kind, value = await events.get()
            started += kind == "event"
            if kind == "event":
                texts[index].append(value.text)
            elif kind == "done":
                done[index] = value[0]
            assert kind != "error", value
    while len(done) < len(jobs):
        index, kind, value = await events.get()
        assert kind != "error", value
        if kind == "event":
            texts[index].append(value.text)
        elif kind == "done":
            done[index] = value[0]
    return [("".join(texts[i]), done[i]) for i in range(len(jobs))]


def margins(model: TinyLM, prompt: list[int], steps: int) -> float:
    """Smallest gap between the two largest logits along the greedy path of ``prompt``."""
    gen = Generation(model, [prompt], max_new_tokens=steps)
    gaps = []
    for _ in gen:
        top = torch.topk(gen.step_logits[0].float(), 2).values
        gaps.append(float(top[0] - top[1]))
    return min(gaps)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    return load_model(random_checkpoint(tmp_path_factory.mktemp("batching")))


def test_batched_answers_equal_alone_answers(random_model):
    lm = random_model
    tok = load_tokenizer().literal
    texts = ["Once upon a time", "The capital of France is", "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18",
             "hi", "A long prompt " * 12, "Numbers: 42"]
    prompts = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    budgets = [12, 30, 7, 25, 16, 20]
    for p, b in zip(prompts, budgets, strict=True):
        assert margins(lm.model, p, b) > MARGIN  # the precondition of exact equality
    requests = [greedy(p, b) for p, b in zip(prompts, budgets, strict=True)]
    alone_engine = Engine(lm.model, lm.tokenizer, [], max_batch=1)
    batch_engine = Engine(lm.model, lm.tokenizer, [], max_batch=4)  # fewer rows than requests: some wait
    try:
        alone = [asyncio.run(answers(alone_engine, [[r]]))[0] for r in requests]
        together = asyncio.run(answers(batch_engine, [requests[:2], requests[2:4], requests[4:]]))
    finally:
        alone_engine.close()
        batch_engine.close()
    assert together == alone
    assert all(finish == "length" for _, finish in alone)


def test_a_cancelled_job_alone_leaves_the_engine_idle(random_model):
    engine = Engine(random_model.model, random_model.tokenizer, [], max_batch=4)
    try:
        job = Job(greedy([5, 6, 7], 50), asyncio.new_event_loop(), asyncio.Queue())
        job.cancelled.set()
        engine.submit(job)
        deadline = time.time() + 30
        while time.time() < deadline and engine.served < 1:
            time.sleep(0.01)
        time.sleep(0.1)
        assert (engine.served, engine.cancelled, engine.busy, engine.running) == (1, 1, False, 0)
    finally:
        engine.close()


@pytest.mark.parametrize("slots", [256, 8])  # the whole context at once; a small cache that grows
def test_rows_move_when_a_longer_prompt_joins_and_when_the_cache_ends(slots):
    torch.manual_seed(1)
    model = TinyLM(ModelConfig.from_preset("tiny", max_position_embeddings=48, initializer_range=0.3)).eval()
    short, longer, third = [7, 8, 9, 10, 11], list(range(10, 40)), list(range(60, 70))  # 5, 30, 10 tokens
    batch = DecodeBatch(model, 3, slots=slots)
    out: dict[str, list[int]] = {}
    rows: list[str] = []  # names of the live rows, in batch order

    def join(name: str, prompt: list[int]) -> None:
        out[name] = [int(batch.add(prompt).argmax())]
        rows.append(name)

    def steps(k: int) -> None:
        for _ in range(k):
            logits = batch.step([out[r][-1] for r in rows])
            for i, r in enumerate(rows):
                out[r].append(int(logits[i].argmax()))

    with torch.inference_mode():
        join("short", short)
        steps(3)  # 8 slots filled
        join("longer", longer)  # 30 > 8: the short row moves right
        steps(17)  # 47 slots: the longer row has its whole budget of 18 tokens
        assert batch.column == 47 or slots < 48
        batch.remove(rows.index("longer"))
        rows.remove("longer")
        join("third", third)
        steps(10)  # past the cache's end: the rows move left by the padding they share
        assert batch.column < 47 and batch.slots <= 48
    for name, prompt in (("short", short), ("longer", longer), ("third", third)):
        n = len(out[name])
        assert margins(model, prompt, n) > MARGIN, name
        assert out[name] == Generation(model, [prompt], max_new_tokens=n).run()[0], name


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    server = Server(endless_checkpoint(tmp_path_factory.mktemp("endless")), "--api-key", KEY, "--max-batch", "2",
                    "--max-queue", "1")
    try:
        yield server.wait()
    finally:
        server.stop()


def long_stream(tokens: int) -> bytes:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": tokens,
                       "stream": True}).encode()
    return post_head(len(body)) + body


def test_cancelling_one_stream_leaves_the_other_untouched(endless):
    idle = wait_health(endless, lambda b: not b["busy"] and not b["queued"], "an idle server")
    client = openai.OpenAI(base_url=endless.base + "/v1", api_key=KEY, max_retries=0, timeout=120)
    doomed = connect(endless, long_stream(900))
    wait_health(endless, lambda b: b["running"] == 1, "the first stream running")
    stream = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], temperature=0,
                                            max_tokens=200, stream=True)
    pieces = []
    for i, chunk in enumerate(stream):
        if i == 5:
            assert health(endless)["running"] == 2  # decoded together
            doomed.close()
        if chunk.choices:
            pieces.append((chunk.choices[0].delta.content or "", chunk.choices[0].finish_reason))
    assert "".join(p for p, _ in pieces) == "a" * 200 and pieces[-1][1] == "length"
    after = wait_health(endless, lambda b: not b["busy"], "the server idle again")
    assert after["cancelled"] == idle["cancelled"] + 1


def test_queue_limit_counts_waiting_requests(endless):
    wait_health(endless, lambda b: not b["busy"] and not b["queued"], "an idle server")
    running = [connect(endless, long_stream(900))]
    wait_health(endless, lambda b: b["running"] == 1, "one stream in the batch")
    running.append(connect(endless, long_stream(900)))
    wait_health(endless, lambda b: b["running"] == 2, "two streams in the batch")
    waiting = connect(endless, long_stream(900))
    wait_health(endless, lambda b: b["queued"] == 1, "the third request queued")
    client = openai.OpenAI(base_url=endless.base + "/v1", api_key=KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert e.value.status_code == 503 and e.value.body["code"] == "server_busy"
    for s in (waiting, *running):
        s.close()
    deadline = time.time() + 60
    while time.time() < deadline and health(endless)["busy"]:
        time.sleep(0.05)
    assert not health(endless)["busy"] and health(endless)["queued"] == 0
