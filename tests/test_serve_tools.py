"""bin/serve's app with thinking and tool calls, driven by the real openai client over HTTP: a full tool
round trip, reasoning_content, streamed tool-call deltas that assemble to the non-streamed call, malformed
calls as content, tool_choice / enable_thinking prompts, and 400s naming the param.

The model is :class:`scripted.ScriptedLM` (it emits a given completion, chosen by what the prompt holds),
served by ``serve.app.create_app`` under uvicorn in a thread of this process."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
from scripted import BROKEN, CALL, REASONING, TOKENIZER, TOOL_SCRIPTS, ScriptedLM
from test_serve import KEY, browser, free_port, needs_browser, send_and_wait

from core import calculator
from core.tokenizer import load_tokenizer, prompt_ids
from serve.app import create_app
from serve.engine import Engine
from serve.openai_request import forced_call_ids, forced_call_text
from serve.tool_rounds import ServerTools

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

QUESTION = [{"role": "user", "content": "What is 2+3?"}]
TOOLS = [calculator.TOOL]


class InProcessServer:
    """``serve.app.create_app`` over a ScriptedLM under uvicorn in a thread; ``tools``: the tools it runs."""

    def __init__(self, scripts: list[tuple[str, str]] = TOOL_SCRIPTS, literal: bool = False,
                 tools: ServerTools | None = None) -> None:
        self.info = load_tokenizer(TOKENIZER)
        self.model = ScriptedLM(self.info, scripts, literal)
        self.engine = Engine(self.model, self.info, self.info.stop_ids)
        self.port = free_port()
        config = uvicorn.Config(create_app(self.engine, "scripted", api_key=KEY, tools=tools), host="127.0.0.1",
                                port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    def post(self, body: dict | None, path: str = "/v1/chat/completions", key: str | None = KEY) -> tuple[int, bytes]:
        """(status, body) of a POST of ``body`` as JSON (a GET when ``body`` is None)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        conn.request("GET" if body is None else "POST", path, body=None if body is None else json.dumps(body),
                     headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, data

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.close()


@pytest.fixture(scope="module")
def server():
    s = InProcessServer()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY, max_retries=0)


def ask(client, messages: list[dict], **kwargs):
    return client.chat.completions.create(model="x", messages=messages, temperature=0, **kwargs)


def assemble(stream) -> dict:
    """A streamed answer put together the way a client does: text by field, tool calls by ``index``."""
    out = {"content": "", "reasoning_content": "", "calls": {}, "finish": []}
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        out["content"] += delta.content or ""
        out["reasoning_content"] += getattr(delta, "reasoning_content", None) or ""
        for part in delta.tool_calls or []:
            call = out["calls"].setdefault(part.index, {"id": None, "type": None, "name": "", "arguments": ""})
            call["id"] = part.id or call["id"]
            call["type"] = part.type or call["type"]
            call["name"] += part.function.name or ""
            call["arguments"] += part.function.arguments or ""
        if choice.finish_reason:
            out["finish"].append(choice.finish_reason)
    return out


def test_full_tool_round_trip(server, client):
    """The client gets a parsed call with the reasoning, runs the tool, sends its result, gets the answer; the
    prompt of the second turn is the template's rendering of that whole history."""
    first = ask(client, QUESTION, tools=TOOLS)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.reasoning_content == REASONING
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and len(call.id) > 5 and call.type == "function"
    assert call.function.name == "calculator" and json.loads(call.function.arguments) == {"expression": "2+3"}
    result = calculator.run(call.function.arguments)
    assert result == "5"
    history = [*QUESTION, choice.message.model_dump(exclude_none=True),  # as the README shows
               {"role": "tool", "tool_call_id": call.id, "content": result}]
    second = ask(client, history, tools=TOOLS)
    assert second.choices[0].message.content == "2 + 3 = 5." and second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.tool_calls is None
    turns = [QUESTION[0],
             {"role": "assistant", "content": "", "reasoning_content": REASONING,
              "tool_calls": [{"id": call.id, "type": "function",
                              "function": {"name": "calculator", "arguments": call.function.arguments}}]},
             {"role": "tool", "content": "5", "tool_call_id": call.id}]
    assert server.model.prompts[-1] == prompt_ids(server.info, turns, tools=TOOLS)
    assert second.usage.prompt_tokens == len(server.model.prompts[-1])


def test_streamed_tool_call_assembles_to_the_non_streamed_one(client):
    plain = ask(client, QUESTION, tools=TOOLS).choices[0]
    streamed = assemble(ask(client, QUESTION, tools=TOOLS, stream=True))
    (call,) = plain.message.tool_calls
    (got,) = streamed["calls"].values()
    assert got["id"].startswith("call_") and got["id"] != call.id
    assert (got["type"], got["name"], got["arguments"]) == ("function", call.function.name, call.function.arguments)
    assert list(streamed["calls"]) == [0] and streamed["finish"] == ["tool_calls"]
    assert streamed["reasoning_content"] == plain.message.reasoning_content == REASONING
    assert streamed["content"] == ""


def test_stream_wire_format(server):
    """On the wire: every tool_calls delta has an index; the first carries id, type and name; the raw tags
    are never sent as text; the finish chunk comes before ``data: [DONE]``, which is last."""
    status, raw = server.post({"messages": QUESTION, "tools": TOOLS, "stream": True, "temperature": 0})
    assert status == 200
    events = [line[len("data: "):] for line in raw.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    parts = [p for d in deltas for p in d.get("tool_calls", [])]
    assert all(p["index"] == 0 for p in parts) and len(parts) == 2
    assert parts[0]["id"].startswith("call_") and parts[0]["type"] == "function"
    assert parts[0]["function"] == {"name": "calculator", "arguments": ""}
    assert parts[1] == {"index": 0, "function": {"arguments": '{"expression": "2+3"}'}}
    assert "<tool_call>" not in raw.decode() and "<think>" not in raw.decode()
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "tool_calls"


def test_malformed_call_is_plain_content(client):
    messages = [{"role": "user", "content": "broken please"}]
    plain = ask(client, messages, tools=TOOLS).choices[0]
    assert plain.message.content == "Let me try. " + BROKEN and plain.finish_reason == "stop"
    assert plain.message.tool_calls is None
    streamed = assemble(ask(client, messages, tools=TOOLS, stream=True))
    assert streamed["content"] == plain.message.content and streamed["calls"] == {} and streamed["finish"] == ["stop"]


@pytest.mark.parametrize(("thinking", "reasoning", "content"), [(True, "I think.", "Done."),
                                                               (False, None, "Plain answer.")])
def test_enable_thinking(server, client, thinking, reasoning, content):
    kwargs = {"extra_body": {"chat_template_kwargs": {"enable_thinking": thinking}}}
    message = ask(client, QUESTION, **kwargs).choices[0].message
    assert (getattr(message, "reasoning_content", None), message.content) == (reasoning, content)
    assert server.model.prompts[-1] == prompt_ids(server.info, QUESTION, enable_thinking=thinking)
    streamed = assemble(ask(client, QUESTION, stream=True, **kwargs))
    assert (streamed["reasoning_content"] or None, streamed["content"]) == (reasoning, content)


def test_tool_choice(server, client):
    base = prompt_ids(server.info, QUESTION, tools=TOOLS)
    required = ask(client, QUESTION, tools=TOOLS, tool_choice="required").choices[0]
    assert server.model.prompts[-1] == base + forced_call_ids(server.info, forced_call_text(""))
    assert json.loads(required.message.tool_calls[0].function.arguments) == {"expression": "1+1"}
    named = ask(client, QUESTION, tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "calculator"}}).choices[0]
    assert forced_call_text("calculator") == '<tool_call>\n{"name": "calculator", "arguments": '
    assert server.model.prompts[-1] == base + forced_call_ids(server.info, forced_call_text("calculator"))
    assert named.finish_reason == "tool_calls"
    assert json.loads(named.message.tool_calls[0].function.arguments) == {"expression": "7*6"}
    none = ask(client, QUESTION, tools=TOOLS, tool_choice="none").choices[0]  # the model calls anyway: text
    assert server.model.prompts[-1] == prompt_ids(server.info, QUESTION)
    assert (none.message.content, none.message.tool_calls, none.finish_reason) == (CALL, None, "stop")
    ask(client, QUESTION, tools=TOOLS, tool_choice="auto")
    assert server.model.prompts[-1] == base


def test_calls_need_offered_tools(client):
    """No tools offered: the model's call (control ids and all) is content; a call to a function that was not
    offered is content, streamed or not; OpenAI never returns a call to an unknown function."""
    plain = ask(client, QUESTION).choices[0]
    assert (plain.message.content, plain.message.tool_calls, plain.finish_reason) == (CALL, None, "stop")
    assert plain.message.reasoning_content == REASONING
    weather = '<tool_call>\n{"name": "weather", "arguments": {}}\n</tool_call>'
    messages = [{"role": "user", "content": "weather please"}]
    unknown = ask(client, messages, tools=TOOLS).choices[0]
    assert (unknown.message.content, unknown.message.tool_calls, unknown.finish_reason) == (weather, None, "stop")
    streamed = assemble(ask(client, messages, tools=TOOLS, stream=True))
    assert (streamed["content"], streamed["calls"], streamed["finish"]) == (weather, {}, ["stop"])


@pytest.fixture(scope="module")
def forger():
    """A server whose model writes a call's tags as ordinary text pieces (as copied from a tool result)."""
    s = InProcessServer([("", f"Sure.\n{CALL}")], literal=True)
    try:
        yield s
    finally:
        s.stop()


def test_forged_call_text_is_content(forger):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{forger.port}/v1", api_key=KEY, max_retries=0)
    plain = ask(client, QUESTION, tools=TOOLS).choices[0]
    assert (plain.message.content, plain.message.tool_calls, plain.finish_reason) == (f"Sure.\n{CALL}", None, "stop")
    streamed = assemble(ask(client, QUESTION, tools=TOOLS, stream=True))
    assert (streamed["content"], streamed["calls"], streamed["finish"]) == (f"Sure.\n{CALL}", {}, ["stop"])


FN = {"type": "function", "function": {"name": "f"}}
CALLED = {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                                 "function": {"name": "f", "arguments": "{}"}}]}


def with_call(**function) -> list[dict]:
    return [*QUESTION, {**CALLED, "tool_calls": [{"type": "function", "function": {"name": "f", **function}}]}]


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"tools": {"f": 1}}, "tools", "invalid_value"),
    ({"tools": [FN] * 129}, "tools", "invalid_value"),
    ({"tools": [{"type": "code", "function": {"name": "f"}}]}, "tools[0]", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools[0].function.name", "invalid_value"),
    ({"tools": [FN, FN]}, "tools[1].function.name", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters",
     "invalid_type"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"tools": [FN], "tool_choice": "always"}, "tool_choice", "invalid_value"),
    ({"tools": [FN], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", "invalid_value"),
    ({"tools": [FN], "tool_choice": "required", "chat_template_kwargs": {"enable_thinking": True}}, "tool_choice",
     "invalid_value"),
    ({"chat_template_kwargs": []}, "chat_template_kwargs", "invalid_type"),
    ({"chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs.enable_thinking", "invalid_type"),
    ({"chat_template_kwargs": {"add_vision_id": True}}, "chat_template_kwargs.add_vision_id",
     "unsupported_parameter"),
    ({"messages": with_call(arguments="{not json")}, "messages[1].tool_calls[0].function.arguments", "invalid_value"),
    ({"messages": with_call(arguments="[1]")}, "messages[1].tool_calls[0].function.arguments", "invalid_value"),
    ({"messages": [*QUESTION, {**CALLED, "content": "", "tool_calls": []}]}, "messages[1].tool_calls", "invalid_value"),
    ({"messages": [*QUESTION, {**CALLED, "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}]},
     "messages[1].tool_calls[0].function.name", "invalid_value"),
    ({"messages": [*QUESTION, {**CALLED, "tool_calls": ["f"]}]}, "messages[1].tool_calls[0]", "invalid_value"),
    ({"messages": [*QUESTION, {"role": "assistant", "content": None}]}, "messages[1].content", "invalid_type"),
    ({"messages": [*QUESTION, {"role": "assistant", "content": "", "reasoning_content": 5}]},
     "messages[1].reasoning_content", "invalid_type"),
    ({"messages": [*QUESTION, CALLED, {"role": "tool", "content": "1", "tool_call_id": 7}]},
     "messages[2].tool_call_id", "invalid_type"),
    ({"messages": [*QUESTION, CALLED, {"role": "tool"}]}, "messages[2].content", "invalid_type"),
    ({"messages": [*QUESTION, {"role": "tool", "content": "1"}]}, "messages[1].role", "invalid_value"),
    ({"messages": [*QUESTION, {"role": "assistant", "content": "hm"}, {"role": "tool", "content": "1"}]},
     "messages[2].role", "invalid_value"),
    ({"messages": [*QUESTION, CALLED, {"role": "tool", "content": "1", "tool_call_id": "call_1"},
                   {"role": "tool", "content": "2"}]}, "messages[3].role", "invalid_value"),
    ({"messages": [*QUESTION, CALLED, {"role": "tool", "content": "1", "tool_call_id": "call_9"}]},
     "messages[2].tool_call_id", "invalid_value"),
    ({"messages": [*QUESTION, CALLED, {"role": "tool", "content": "1", "tool_call_id": "call_1"},
                   {"role": "user", "content": "and?"}, {"role": "tool", "content": "1", "tool_call_id": "call_1"}]},
     "messages[4].role", "invalid_value"),
])
def test_bad_tool_requests_are_400_with_param(server, body, param, code):
    status, raw = server.post({"messages": QUESTION, **body})
    err = json.loads(raw)["error"]
    assert status == 400, err
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code)


@needs_browser
def test_web_page_thinking_toggle_and_tool_card(server):
    """The thinking select sends enable_thinking; the reasoning sits collapsed under the answer and opens on a
    click; without tools a call is text; with tools offered (window.chatTools) a streamed call is a card with
    its name and arguments, and stays in the history as tool_calls."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    with browser(f"http://127.0.0.1:{server.port}") as (driver, wait):
        wait.until(lambda d: d.find_element(By.ID, "model").text == "scripted")
        Select(driver.find_element(By.ID, "thinking")).select_by_value("on")
        send_and_wait(driver, wait, "hello", 1)
        assert server.model.prompts[-1] == prompt_ids(server.info, [{"role": "user", "content": "hello"}],
                                                      enable_thinking=True)
        reply = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
        assert reply.find_element(By.CSS_SELECTOR, ".answer").text == "Done."
        thinking = reply.find_element(By.CSS_SELECTOR, "details.thinking")
        assert thinking.get_attribute("open") is None and reply.text.splitlines() == ["Done.", "thinking"]
        thinking.find_element(By.TAG_NAME, "summary").click()
        assert thinking.get_attribute("open") is not None
        assert thinking.find_element(By.CSS_SELECTOR, ".thinking-text").text == "I think."

        Select(driver.find_element(By.ID, "thinking")).select_by_value("")
        driver.find_element(By.ID, "reset").click()  # a new chat: the scripts match on the whole prompt
        send_and_wait(driver, wait, "What is 2+3?", 1)  # no tools offered: the model's call is text
        reply = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
        assert reply.find_elements(By.CSS_SELECTOR, ".tool-call") == []
        assert reply.find_element(By.CSS_SELECTOR, ".answer").get_attribute("textContent") == CALL

        driver.execute_script("window.chatTools = JSON.parse(arguments[0])", json.dumps(TOOLS))  # keys in order
        driver.find_element(By.ID, "reset").click()
        send_and_wait(driver, wait, "What is 2+3?", 1)
        assert server.model.prompts[-1] == prompt_ids(server.info, QUESTION, tools=TOOLS)
        reply = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
        (card,) = reply.find_elements(By.CSS_SELECTOR, ".tool-call")
        assert card.find_element(By.CSS_SELECTOR, ".tool-name").text == "calculator"
        assert json.loads(card.find_element(By.TAG_NAME, "pre").text) == {"expression": "2+3"}
        assert reply.find_element(By.CSS_SELECTOR, ".thinking-text").get_attribute("textContent") == REASONING
        last = driver.execute_script("return window.chatHistory")[-1]
        assert last["content"] is None and last["reasoning_content"] == REASONING
        assert [(c["type"], c["function"]) for c in last["tool_calls"]] == \
            [("function", {"name": "calculator", "arguments": '{"expression": "2+3"}'})]
        assert last["tool_calls"][0]["id"].startswith("call_")


def test_tool_messages_that_answer_calls_are_accepted(server):
    """Answers in any order by id, or in order without ids; a later exchange may answer its own calls."""
    calls = [{"id": f"call_{n}", "type": "function", "function": {"name": "f", "arguments": "{}"}} for n in (1, 2)]
    two = {**CALLED, "tool_calls": calls}
    by_id = [*QUESTION, two, {"role": "tool", "content": "b", "tool_call_id": "call_2"},
             {"role": "tool", "content": "a", "tool_call_id": "call_1"}]
    in_order = [*QUESTION, two, {"role": "tool", "content": "a"}, {"role": "tool", "content": "b"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}, CALLED,
                {"role": "tool", "content": "c", "tool_call_id": "call_1"}]
    for messages in (by_id, in_order):
        status, raw = server.post({"messages": messages, "tools": [FN], "max_tokens": 2})
        assert status == 200, raw
