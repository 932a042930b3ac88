"""Server-side tools (bin/serve --tools, serve/tool_rounds.py): GET /v1/tools, a "run_tools" request whose calls
the server runs through core/tools.py and whose answer it continues (stream and not), the round limit, calls
that are content (a function not offered, an unknown one), a tool's error as the tool turn, the OpenAI
behaviour without "run_tools" or without --tools, the 400s; and the web page in headless Chromium: it lists
the server's tools, a person ticks calculate_math and asks, the card shows the call and its result, the answer
follows; regenerate and clear.

The model is :class:`scripted.ScriptedLM`: it writes a call (as the tokenizer's control ids) until the prompt
holds the tool's result, then the answer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from scripted import ScriptedLM  # noqa: F401  (the model behind InProcessServer)
from test_serve import ROOT, browser, needs_browser
from test_serve_tools import InProcessServer

from core import tools as builtin_tools
from core.tokenizer import prompt_ids
from serve.openai_request import forced_call_ids, forced_call_text
from serve.tool_rounds import ServerTools

openai = pytest.importorskip("openai")


def call(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


ANSWER = "128 × 74 = 9472."
REFUSED = "The calculator refused that."
SCRIPTS = [  # first needle in the prompt wins
    ('<tool_response>\n{"result": "9472"}\n</tool_response>', ANSWER),
    ('<tool_response>\n{"error": ', REFUSED),
    ("keep calling", call("calculate_math", {"expression": "1+1"})),
    ("what time", "Let me look. " + call("get_current_time", {})),
    ("run a shell", call("shell", {"command": "ls"})),
    ("divide by zero", call("calculate_math", {"expression": "1/0"})),
    ("assistant\n<tool_call>\n", call("calculate_math", {"expression": "128*74"})[len("<tool_call>\n"):]),  # forced
    ("", call("calculate_math", {"expression": "128*74"})),
]
CALC = builtin_tools.tools_schema(["calculate_math"])
QUESTION = [{"role": "user", "content": "What is 128*74?"}]
MAX_ROUNDS = 2


@pytest.fixture(scope="module")
def server():
    s = InProcessServer(SCRIPTS, tools=ServerTools(builtin_tools.BUILTIN, MAX_ROUNDS))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def plain_server():
    """A server started without --tools."""
    s = InProcessServer(SCRIPTS)
    try:
        yield s
    finally:
        s.stop()


def run_tools(server, messages: list[dict], tools: list[dict] = CALC, **extra) -> tuple[int, dict]:
    status, raw = server.post({"messages": messages, "tools": tools, "run_tools": True, "temperature": 0, **extra})
    return status, json.loads(raw)


def sse(raw: bytes) -> list:
    events = [part[len("data: "):] for part in raw.decode().split("\n\n") if part]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def test_tools_endpoint_lists_what_the_server_runs(server, plain_server):
    status, raw = server.post(None, "/v1/tools")
    assert status == 200
    assert json.loads(raw) == {"object": "list", "data": builtin_tools.tools_schema(builtin_tools.BUILTIN),
                               "max_rounds": MAX_ROUNDS}
    status, raw = plain_server.post(None, "/v1/tools")
    assert (status, json.loads(raw)) == (200, {"object": "list", "data": [], "max_rounds": 0})
    assert server.post(None, "/v1/tools", key=None)[0] == 401


def test_the_server_runs_the_call_appends_the_result_and_continues(server):
    """Two rounds: the call is run by core/tools.py, its result is the tool turn, and the second prompt is the
    template's rendering of exactly the history a client running the tool would send."""
    before = len(server.model.prompts)
    status, body = run_tools(server, QUESTION)
    assert status == 200, body
    (choice,) = body["choices"]
    first, tool, final = choice["messages"]
    (made,) = first["tool_calls"]
    assert first["content"] is None and made["id"].startswith("call_")
    assert made["function"] == {"name": "calculate_math", "arguments": '{"expression": "128*74"}'}
    assert tool == {"role": "tool", "tool_call_id": made["id"], "name": "calculate_math",
                    "content": '{"result": "9472"}'}
    assert final == choice["message"] == {"role": "assistant", "content": ANSWER}
    assert choice["finish_reason"] == "stop"
    prompts = server.model.prompts[before:]
    assert len(prompts) == 2
    client_history = [*QUESTION, first, {"role": "tool", "tool_call_id": made["id"], "content": '{"result": "9472"}'}]
    assert prompts[1] == prompt_ids(server.info, client_history, tools=CALC)
    assert body["usage"]["prompt_tokens"] == len(prompts[0]) + len(prompts[1])


def test_a_forced_tool_choice_holds_for_the_first_round_only(server):
    """tool_choice "required" prefills the first prompt with the call's start; the next round is "auto" (no
    prefill), rendered like the history a client would send."""
    before = len(server.model.prompts)
    status, body = run_tools(server, QUESTION, tool_choice="required")
    assert status == 200, body
    first, tool, final = body["choices"][0]["messages"]
    assert first["tool_calls"][0]["function"]["arguments"] == '{"expression": "128*74"}'
    assert final["content"] == ANSWER
    prompts = server.model.prompts[before:]
    prefill = forced_call_ids(server.info, forced_call_text("", server.info.chat_family))
    assert prompts[0] == prompt_ids(server.info, QUESTION, tools=CALC) + prefill
    history = [*QUESTION, first, {"role": "tool", "tool_call_id": tool["tool_call_id"], "content": tool["content"]}]
    assert prompts[1] == prompt_ids(server.info, history, tools=CALC)


def test_streamed_rounds_carry_the_same_messages(server):
    status, raw = server.post({"messages": QUESTION, "tools": CALC, "run_tools": True, "temperature": 0,
                               "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    events = sse(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert [d["role"] for d in deltas if "role" in d] == ["assistant", "tool", "assistant"]
    head = next(d["tool_calls"][0] for d in deltas if "tool_calls" in d)
    tool = next(d for d in deltas if d.get("role") == "tool")
    assert tool == {"role": "tool", "tool_call_id": head["id"], "name": "calculate_math",
                    "content": '{"result": "9472"}'}
    assert "".join(d.get("content") or "" for d in deltas if d.get("role") != "tool") == ANSWER
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert [f for f in finishes if f] == ["stop"] and finishes[-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_the_round_limit_returns_the_last_calls_unrun(server):
    """A model that calls forever: --max-tool-rounds rounds are run, the next completion's call comes back as a
    call (finish tool_calls), not run."""
    before = len(server.model.prompts)
    status, body = run_tools(server, [{"role": "user", "content": "keep calling"}])
    assert status == 200, body
    (choice,) = body["choices"]
    roles = [m["role"] for m in choice["messages"]]
    assert roles == ["assistant", "tool"] * MAX_ROUNDS + ["assistant"]
    assert all(m["content"] == '{"result": "2"}' for m in choice["messages"] if m["role"] == "tool")
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["tool_calls"]
    assert len(server.model.prompts) - before == MAX_ROUNDS + 1


@pytest.mark.parametrize("question", ["what time is it?", "run a shell"])
def test_a_call_to_a_function_not_offered_is_content_and_nothing_runs(server, question):
    """get_current_time is built in but not offered; shell is no tool at all: both stay text."""
    before = len(server.model.prompts)
    status, body = run_tools(server, [{"role": "user", "content": question}])
    assert status == 200, body
    (choice,) = body["choices"]
    assert len(choice["messages"]) == 1 and "tool_calls" not in choice["message"]
    assert "<tool_call>" in choice["message"]["content"] and choice["finish_reason"] == "stop"
    assert len(server.model.prompts) - before == 1


def test_a_tools_error_is_the_tool_turn_and_the_answer_goes_on(server):
    status, body = run_tools(server, [{"role": "user", "content": "divide by zero"}])
    assert status == 200, body
    first, tool, final = body["choices"][0]["messages"]
    assert json.loads(tool["content"]).keys() == {"error"}
    assert tool["tool_call_id"] == first["tool_calls"][0]["id"]
    assert final["content"] == REFUSED


def test_without_run_tools_the_api_answers_as_openai_does(server, plain_server):
    """With --tools on, a request without run_tools gets the call back to run; with --tools off, run_tools is a
    400 naming it."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="test-key", max_retries=0)
    before = len(server.model.prompts)
    reply = client.chat.completions.create(model="x", messages=QUESTION, tools=CALC, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "calculate_math"
    assert not hasattr(choice, "messages") or choice.messages is None
    assert len(server.model.prompts) - before == 1
    status, body = run_tools(plain_server, QUESTION)
    assert status == 400
    assert (body["error"]["param"], body["error"]["code"]) == ("run_tools", "unsupported_parameter")


@pytest.mark.parametrize("extra,param,code", [
    ({"n": 2}, "n", "invalid_value"),
    ({"logprobs": True}, "logprobs", "unsupported_parameter"),
    ({"run_tools": "yes"}, "run_tools", "invalid_type"),
    ({"tools": [*CALC, {"type": "function", "function": {"name": "shell"}}]}, "tools[1].function.name",
     "invalid_value"),
])
def test_bad_run_tools_requests_are_400_with_param(server, extra, param, code):
    status, body = run_tools(server, QUESTION, **extra)
    assert status == 400, body
    assert (body["error"]["param"], body["error"]["code"]) == (param, code)


@pytest.mark.parametrize("args,message", [
    (["--tools", "calculate_math,rm"], "bin/serve: error: --tools: unknown tool(s) rm; built in: "),
    (["--max-tool-rounds", "0"], "bin/serve: error: argument --max-tool-rounds: "),
])
def test_bin_serve_refuses_bad_tool_flags_in_one_line(args, message):
    proc = subprocess.run([sys.executable, str(ROOT / "bin" / "serve"), "--ckpt", "x", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith(message), proc.stderr


# ---- the web page ---------------------------------------------------------------------------------------

def finished(driver, messages: int) -> bool:
    return len(driver.execute_script("return window.chatHistory")) == messages and \
        not driver.execute_script("return window.chatBusy")


@needs_browser
def test_web_page_offers_the_servers_tools_runs_a_call_and_regenerates(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    with browser(f"http://127.0.0.1:{server.port}") as (driver, wait):
        wait.until(lambda d: [t.get_attribute("value") for t in d.find_elements(By.CSS_SELECTOR, "#tools input")]
                   == list(builtin_tools.BUILTIN))
        driver.find_element(By.CSS_SELECTOR, "#tools input[value=calculate_math]").click()
        Select(driver.find_element(By.ID, "thinking")).select_by_value("off")
        before = len(server.model.prompts)
        driver.find_element(By.ID, "input").send_keys("What is 128*74?")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: finished(d, 4))

        def check_page() -> None:
            first, final = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            (card,) = first.find_elements(By.CSS_SELECTOR, ".tool-call")
            assert card.find_element(By.CSS_SELECTOR, ".tool-name").text == "calculate_math"
            assert json.loads(card.find_element(By.CSS_SELECTOR, ".tool-arguments").text) == {"expression": "128*74"}
            assert card.find_element(By.CSS_SELECTOR, ".tool-result").text == '{"result": "9472"}'
            assert final.find_element(By.CSS_SELECTOR, ".answer").text == ANSWER
            assert [m.text for m in driver.find_elements(By.CSS_SELECTOR, ".msg.user")] == ["What is 128*74?"]
            history = driver.execute_script("return window.chatHistory")
            assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
            assert history[2]["tool_call_id"] == history[1]["tool_calls"][0]["id"]
            assert history[3] == {"role": "assistant", "content": ANSWER}

        check_page()
        prompts = server.model.prompts[before:]
        assert len(prompts) == 2  # the thinking switch holds for every round
        assert prompts[0] == prompt_ids(server.info, QUESTION, tools=CALC, enable_thinking=False)
        history = driver.execute_script("return window.chatHistory")
        assert prompts[1] == prompt_ids(server.info, [*QUESTION, history[1], history[2]], tools=CALC,
                                        enable_thinking=False)

        driver.find_element(By.ID, "regenerate").click()
        wait.until(lambda d: len(server.model.prompts) == before + 4 and finished(d, 4))
        check_page()  # the exchange replaced, not added
        assert server.model.prompts[before + 2] == prompts[0]

        driver.find_element(By.ID, "reset").click()
        assert driver.find_elements(By.CSS_SELECTOR, ".msg") == []
        assert driver.execute_script("return window.chatHistory") == []
