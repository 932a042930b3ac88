"""core/completion.py: the incremental completion parser (generated ids -> reasoning / content / tool calls).

Structure comes only from control ids: the shipped tokenizer has every tag as one id, so a completion
encoded with the full tokenizer (as a trained model writes it) holds structure, while the same characters
encoded literally (ordinary text pieces) are content. A tokenizer without the tags as ids (``TAGLESS``, the
shipped one with its tag ids hidden, and MiniMind-2's) has its tags parsed in the text, but only those the
request made meaningful."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from scripted import TOKENIZER

from core.chat_template import STRUCTURE_TAGS, TOOL_RESPONSE_OPEN
from core.completion import (
    CONTENT,
    REASONING,
    TOOL_CALL,
    CompletionParser,
    Event,
    ToolCall,
    merged,
    parse_completion,
    parse_tool_call,
)
from core.tokenizer import load_tokenizer

INFO = load_tokenizer(TOKENIZER)
TAGLESS = dataclasses.replace(INFO, special_ids={k: v for k, v in INFO.special_ids.items() if k not in STRUCTURE_TAGS})
SHARED_DATA = Path(os.environ.get("TINYLM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TOOLS = ("calculator", "f", "now")
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>'
ADD = ToolCall("calculator", '{"expression": "2+3"}')


def control_ids(text: str) -> list[int]:
    """``text`` as a model with the shipped tokenizer writes it: every tag as its control id."""
    return INFO.tokenizer.encode(text, add_special_tokens=False).ids


def text_ids(text: str) -> list[int]:
    """``text`` as ordinary text pieces: no tag is a control id."""
    return INFO.literal.encode(text, add_special_tokens=False).ids


def parse(chunks: list[list[int]], info=INFO, tools=TOOLS, thinking=None, prefill=()) -> list[Event]:
    parser = CompletionParser(info, tools, thinking, prefill)
    events = [e for chunk in chunks for e in parser.feed(chunk)]
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
    "function not offered": ('<tool_call>{"name": "shell", "arguments": {}}</tool_call>',
                             [Event(CONTENT, '<tool_call>{"name": "shell", "arguments": {}}</tool_call>')]),
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
@pytest.mark.parametrize(("info", "encode"), [(INFO, control_ids), (TAGLESS, text_ids)], ids=["control", "tagless"])
def test_every_split_point_gives_the_same_events(name, info, encode):
    """Tags as control ids (shipped tokenizer) and as text (a tokenizer without them, tools offered) parse the
    same, however the ids are split into feed calls."""
    text, expected = CASES[name]
    ids = encode(text)
    assert parse([ids], info) == expected == parse_completion(info, ids, TOOLS)
    assert parse([[i] for i in ids], info) == expected  # one id at a time
    for i in range(len(ids) + 1):
        assert parse([ids[:i], ids[i:]], info) == expected, f"split at {i}"


@pytest.mark.parametrize("text", [CALL, "<think>\nplan\n</think>\n\nok", "<answer>42</answer>",
                                  "Sure.\n" + CALL + "\n" + CALL])
def test_tag_text_written_as_ordinary_pieces_is_content(text):
    """A model (or a copied tool result) that writes the tags' characters as text pieces forges nothing."""
    ids = text_ids(text)
    assert not set(ids) & set(INFO.special_ids.values())  # the premise: no control id among them
    assert parse([ids]) == [Event(CONTENT, text)]
    assert parse([[i] for i in ids], thinking=None) == [Event(CONTENT, text)]


def test_control_id_calls_need_offered_tools():
    """No tools offered (or tool_choice "none"): a call written with control ids is content; a call to a
    function that was not offered is content."""
    assert parse([control_ids(CALL)], tools=()) == [Event(CONTENT, CALL)]
    assert parse([control_ids("ok " + CALL)], tools=("weather",)) == [Event(CONTENT, "ok " + CALL)]
    parser = CompletionParser(INFO, ("calculator",))
    assert merged(parser.feed(control_ids(CALL)) + parser.finish()) == [Event(TOOL_CALL, call=ADD)]
    assert parser.calls == 1


def test_tagless_tokenizer_parses_only_the_tags_the_request_made_meaningful():
    assert parse([text_ids(CALL)], TAGLESS, tools=()) == [Event(CONTENT, CALL)]  # no tools: text
    assert parse([text_ids(CALL)], TAGLESS) == [Event(TOOL_CALL, call=ADD)]
    thought = "<think>\nplan\n</think>\n\nok"
    assert parse([text_ids(thought)], TAGLESS, thinking=False) == [Event(CONTENT, thought)]
    assert parse([text_ids(thought)], TAGLESS) == [Event(REASONING, "plan"), Event(CONTENT, "ok")]
    assert parse([text_ids("plan\n</think>\n\nok")], TAGLESS, thinking=True) == \
        [Event(REASONING, "plan"), Event(CONTENT, "ok")]


def test_minimind2_tokenizer_parses_tag_text_only_when_meaningful():
    ref = SHARED_DATA / "reference_tokenizer"
    if not (ref / "tokenizer.json").is_file():
        pytest.skip(f"{ref} is absent (MiniMind-2's tokenizer, shared development data)")
    info = load_tokenizer(ref)
    assert not set(STRUCTURE_TAGS) & set(info.special_ids)  # the premise: no tag is a single id
    ids = info.tokenizer.encode("Let me add.\n" + CALL, add_special_tokens=False).ids
    assert parse([[i] for i in ids], info, tools=("calculator",)) == [Event(CONTENT, "Let me add."),
                                                                      Event(TOOL_CALL, call=ADD)]
    assert parse([[i] for i in ids], info, tools=()) == [Event(CONTENT, "Let me add.\n" + CALL)]


def test_misplaced_control_ids_are_their_text():
    """</think> in content, <think> after text or with thinking off, <tool_response> anywhere: text."""
    assert parse([control_ids("a</think>b")]) == [Event(CONTENT, "a</think>b")]
    assert parse([control_ids("<think>x</think>y")], thinking=False) == [Event(CONTENT, "<think>x</think>y")]
    assert parse([control_ids("r</think>\n\n<think>again")], thinking=True) == \
        [Event(REASONING, "r"), Event(CONTENT, "<think>again")]
    response = control_ids(TOOL_RESPONSE_OPEN + "5")
    assert INFO.special_ids[TOOL_RESPONSE_OPEN] in response
    assert parse([response]) == [Event(CONTENT, TOOL_RESPONSE_OPEN + "5")]


def test_completion_that_starts_inside_reasoning():
    """enable_thinking=true: the prompt ends with <think>\\n, so the completion starts inside the reasoning."""
    ids = control_ids("add 2 and 3\n</think>\n\n" + CALL)
    expected = [Event(REASONING, "add 2 and 3"), Event(TOOL_CALL, call=ADD)]
    for i in range(len(ids) + 1):
        assert parse([ids[:i], ids[i:]], thinking=True) == expected
    assert parse([control_ids("The answer.")], thinking=False) == [Event(CONTENT, "The answer.")]


def test_prefilled_call_is_completed_by_the_model():
    """tool_choice naming a function: the prompt ends inside the call; the model writes the rest."""
    prefill = control_ids('<tool_call>\n{"name": "calculator", "arguments": ')
    assert parse([control_ids('{"expression": "2+3"}}\n</tool_call>')], prefill=prefill) == \
        [Event(TOOL_CALL, call=ADD)]


def test_events_stream_as_they_are_decided():
    """Each feed returns what its ids decide (merged here: one event per decoded piece)."""
    parser = CompletionParser(INFO, ("f",))
    assert merged(parser.feed(control_ids("<think>\nstep one"))) == [Event(REASONING, "step one")]
    assert merged(parser.feed(control_ids("\n"))) == []  # trailing whitespace waits for more text
    assert merged(parser.feed(control_ids("two\n</think>"))) == [Event(REASONING, "\ntwo")]
    assert merged(parser.feed(control_ids("\n\nIt is "))) == [Event(CONTENT, "It is")]
    assert merged(parser.feed(control_ids("<tool_call>\n{"))) == []  # held back until </tool_call>
    call = Event(TOOL_CALL, call=ToolCall("f", "{}"))
    assert merged(parser.feed(control_ids('"name": "f"}\n</tool_call>'))) == [call]
    assert parser.finish() == []


def test_a_character_split_across_ids_is_never_broken():
    ids = control_ids("龘 ok 鬱")
    assert "\ufffd" in INFO.tokenizer.decode(ids[:1])  # the premise: the first character is split across ids
    parser = CompletionParser(INFO)
    events = [e for i in ids for e in parser.feed([i])] + parser.finish()
    assert not any("\ufffd" in e.text for e in events) and merged(events) == [Event(CONTENT, "龘 ok 鬱")]
    half = CompletionParser(INFO)
    assert merged(half.feed(ids[:-1]) + half.finish()) == [Event(CONTENT, "龘 ok")]  # a dangling half is dropped


def test_parse_tool_call_arguments_are_canonical_json():
    call = parse_tool_call('\n{"name": "f", "arguments": {"q": "北京", "n": [1, 2.5]}}\n')
    assert call == ToolCall("f", '{"q": "北京", "n": [1, 2.5]}') and json.loads(call.arguments)["q"] == "北京"
    assert parse_tool_call('{"name": "", "arguments": {}}') is None
    assert parse_tool_call("[" * 100000) is None  # too deep to parse: malformed, not a crash
