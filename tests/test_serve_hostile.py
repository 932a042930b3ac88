"""bin/serve under hostile clients: body limits (413 before reading), stalled bodies (408) while /health
answers, non-finite / out-of-range / wrongly typed values (400 with ``param``), lone surrogates, deep
nesting, odd Authorization headers (401), disconnects that cancel generation, and a full queue (503).

One server (an "endless" checkpoint that greedily repeats one token, so a generation runs until its
max_tokens; --max-queue 1; --body-timeout 3) serves every test here. Raw HTTP goes through sockets on
127.0.0.1 only; every wait is bounded by a count and a deadline, and order is asserted, not speed.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from scripted import TOKENIZER, _save
from test_serve import HI, KEY, ROOT, Server, request

from core.tokenizer import load_tokenizer, prompt_ids
from model import ModelConfig, TinyLM
from serve.engine import max_token_bytes
from serve.openai_request import APIError, encode_prompt, parse_body

openai = pytest.importorskip("openai")

BODY_TIMEOUT = 3
LIMIT = 1 << 20  # bin/serve's default --max-body-bytes
CONTEXT = 1024  # the tiny preset's context
REPEATED = "a"


def endless_checkpoint(folder: Path) -> Path:
    """The tiny model wired (as in scripted.py) so that every position predicts REPEATED: all embeddings
    are the first unit vector, lm_head maps it to REPEATED; attention and MLP outputs are zero."""
    info = load_tokenizer(TOKENIZER)
    target = info.tokenizer.token_to_id(REPEATED)
    assert target is not None and target not in info.special_ids.values()
    torch.manual_seed(0)
    model = TinyLM(ModelConfig.from_preset("tiny", tie_word_embeddings=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "embed_tokens.weight", "lm_head.weight")):
                p.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[target, 0] = 1.0
    return _save(model, folder)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = endless_checkpoint(tmp_path_factory.mktemp("endless"))
    s = Server(ckpt, "--api-key", KEY, "--max-queue", "1", "--max-batch", "1", "--body-timeout", str(BODY_TIMEOUT))
    try:
        yield s.wait()
    finally:
        s.stop()


# ---- raw HTTP helpers (127.0.0.1 only) ---------------------------------------------------------------------

def connect(server: Server, head: bytes, timeout: float = 60) -> socket.socket:
    """A socket that has sent ``head`` (request line + headers + whatever body bytes are included)."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    s.sendall(head)
    return s


def post_head(length: int | None, key: str | None = KEY, extra: bytes = b"") -> bytes:
    lines = [b"POST /v1/chat/completions HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: application/json"]
    lines.append(b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length)
    if key:
        lines.append(b"Authorization: Bearer " + key.encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + extra


def answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of the response arriving on ``sock``."""
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def assert_error(status: int, body: bytes | dict, want: int, param: str | None, code: str) -> dict:
    err = (json.loads(body) if isinstance(body, bytes) else body)["error"]
    assert status == want, err
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "\n" not in err["message"]
    assert (err["param"], err["code"]) == (param, code), err
    return err


def health(server: Server) -> dict:
    status, body = request(server, "GET", "/health", key=None)
    assert status == 200
    return body


def wait_health(server: Server, ok, what: str, polls: int = 600) -> dict:
    """Poll /health (at most ``polls`` times, 0.05 s apart) until ``ok(body)``."""
    for _ in range(polls):
        body = health(server)
        if ok(body):
            return body
        time.sleep(0.05)
    raise AssertionError(f"/health never showed {what}: last {body}")


def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


# ---- body limits and slow bodies ---------------------------------------------------------------------------

def test_declared_oversized_body_is_413_before_any_byte_is_sent(server):
    with connect(server, post_head(10_000_000)) as s:  # headers only: the 10 MB never comes
        status, headers, body = answer(s)
        assert_error(status, body, 413, None, "request_too_large")
        assert health(server)["status"] == "ok"  # answered while that connection is still open


def test_chunked_body_is_refused_once_past_the_limit(server):
    chunk = b"x" * 65536
    with connect(server, post_head(None)) as s:
        for _ in range(LIMIT // len(chunk) + 2):  # just past the limit; the terminating chunk never comes
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, _, body = answer(s)
    assert_error(status, body, 413, None, "request_too_large")


def test_openai_client_gets_413_for_a_big_body(server):
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as e:  # the client sends all 2 MB, then reads the answer
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "x" * 2 * LIMIT}])
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    assert health(server)["status"] == "ok"


def test_stalled_body_is_408_and_health_answers_meanwhile(server):
    with connect(server, post_head(1000, extra=b'{"messages": ')) as s:
        assert health(server)["status"] == "ok"
        assert not readable(s), "the stalled request was answered before /health"
        status, headers, body = answer(s)  # comes after --body-timeout
        assert_error(status, body, 408, None, "request_timeout")
        assert headers.get("connection") == "close" and s.recv(1) == b""  # and the connection is closed


@pytest.mark.parametrize("head", [b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le", b"G"])
def test_stalled_request_head_is_408_and_health_answers_meanwhile(server, head):
    with connect(server, head) as s:
        assert health(server)["status"] == "ok"
        assert not readable(s), "the stalled head was answered before /health"
        status, headers, body = answer(s)  # uvicorn never calls the app for it; serve/protocol.py answers
        assert_error(status, body, 408, None, "request_timeout")
        assert headers.get("connection") == "close" and s.recv(1) == b""


def test_silent_connection_is_closed(server):
    with connect(server, b"") as s:
        assert health(server)["status"] == "ok"
        assert not readable(s)
        assert s.recv(1) == b""  # closed after --body-timeout, without a response


def test_prompt_that_cannot_fit_is_refused_before_tokenizing(server):
    body = json.dumps({"messages": [{"role": "user", "content": "hello world " * 80_000}]})  # ~0.96 MB
    assert len(body) < LIMIT
    status, reply = request(server, "POST", "/v1/chat/completions", body)
    err = assert_error(status, reply, 400, "messages", "context_length_exceeded")
    assert "bytes" in err["message"]  # the byte bound refused it, not the tokenizer's count


# ---- values ------------------------------------------------------------------------------------------------

def raw_body(**fields: str) -> str:
    """A JSON body with HI as messages and ``fields`` spliced in as raw JSON text (NaN, 1e999, ...)."""
    return "{" + ", ".join([f'"messages": {json.dumps(HI)}', *(f'"{k}": {v}' for k, v in fields.items())]) + "}"


@pytest.mark.parametrize(("body", "param", "code"), [
    (raw_body(temperature="NaN"), "temperature", "invalid_value"),
    (raw_body(top_p="Infinity"), "top_p", "invalid_value"),
    (raw_body(repetition_penalty="-Infinity"), "repetition_penalty", "invalid_value"),
    (raw_body(temperature="1e999"), "temperature", "invalid_value"),
    (raw_body(presence_penalty="NaN"), "presence_penalty", "invalid_value"),
    (raw_body(frequency_penalty="0.5"), "frequency_penalty", "unsupported_parameter"),
    (raw_body(user='{"deep": [1, NaN]}'), "user.deep[1]", "invalid_value"),
    (raw_body(seed=str(2 ** 63)), "seed", "invalid_value"),
    (raw_body(seed="-1"), "seed", "invalid_value"),
    (raw_body(seed="1.5"), "seed", "invalid_type"),
    (raw_body(max_tokens="1" + "0" * 60), "max_tokens", "invalid_value"),
    (raw_body(max_tokens="true"), "max_tokens", "invalid_type"),
    (raw_body(max_completion_tokens="-3"), "max_completion_tokens", "invalid_value"),
    (raw_body(top_k="true"), "top_k", "invalid_type"),
    (raw_body(top_k="-1"), "top_k", "invalid_value"),
    (raw_body(temperature="true"), "temperature", "invalid_type"),
    (raw_body(temperature="[1]"), "temperature", "invalid_type"),
    (raw_body(n="true"), "n", "invalid_type"),
    (raw_body(n="0"), "n", "invalid_value"),
    (raw_body(stream="1"), "stream", "invalid_type"),
    (raw_body(stream_options='{"include_usage": "yes"}'), "stream_options.include_usage", "invalid_type"),
    (raw_body(stop=json.dumps("s" * 257)), "stop", "invalid_value"),
    (raw_body(stop=json.dumps(["a"] * 10_000)), "stop", "invalid_value"),
    (raw_body(logprobs="3"), "logprobs", "invalid_type"),
    (raw_body(logprobs="true", top_logprobs="21"), "top_logprobs", "invalid_value"),
    (raw_body(functions='[{"name": "f"}]'), "functions", "unsupported_parameter"),
    (raw_body(tools='[{"type": "function", "function": {"name": "f", "parameters": {"x": NaN}}}]'),
     "tools[0].function.parameters.x", "invalid_value"),
    (raw_body(tools='[{"type": "function", "function": {"name": "\\ud800"}}]'), "tools[0].function.name",
     "invalid_value"),
    (raw_body(response_format='{"type": "json_object"}'), "response_format", "unsupported_parameter"),
    (raw_body(model="5"), "model", "invalid_type"),
    ('{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content", "invalid_value"),
    ('{"messages": [{"role": "user", "content": "ok \\udfff ok"}]}', "messages[0].content", "invalid_value"),
    ('{"messages": [{"role": "user", "content": "hi", "\\ud800": 1}]}', "messages[0]", "invalid_value"),
    ('{"messages": [{"role": ["user"], "content": "hi"}]}', "messages[0].role", "invalid_value"),
    ('{"messages": [{"role": {"a": 1}, "content": "hi"}]}', "messages[0].role", "invalid_value"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "messages[0].content",
     "invalid_value"),
    ('{"messages": [{"role": "user", "content": null}]}', "messages[0].content", "invalid_type"),
    ('{"messages": "hi"}', "messages", "invalid_value"),
    ('{"messages": [7]}', "messages[0]", "invalid_type"),
    ('{"messages": ' + "[" * 40 + "]" * 40 + "}", "messages" + "[0]" * 31, "invalid_value"),
    ('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}", None, "invalid_json"),
    ('{"messages": [], "x": ' + "9" * 5000 + "}", "x", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', None, "invalid_json"),
    ("NaN", None, "invalid_json"),
])
def test_hostile_values_are_400_with_param(server, body, param, code):
    status, reply = request(server, "POST", "/v1/chat/completions", body)
    assert_error(status, reply, 400, param, code)


def test_openai_client_out_of_range_values(server):
    """The real client (it refuses to send NaN itself: raw bodies above cover that) gets 400 with param."""
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=60)
    for kwargs, param in (({"seed": 2 ** 63}, "seed"), ({"temperature": 2.5}, "temperature"),
                          ({"extra_body": {"top_k": True}}, "top_k"), ({"max_tokens": 10 ** 30}, "max_tokens")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="x", messages=HI, **{"max_tokens": 1, **kwargs})
        assert e.value.status_code == 400 and e.value.body["param"] == param
    ok = client.chat.completions.create(model="x", messages=HI, max_tokens=3, temperature=0, seed=2 ** 63 - 1)
    assert ok.choices[0].message.content == REPEATED * 3


# ---- the Authorization header ------------------------------------------------------------------------------

@pytest.mark.parametrize("header", [
    b"Bearer \xff\xfe\xfd", "Bearer clé".encode(), b"Bearer " + KEY.encode() + b"\xe9", b"Bearer", b"Bearer ",
    b"Basic dGVzdC1rZXk6", KEY.encode(), b"Bearer  wrong", b"\x80\x81",
])
def test_odd_authorization_headers_are_401(server, header):
    head = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + header + b"\r\n\r\n"
    with connect(server, head) as s:
        status, _, body = answer(s)
    assert_error(status, body, 401, None, "invalid_api_key")


@pytest.mark.parametrize("data", [
    b"GET /\xff HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"mes\r\nzz\r\n",
])
def test_unparsable_http_is_json_400(server, data):
    with connect(server, data) as s:
        status, headers, body = answer(s)
        assert_error(status, body, 400, None, "invalid_http_request")
        assert s.recv(1) == b""
    assert health(server)["status"] == "ok"


def test_bearer_scheme_is_case_insensitive(server):
    head = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: bearer " + KEY.encode() + b"\r\n\r\n"
    with connect(server, head) as s:
        assert answer(s)[0] == 200


# ---- disconnects and a full queue --------------------------------------------------------------------------

def long_request(stream: bool) -> bytes:
    """A request whose greedy generation runs ~1000 tokens (the endless model never stops by itself)."""
    room = CONTEXT - len(prompt_ids(load_tokenizer(TOKENIZER), HI))
    body = json.dumps({"messages": HI, "temperature": 0, "max_tokens": room, "stream": stream}).encode()
    return post_head(len(body)) + body


@pytest.mark.parametrize("stream", [False, True])
def test_client_that_disconnects_cancels_its_generation(server, stream):
    idle = wait_health(server, lambda b: not b["busy"] and not b["queued"], "an idle server")
    s = connect(server, long_request(stream))
    wait_health(server, lambda b: b["busy"], "the generation running")
    s.close()
    after = wait_health(server, lambda b: b["served"] > idle["served"] and not b["busy"], "the job ended")
    assert after["cancelled"] == idle["cancelled"] + 1, (idle, after)  # stopped early, not run to its end


def test_full_queue_is_503_and_disconnected_queued_jobs_are_dropped(server):
    idle = wait_health(server, lambda b: not b["busy"] and not b["queued"], "an idle server")
    running = connect(server, long_request(True))
    wait_health(server, lambda b: b["busy"], "the first job running")
    queued = connect(server, long_request(False))
    wait_health(server, lambda b: b["queued"] == 1, "the second job queued")
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="x", messages=HI, max_tokens=1)
    assert e.value.status_code == 503 and e.value.body["code"] == "server_busy"
    assert e.value.response.headers["retry-after"] == "1"
    queued.close()
    running.close()
    after = wait_health(server, lambda b: b["served"] == idle["served"] + 2 and not b["busy"], "both jobs ended")
    assert after["cancelled"] == idle["cancelled"] + 2 and after["queued"] == 0


# ---- in-process: parsing, the byte bound, the tokenizer's refusals -------------------------------------------

def test_parse_body_names_the_path():
    with pytest.raises(APIError) as e:
        parse_body(b'{"a": [{"b": 1}, {"c": Infinity}]}')
    assert (e.value.status, e.value.param, e.value.code) == (400, "a[1].c", "invalid_value")
    assert parse_body(b'{"t": 0.5, "s": 9223372036854775807, "x": "\\u00e9"}') == \
        {"t": 0.5, "s": 2 ** 63 - 1, "x": "é"}


def test_token_byte_bound_holds_for_the_shipped_tokenizer():
    """Every text needs at least ceil(UTF-8 bytes / bound) tokens (what the 'cannot fit' refusal relies on)."""
    tok = load_tokenizer(TOKENIZER).tokenizer
    bound = max_token_bytes(tok)
    assert bound is not None and bound >= max(len(t) for t in tok.get_vocab())
    g = torch.Generator().manual_seed(0)
    vocab = list(tok.get_vocab(with_added_tokens=True))
    pieces = [*vocab, " ", "你好", "鬱", "🙂", "<|im_end|>", "\n"]
    for _ in range(200):
        picks = torch.randint(len(pieces), (int(torch.randint(1, 40, (1,), generator=g)),), generator=g)
        text = "".join(pieces[i] for i in picks.tolist())
        ids = tok.encode(text, add_special_tokens=False).ids
        assert len(ids) * bound >= len(text.encode("utf-8")), text


def test_prompt_tokenization_lets_other_threads_run():
    """While a parser thread encodes a long prompt (``prompt_ids``), Python code on other threads (the event
    loop) runs: a ticker thread advances many times during it, not during a GIL-holding plain ``encode``."""
    info = load_tokenizer(TOKENIZER)
    text = "hello world 你好 " * 20_000
    turns = [{"role": "user", "content": text}]
    ticks, stop = [0], threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0)

    def ticks_during(encode) -> int:
        before = ticks[0]
        encode()
        return ticks[0] - before

    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        held = ticks_during(lambda: info.tokenizer.encode(text, add_special_tokens=False))
        released = ticks_during(lambda: prompt_ids(info, turns))
    finally:
        stop.set()
        thread.join()
    assert released > 20 and released > 10 * max(held, 1), (held, released)


def test_text_the_tokenizer_refuses_is_400_on_messages():
    engine = SimpleNamespace(tokenizer=load_tokenizer(TOKENIZER))
    with pytest.raises(APIError) as e:
        encode_prompt(engine, [{"role": "user", "content": "lone \ud800 surrogate\nsecond line"}])
    assert (e.value.status, e.value.param, e.value.code) == (400, "messages", "invalid_value")
    assert "\n" not in e.value.message and "tokenizer refused" in e.value.message


# ---- bin/serve's own arguments -----------------------------------------------------------------------------

def test_bad_checkpoint_is_one_line_exit_1(tmp_path):
    bogus = tmp_path / "not_a_checkpoint.pt"
    bogus.write_bytes(b"garbage")
    proc = subprocess.run([sys.executable, str(ROOT / "bin" / "serve"), "--ckpt", str(bogus)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bin/serve: error: ") and str(bogus) in lines[0]


@pytest.mark.parametrize(("flag", "value"), [("--body-timeout", "nan"), ("--body-timeout", "0"),
                                             ("--max-body-bytes", "0"), ("--body-timeout", "inf"),
                                             ("--port", "70000"), ("--max-queue", "1e3"), ("--threads", "-1"),
                                             ("--threads", "1000000"), ("--log-level", "loud"),
                                             ("--max-batch", "0"), ("--max-batch", "100000"),
                                             ("--max-tokens", "9" * 5000), ("--api-key", ""),
                                             ("--model-name", "a\udcff"), ("--host", "\udcfe")])
def test_bad_limits_are_usage_errors(flag, value):
    proc = subprocess.run([sys.executable, str(ROOT / "bin" / "serve"), "--ckpt", "x", flag, value],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and flag in proc.stderr.splitlines()[-1]
