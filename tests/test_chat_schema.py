"""core/chat_schema.py: one rule set for the OpenAI conversation / tool schema, used by pack (records) and
serve (requests); the shapes differ only where the wire is stricter (no JSON strings, no flat shapes)."""

from __future__ import annotations

import json

import pytest

from core import chat_schema
from core.chat_schema import API_SHAPES, RECORD_SHAPES, SchemaError
from core.errors import TinyLMError
from preprocess import records
from preprocess.records import RecordError
from serve import openai_request
from serve.openai_request import APIError, parse_messages

WRAPPED = {"type": "function", "function": {"name": "calc", "description": "d", "parameters": {"type": "object"}}}
FLAT = WRAPPED["function"]
Q, A = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}


def refused(call, *args, **kwargs) -> SchemaError:
    with pytest.raises(SchemaError) as e:
        call(*args, **kwargs)
    return e.value


def test_the_error_is_neutral():
    """Not a record error, not an HTTP error: a reason, a message and the field, for each caller to map."""
    e = refused(chat_schema.parse_tools, [WRAPPED, WRAPPED])
    assert not isinstance(e, TinyLMError)
    assert (e.reason, e.field, e.message) == ("bad_tools", "tools[1].function.name", "'calc' is defined twice")
    assert str(e) == "tools[1].function.name: 'calc' is defined twice"


def test_records_take_json_strings_and_flat_shapes_the_wire_does_not():
    assert chat_schema.parse_tools(json.dumps([FLAT]), "tools", RECORD_SHAPES) == [FLAT]
    assert chat_schema.tool_name(FLAT) == chat_schema.tool_name(WRAPPED) == "calc"
    assert refused(chat_schema.parse_tools, json.dumps([WRAPPED]), "tools", API_SHAPES).field == "tools"
    assert refused(chat_schema.parse_tools, [FLAT], "tools", API_SHAPES).field == "tools[0]"
    flat_call = [{"name": "calc", "arguments": {"x": 1}}]
    wrapped_call = [{"type": "function", "function": {"name": "calc", "arguments": {"x": 1}}}]
    from_record = chat_schema.parse_tool_calls(json.dumps(flat_call), "c", {"calc"})
    assert from_record == chat_schema.parse_tool_calls(wrapped_call, "c", None, API_SHAPES) == wrapped_call
    assert refused(chat_schema.parse_tool_calls, flat_call, "c", None, API_SHAPES).field == "c[0].function"
    assert chat_schema.parse_tool_calls("[]", "c") == []


@pytest.mark.parametrize("tools, field, message", [
    ([WRAPPED, WRAPPED], "tools[1].function.name", "defined twice"),
    ([{"type": "function", "function": {"name": "calc value"}}], "tools[0].function.name", "1-64 letters"),
    ([{"type": "function", "function": {"name": "x" * 65}}], "tools[0].function.name", "1-64 letters"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "tools[0].function.parameters",
     "expected a JSON-schema object"),
])
def test_one_rule_set_for_tool_names_in_records_and_requests(tools, field, message):
    """The same definitions are refused at the same field by pack (a record error) and serve (a 400)."""
    with pytest.raises(RecordError) as record:
        records.parse_conversation({"tools": tools, "conversations": [Q, A]})
    assert record.value.field == field and message in record.value.message
    with pytest.raises(APIError) as request:
        openai_request.parse_tools({"tools": tools})
    assert (request.value.status, request.value.param) == (400, field) and message in request.value.message


def test_requests_and_records_normalise_calls_alike():
    call = {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": '{"x": 1}'}}
    record = records.parse_conversation({"tools": [WRAPPED], "conversations": [
        Q, {"role": "assistant", "content": None, "tool_calls": [call]}, {"role": "tool", "content": "1"}, A]})
    request = parse_messages({"messages": [Q, {"role": "assistant", "content": None, "tool_calls": [call]}]})
    assert record[2]["tool_calls"] == request[1]["tool_calls"] == [call]


def test_reasoning_rules_hold_on_the_wire_too():
    with pytest.raises(APIError) as e:
        parse_messages({"messages": [Q, {"role": "assistant", "content": "a", "reasoning_content": "r</think>x"}]})
    assert (e.value.param, e.value.code) == ("messages[1].reasoning_content", "invalid_value")
    with pytest.raises(APIError) as e:
        parse_messages({"messages": [Q, {"role": "assistant", "content": "a", "reasoning_content": ["r"]}]})
    assert (e.value.param, e.value.code) == ("messages[1].reasoning_content", "invalid_type")


CALLS = [{"id": "a", "type": "function", "function": {"name": "calc", "arguments": {}}},
         {"id": "b", "type": "function", "function": {"name": "calc", "arguments": {}}}]


def test_results_pair_with_calls_in_order():
    """1..N results per N calls, in order; an id must name one of the calls."""
    calling = {"role": "assistant", "content": "", "tool_calls": CALLS}
    result = {"role": "tool", "content": "1"}
    assert [t["role"] for t in chat_schema.parse_conversation([Q, calling, result, A])] == ["user", "assistant", "tool",
                                                                                 "assistant"]
    assert len(chat_schema.parse_conversation([Q, calling, result, {**result, "tool_call_id": "b"}, A])) == 5
    e = refused(chat_schema.parse_conversation, [Q, calling, result, result, result, A])
    assert (e.reason, e.field, e.message) == ("bad_role_order", "conversations[4].role",
                                              "expected 'assistant', got 'tool'")
    e = refused(chat_schema.parse_conversation, [Q, calling, {**result, "tool_call_id": "z"}, A])
    assert (e.reason, e.field) == ("bad_tool_call_id", "conversations[2].tool_call_id")
    e = refused(chat_schema.parse_conversation, [Q, calling, A])
    assert (e.reason, e.field) == ("bad_role_order", "conversations[2].role")


def test_normalised_form_has_only_the_known_keys():
    turns = chat_schema.parse_conversation([{"role": "system", "content": "s", "tools": json.dumps([FLAT]), "x": 1},
                                {**Q, "reasoning_content": "", "tools": "", "tool_calls": ""},
                                {"role": "assistant", "content": "", "reasoning_content": "think", "meta": 2,
                                 "tool_calls": json.dumps([{"name": "calc", "arguments": "{}", "id": "k"}])},
                                {"role": "tool", "content": "r", "name": "calc", "extra": 3}, A])
    assert turns == [{"role": "system", "content": "s", "tools": [FLAT]}, Q,
                     {"role": "assistant", "content": "", "reasoning_content": "think", "tool_calls": [
                         {"id": "k", "type": "function", "function": {"name": "calc", "arguments": "{}"}}]},
                     {"role": "tool", "content": "r", "name": "calc"}, A]


def test_calls_written_into_the_content_may_be_answered():
    """A model's raw output (``<tool_call>`` blocks in the content, no ``tool_calls``) may be followed by
    its results or by a user turn; a blank reasoning_content is no reasoning."""
    raw = {"role": "assistant", "content": '<tool_call>\n{"name": "calc", "arguments": {}}\n</tool_call>'}
    result = {"role": "tool", "content": "1"}
    assert [t["role"] for t in chat_schema.parse_conversation([Q, raw, result, A])][2] == "tool"
    assert len(chat_schema.parse_conversation([Q, raw, Q, A])) == 4
    e = refused(chat_schema.parse_conversation, [Q, raw, result, result, A])
    assert (e.field, e.message) == ("conversations[3].role", "expected 'assistant', got 'tool'")
    assert chat_schema.parse_conversation([Q, {**A, "reasoning_content": "\n"}]) == [Q, A]
