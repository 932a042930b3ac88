"""bin/serve's ``/v1/completions`` and chat ``logprobs`` / ``top_logprobs`` / ``n``: OpenAI's wire format through
the real ``openai`` client (stream and not), ``echo`` log-probabilities equal to tinylm's own scoring of the same
ids, and 400s with ``param`` for every out-of-range or wrongly typed new field."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import torch
from scripted import SCRIPTED_ANSWER, random_checkpoint, scripted_checkpoint
from test_serve import KEY, Server, request

from core.tokenizer import load_tokenizer
from serve.engine import Engine, Job
from serve.openai_request import parse_body
from train.loading import load_model

openai = pytest.importorskip("openai")

HI = [{"role": "user", "content": "hi"}]
PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("completions")
    return {"random": random_checkpoint(root / "random"), "scripted": scripted_checkpoint(root / "scripted")}


@pytest.fixture(scope="module")
def servers(ckpts):
    rand = Server(ckpts["random"], "--api-key", KEY, "--max-body-bytes", "20000")
    scripted = Server(ckpts["scripted"], "--api-key", KEY)
    try:
        yield {"random": rand.wait(), "scripted": scripted.wait()}
    finally:
        rand.stop()
        scripted.stop()


def client_of(server: Server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(ckpts):
    return load_model(str(ckpts["random"]), torch.device("cpu"))


def forward_logprobs(lm, ids: list[int]) -> torch.Tensor:
    """tinylm's own scoring: log_softmax of one forward's logits, [len(ids), V]."""
    with torch.inference_mode():
        return torch.log_softmax(lm.model.eval()(torch.tensor([ids])).logits[0].float(), dim=-1)


def token_bytes(token: str) -> bytes:
    """The bytes of an OpenAI token string ("bytes:\\xNN..." for a piece of a character)."""
    if token.startswith("bytes:"):
        return bytes(int(h, 16) for h in token[len("bytes:"):].split("\\x")[1:])
    return token.encode("utf-8")


def test_completion_wire_format_and_stream_agree(servers):
    client = client_of(servers["random"])
    r = client.completions.create(model="x", prompt=PROMPT, max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0 and choice.logprobs is None and isinstance(choice.text, str)
    assert choice.finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(load_tokenizer().literal.encode(PROMPT, add_special_tokens=False).ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.completions.create(model="x", prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_token_id_prompt_and_logprobs(servers, model):
    ids = load_tokenizer().literal.encode(PROMPT, add_special_tokens=False).ids
    client = client_of(servers["random"])
    r = client.completions.create(model="x", prompt=ids, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    text = r.choices[0].text
    assert b"".join(map(token_bytes, lp.tokens)).decode("utf-8", errors="replace") == text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] <= len(text)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 3 <= len(top) <= 4 and top[token] == value  # the chosen token is always listed
        assert value == max(top.values())  # greedy: the chosen token is the most likely
    # the first generated token's value is the model's log-probability after the prompt
    first = forward_logprobs(model, ids)[-1]
    top_id = int(first.argmax())
    assert math.isclose(lp.token_logprobs[0], float(first[top_id]), abs_tol=1e-4)


def test_echo_scores_the_prompt_like_tinylm(servers, model):
    client = client_of(servers["random"])
    r = client.completions.create(model="x", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = r.choices[0]
    assert choice.text == PROMPT and r.usage.completion_tokens == 0
    ids = load_tokenizer().literal.encode(PROMPT, add_special_tokens=False).ids
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    rows = forward_logprobs(model, ids)
    expected = [float(rows[i - 1, t]) for i, t in enumerate(ids) if i]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert "".join(lp.tokens) == PROMPT and lp.text_offset[-1] == len(PROMPT) - len(lp.tokens[-1])
    # echo with an answer: prompt entries, then the answer's, offsets running on through both
    both = client.completions.create(model="x", prompt=PROMPT, max_tokens=2, echo=True, logprobs=0, temperature=0)
    lp2 = both.choices[0].logprobs
    assert both.choices[0].text.startswith(PROMPT) and len(lp2.tokens) == len(ids) + 2
    assert lp2.text_offset[len(ids)] == len(PROMPT)


def test_echo_logprobs_equal_the_forward_exactly_in_process(model):
    """The engine's prompt scoring is the forward's log_softmax, bit for bit (same process, same kernels)."""
    ids = load_tokenizer().literal.encode(PROMPT, add_special_tokens=False).ids
    engine = Engine(model.model, model.tokenizer, model.stop_ids)
    try:
        body = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2}
        from serve.completion_request import validate_completion
        sampling = validate_completion(engine, parse_body(json.dumps(body).encode())).choices()[0]

        async def run() -> list:
            job = Job(sampling, asyncio.get_running_loop(), asyncio.Queue())
            engine.submit(job)
            got = []
            while not got or got[-1][1] != "done":
                got.append(await job.events.get())
            return got

        messages = asyncio.run(run())
        text, entries = next(value for _, kind, value in messages if kind == "echo")
        rows = forward_logprobs(model, ids)
        assert [e.logprob for e in entries[1:]] == [float(rows[i - 1, t]) for i, t in enumerate(ids) if i]
        assert [e.top[0][2] for e in entries[1:]] == [float(rows[i - 1].max()) for i in range(1, len(ids))]
    finally:
        engine.close()


def test_n_choices_are_the_seeded_single_answers(servers):
    client = client_of(servers["random"])
    many = client.completions.create(model="x", prompt=PROMPT, max_tokens=4, temperature=1.0, seed=7, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    for i, choice in enumerate(many.choices):
        alone = client.completions.create(model="x", prompt=PROMPT, max_tokens=4, temperature=1.0, seed=7 + i)
        assert choice.text == alone.choices[0].text
    assert many.usage.prompt_tokens == alone.usage.prompt_tokens  # the prompt counts once
    batch = client.completions.create(model="x", prompt=[PROMPT, "hello"], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text  # greedy: the same answer n times
    streamed = list(client.completions.create(model="x", prompt=PROMPT, max_tokens=4, temperature=1.0, seed=7, n=3,
                                              stream=True))
    for i, choice in enumerate(many.choices):
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == i) == choice.text


def test_chat_logprobs_top_logprobs_and_n(servers):
    client = client_of(servers["scripted"])
    r = client.chat.completions.create(model="x", messages=HI, temperature=0, logprobs=True, top_logprobs=2, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    for choice in r.choices:
        assert choice.message.content == SCRIPTED_ANSWER
        content = choice.logprobs.content
        assert len(content) == r.usage.completion_tokens // 2
        for entry in content:
            assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
            assert entry.top_logprobs[0].logprob == entry.logprob >= entry.top_logprobs[1].logprob
            assert bytes(entry.bytes) == token_bytes(entry.token)
        assert SCRIPTED_ANSWER in b"".join(bytes(e.bytes) for e in content).decode("utf-8")
    plain = client.chat.completions.create(model="x", messages=HI, temperature=0)
    assert plain.choices[0].logprobs is None
    chunks = list(client.chat.completions.create(model="x", messages=HI, temperature=0, logprobs=True,
                                                 top_logprobs=2, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in r.choices[0].logprobs.content]


@pytest.mark.parametrize(("path", "body", "param", "code"), [
    ("/v1/completions", {"model": "x"}, "prompt", "missing_required_parameter"),
    ("/v1/completions", {"prompt": []}, "prompt", "invalid_type"),
    ("/v1/completions", {"prompt": ""}, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": [1, True]}, "prompt", "invalid_type"),
    ("/v1/completions", {"prompt": [1, 10 ** 9]}, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": ["a", [-1]]}, "prompt[1]", "invalid_value"),
    ("/v1/completions", {"prompt": {"a": 1}}, "prompt", "invalid_type"),
    ("/v1/completions", {"prompt": [5] * 1025}, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 6}, "logprobs", "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs", "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs", "invalid_type"),
    ("/v1/completions", {"prompt": "hi", "n": 10 ** 9}, "n", "invalid_value"),
    ("/v1/completions", {"prompt": ["a", "b"], "n": 9}, "n", "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens", "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "hi", "echo": "yes"}, "echo", "invalid_type"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2}, "best_of", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "hi", "suffix": "x"}, "suffix", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "hi", "temperature": 2.5}, "temperature", "invalid_value"),
    ("/v1/chat/completions", {"messages": HI, "top_logprobs": 21, "logprobs": True}, "top_logprobs",
     "invalid_value"),
    ("/v1/chat/completions", {"messages": HI, "top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ("/v1/chat/completions", {"messages": HI, "logprobs": 1}, "logprobs", "invalid_type"),
    ("/v1/chat/completions", {"messages": HI, "n": 17}, "n", "invalid_value"),
])
def test_bad_fields_are_400_with_param(servers, path, body, param, code):
    status, reply = request(servers["random"], "POST", path, json.dumps(body))
    assert status == 400, reply
    assert (reply["error"]["param"], reply["error"]["code"]) == (param, code)


@pytest.mark.parametrize(("raw", "param"), [
    ('{"prompt": "hi", "temperature": NaN}', "temperature"),
    ('{"prompt": "hi", "logprobs": Infinity}', "logprobs"),
    ('{"prompt": [1, 1e999]}', "prompt[1]"),
    ('{"prompt": "hi", "n": 1' + "0" * 60 + "}", "n"),
])
def test_non_finite_numbers_are_400(servers, raw, param):
    status, reply = request(servers["random"], "POST", "/v1/completions", raw)
    assert status == 400 and reply["error"]["param"] == param, reply


def test_body_limit_holds_for_completions(servers):
    status, reply = request(servers["random"], "POST", "/v1/completions", json.dumps({"prompt": "a" * 30_000}))
    assert status == 413 and reply["error"]["code"] == "request_too_large"
