"""core/completion.py: the incremental completion parser (reasoning / content / tool calls)."""

from __future__ import annotations

import json

import pytest

from core.completion import CONTENT, REASONING, TOOL_CALL, CompletionParser, Event, ToolCall, merged, parse_tool_call

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>'
ADD = ToolCall("calculator", '{"expression": "2+3"}')


def parse(pieces: list[str], prefill: str = "") -> list[Event]:
    parser = CompletionParser(prefill)
    events = [e for piece in pieces for e in parser.feed(piece)]
    return merged(events + parser.finish())


CASES = {
    "plain": ("Hello 你好", [Event(CONTENT, "Hello 你好")]),
    "think then answer": ("<think>\nadd them\n</think>\n\nThe sum is 5.",
                          [Event(REASONING, "add them"), Event(CONTENT, "The sum is 5.")]),
    "reasoning format": ("<think>\nhmm\n</think>\n<answer>\n42\n</answer>",
                         [Event(REASONING, "hmm"), Event(CONTENT, "42")]),
    "call only": (CALL, [Event(TOOL_CALL, call=ADD)]),
    "text around calls": ("Let me add.\n" + CALL + "\n" + CALL + "\nDone <soon>",
                          [Event(CONTENT, "Let me add."), Event(TOOL_CALL, call=ADD), Event(TOOL_CALL, call=ADD),
                           Event(CONTENT, "\nDone <soon>")]),
    "think, then a call": ("<think>\nI need a tool\n</think>\n\n" + CALL,
                           [Event(REASONING, "I need a tool"), Event(TOOL_CALL, call=ADD)]),
    "arguments not JSON": ('<tool_call>\n{"name": "f", "arguments": {oops}}\n</tool_call>',
                           [Event(CONTENT, '<tool_call>\n{"name": "f", "arguments": {oops}}\n</tool_call>')]),
    "body not JSON": ("A <tool_call>call f(1)</tool_call> B",
                      [Event(CONTENT, "A <tool_call>call f(1)</tool_call> B")]),
    "no name": ('<tool_call>{"arguments": {}}</tool_call>',
                [Event(CONTENT, '<tool_call>{"arguments": {}}</tool_call>')]),
    "arguments a list": ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
                         [Event(CONTENT, '<tool_call>{"name": "f", "arguments": [1]}</tool_call>')]),
    "NaN argument": ('<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
                     [Event(CONTENT, '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>')]),
    "unclosed call": ('ok <tool_call>\n{"name": "f"', [Event(CONTENT, 'ok <tool_call>\n{"name": "f"')]),
    "arguments as a JSON string": ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>',
                                   [Event(TOOL_CALL, call=ToolCall("f", '{"x": 1}'))]),
    "missing arguments": ('<tool_call>{"name": "now"}</tool_call>', [Event(TOOL_CALL, call=ToolCall("now", "{}"))]),
    "late <think> is text": ("Sure: <think>x</think>", [Event(CONTENT, "Sure: <think>x</think>")]),
    "tags inside reasoning are text": ("<think>maybe " + CALL + "</think>ok",
                                       [Event(REASONING, "maybe " + CALL), Event(CONTENT, "ok")]),
    "unclosed reasoning": ("<think>\nstill thinking <", [Event(REASONING, "still thinking <")]),
    "partial tag at the end": ("value <tool_ca", [Event(CONTENT, "value <tool_ca")]),
}


@pytest.mark.parametrize("name", CASES)
def test_every_split_point_gives_the_same_events(name):
    text, expected = CASES[name]
    assert parse([text]) == expected
    assert parse(list(text)) == expected  # one character at a time
    for i in range(len(text) + 1):
        assert parse([text[:i], text[i:]]) == expected, f"split at {i}"


def test_completion_that_starts_inside_reasoning():
    """enable_thinking=true: the prompt ends with <think>\\n, so the completion starts inside the reasoning."""
    text = "add 2 and 3\n</think>\n\n" + CALL
    expected = [Event(REASONING, "add 2 and 3"), Event(TOOL_CALL, call=ADD)]
    for i in range(len(text) + 1):
        assert parse([text[:i], text[i:]], prefill="<think>\n") == expected
    assert parse(["The answer."], prefill="<think>\n\n</think>\n\n") == [Event(CONTENT, "The answer.")]


def test_prefilled_call_is_completed_by_the_model():
    """tool_choice naming a function: the prompt ends inside the call; the model writes the rest."""
    prefill = '<tool_call>\n{"name": "calculator", "arguments": '
    assert parse(['{"expression": "2+3"}}\n</tool_call>'], prefill) == [Event(TOOL_CALL, call=ADD)]


def test_events_stream_as_they_are_decided():
    parser = CompletionParser()
    assert parser.feed("<think>\nstep one") == [Event(REASONING, "step one")]
    assert parser.feed("\n") == []  # trailing whitespace waits for more text
    assert parser.feed("two\n</th") == [Event(REASONING, "\ntwo")]
    assert parser.feed("ink>\n\nIt is <") == [Event(CONTENT, "It is")]
    assert parser.feed("tool_call>\n{") == []  # held back until </tool_call>
    assert parser.feed('"name": "f"}\n</tool_call>') == [Event(TOOL_CALL, call=ToolCall("f", "{}"))]
    assert parser.finish() == []


def test_parse_tool_call_arguments_are_canonical_json():
    call = parse_tool_call('\n{"name": "f", "arguments": {"q": "北京", "n": [1, 2.5]}}\n')
    assert call == ToolCall("f", '{"q": "北京", "n": [1, 2.5]}') and json.loads(call.arguments)["q"] == "北京"
    assert parse_tool_call('{"name": "", "arguments": {}}') is None
    assert parse_tool_call("[" * 100000) is None  # too deep to parse: malformed, not a crash


def test_calls_off_leaves_the_tags_as_text():
    parser = CompletionParser(tool_calls=False)
    assert merged(parser.feed("ok " + CALL) + parser.finish()) == [Event(CONTENT, "ok " + CALL)]
