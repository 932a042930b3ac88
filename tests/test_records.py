"""preprocess/records.py: the record schemas per stage; every way a record can be bad is ONE line naming
file:line and field, or (--skip-bad) a skip counted under its reason; richer schemas are refused, not
silently stripped."""

from __future__ import annotations

import json
import random

import pytest
from conftest import SAMPLE, run_pack
from pack_helpers import BAD_RECORDS, GOOD, assert_nothing_left, jsonl, one_line_error, run

from preprocess import pack, shards
from preprocess.records import RecordError, parse_conversation

HELLO = {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}

# ---------------------------------------------------------------- record-level failures

@pytest.mark.parametrize("reason", sorted(BAD_RECORDS))
def test_record_failure_is_one_line_or_a_counted_skip(tmp_path, capsys, reason):
    bad, message, field = BAD_RECORDS[reason]
    src = jsonl(tmp_path / "in.jsonl", [GOOD, bad, GOOD])
    out = tmp_path / "o"
    argv = ["--stage", "sft", "--input", str(src), "--out", str(out), "--max-record-chars", "2000", "--seq-len", "64"]
    rc, _, err = run(capsys, *argv)
    assert rc == 1
    one_line_error(err, f"{src}:2:", message, *([f"field '{field}'"] if field else []))
    assert_nothing_left(out)
    rc, _, err = run(capsys, *argv, "--skip-bad")
    assert rc == 0, err
    counts = shards.read_meta(out)["counts"]
    assert counts["skipped"] == {reason: 1} and counts["records_kept"] == 2 and counts["records_read"] == 3


BAD_CASES = {
    "invalid_json": ('{"conversations": [', "invalid JSON"),
    "missing_field": ({"dialog": []}, "field 'conversations': missing"),
    "empty_content": ({"conversations": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]},
                      "field 'conversations[0].content': empty"),
    "bad_role_order": ({"conversations": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
                       "field 'conversations[0].role': expected 'user', got 'assistant'"),
    "bad_type": ({"conversations": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
                 "field 'conversations[0].content': expected a string"),
}


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_bad_record_stops_with_one_line_or_is_counted(tmp_path, reason):
    bad, message = BAD_CASES[reason]
    src = jsonl(tmp_path / "in.jsonl", [HELLO, HELLO, bad, HELLO])
    proc = run_pack("--stage", "sft", "--input", str(src), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"{src}:3:" in proc.stderr and message in proc.stderr, proc.stderr
    assert not (tmp_path / "o" / "meta.json").exists()
    proc = run_pack("--stage", "sft", "--input", str(src), "--out", str(tmp_path / "o"), "--skip-bad", check=False)
    assert proc.returncode == 0, proc.stderr
    counts = shards.read_meta(tmp_path / "o")["counts"]
    assert counts["skipped"] == {reason: 1} and counts["records_kept"] == 3 and counts["records_read"] == 4


def test_non_utf8_and_empty_file(tmp_path):
    src = tmp_path / "latin1.jsonl"
    src.write_bytes(json.dumps(HELLO).encode() + b"\n" + '{"text": "caf\xe9"}'.encode("latin-1") + b"\n")
    proc = run_pack("--stage", "pretrain", "--input", str(src), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 1 and f"{src}:1: field 'text': missing" in proc.stderr
    src.write_bytes(b'{"text": "ok"}\n' + '{"text": "caf\xe9"}'.encode("latin-1") + b"\n")
    proc = run_pack("--stage", "pretrain", "--input", str(src), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 1 and f"{src}:2: invalid UTF-8" in proc.stderr and "Traceback" not in proc.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = run_pack("--stage", "pretrain", "--input", str(empty), str(src), "--out", str(tmp_path / "e"), check=False)
    assert proc.returncode == 1 and f"{empty}: the file contains no records" in proc.stderr
    src.write_bytes(b'{"text": "ok, a text long enough for one row of eight tokens"}\n' +
                    '{"text": "caf\xe9"}'.encode("latin-1") + b"\n")
    proc = run_pack("--stage", "pretrain", "--input", str(empty), str(src), "--out", str(tmp_path / "e"), "--skip-bad",
                    "--seq-len", "8")
    assert shards.read_meta(tmp_path / "e")["counts"]["skipped"] == {"empty_file": 1, "not_utf8": 1}


CALL = {"type": "function", "function": {"name": "calc", "arguments": {"x": "1+1"}}}
TOOL = {"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}
Q, A = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
CALLING = {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", **CALL}]}
RESULT = {"role": "tool", "tool_call_id": "c1", "content": "2"}
RICH_ERRORS = {  # record -> (skip reason, field, message)
    "flat_call_without_arguments": ({"conversations": [Q, {"role": "assistant", "content": "",
                                                           "tool_calls": [{"name": "f"}]}]},
                                    "missing_field", "conversations[1].tool_calls[0].arguments", "missing"),
    "wrapped_call_without_function": ({"conversations": [Q, {"role": "assistant", "content": "",
                                                             "tool_calls": [{"type": "function", "function": "f"}]}]},
                                      "bad_type", "conversations[1].tool_calls[0].function", "expected an object"),
    "tools_not_json": ({"conversations": [{"role": "system", "content": "s", "tools": "[{...}]"}, Q, A]},
                       "bad_tools", "conversations[0].tools", "a string that is not JSON"),
    "tool_without_call": ({"conversations": [Q, A, {"role": "tool", "content": "42"}, A]},
                          "bad_role_order", "conversations[2].role", "expected 'user', got 'tool'"),
    "call_without_result": ({"conversations": [Q, CALLING, A]},
                            "bad_role_order", "conversations[2].role", "expected 'tool', got 'assistant'"),
    "record_tool_shape": ({"conversations": [Q, A], "tools": [{"type": "function"}]},
                          "bad_type", "tools[0].function", "expected an object"),
    "arguments_not_json": ({"conversations": [Q, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "calc", "arguments": "{x: 1}"}}]}, RESULT, A]},
        "bad_arguments", "conversations[1].tool_calls[0].function.arguments", "not JSON"),
    "arguments_not_object": ({"conversations": [Q, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "calc", "arguments": "[1]"}}]}, RESULT, A]},
        "bad_arguments", "conversations[1].tool_calls[0].function.arguments", "expected a JSON object, got list"),
    "unknown_tool": ({"tools": [TOOL], "conversations": [Q, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "other", "arguments": {}}}]}, RESULT, A]},
        "unknown_tool", "conversations[1].tool_calls[0].function.name", "the record's tools list does not define"),
    "wrong_call_id": ({"conversations": [Q, CALLING, {**RESULT, "tool_call_id": "c9"}, A]},
                      "bad_tool_call_id", "conversations[2].tool_call_id", "'c9' is not the id of a call"),
    "reasoning_on_user": ({"conversations": [{**Q, "reasoning_content": "r"}, A]},
                          "misplaced_field", "conversations[0].reasoning_content", "only assistant turns carry"),
    "reasoning_twice": ({"conversations": [Q, {"role": "assistant", "reasoning_content": "r",
                                               "content": "<think>s</think>a"}]},
                        "bad_reasoning", "conversations[1].reasoning_content", "keep one"),
    "reasoning_closes": ({"conversations": [Q, {**A, "reasoning_content": "r</think>x"}]},
                         "bad_reasoning", "conversations[1].reasoning_content", "would end the thinking early"),
    "tools_twice": ({"tools": [TOOL], "conversations": [{"role": "system", "content": "s", "tools": [TOOL]}, Q, A]},
                    "misplaced_field", "conversations[0].tools", "on both the record and the system turn"),
    "empty_result": ({"conversations": [Q, CALLING, {**RESULT, "content": " "}, A]},
                     "empty_content", "conversations[2].content", "empty"),
    "last_is_tool": ({"conversations": [Q, CALLING, RESULT]},
                     "bad_role_order", "conversations[2].role", "the last turn must be 'assistant'"),
}


@pytest.mark.parametrize("name", sorted(RICH_ERRORS))
def test_rich_field_errors_name_file_line_and_field(tmp_path, capsys, name):
    """Tools, tool calls, tool turns and reasoning_content are validated: one line naming file:line:field,
    or a skip counted under its reason with --skip-bad."""
    record, reason, field, message = RICH_ERRORS[name]
    src = jsonl(tmp_path / "in.jsonl", [GOOD, record])
    argv = ["--stage", "sft", "--input", str(src), "--out", str(tmp_path / "o")]
    rc, _, err = run(capsys, *argv)
    assert rc == 1
    one_line_error(err, f"{src}:2: field '{field}': ", message)
    rc, _, err = run(capsys, *argv, "--skip-bad", "--seq-len", "16")
    assert rc == 0, err
    assert shards.read_meta(tmp_path / "o")["counts"]["skipped"] == {reason: 1}


def test_dpo_still_refuses_the_richer_schema_by_name(tmp_path, capsys):
    chosen = [Q, {**A, "reasoning_content": "r"}]
    src = jsonl(tmp_path / "in.jsonl", [{"chosen": chosen, "rejected": [Q, {"role": "assistant", "content": "b"}]}])
    rc, _, err = run(capsys, "--stage", "dpo", "--input", str(src), "--out", str(tmp_path / "o"))
    assert rc == 1
    one_line_error(err, f"{src}:1: field 'chosen[1].reasoning_content': tinylm renders tool calls, tools, "
                   "reasoning_content and 'tool' turns in sft / reason records only")


def test_common_near_misses_are_read_or_explained(tmp_path, capsys):
    src = tmp_path / "bom.jsonl"  # a byte-order mark is not a broken first record
    src.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n" + json.dumps(GOOD).encode() + b"\n")
    rc, _, err = run(capsys, "--stage", "sft", "--input", str(src), "--out", str(tmp_path / "o"))
    assert rc == 0 and shards.read_meta(tmp_path / "o")["counts"]["records_kept"] == 2, err
    array = jsonl(tmp_path / "array.jsonl", [json.dumps([GOOD, GOOD])])
    rc, _, err = run(capsys, "--stage", "sft", "--input", str(array), "--out", str(tmp_path / "a"))
    assert rc == 1
    one_line_error(err, f"{array}:1: expected a JSON object, got list (pack.py reads JSON Lines")
    messages = jsonl(tmp_path / "messages.jsonl", [{"messages": GOOD["conversations"]}])
    rc, _, err = run(capsys, "--stage", "sft", "--input", str(messages), "--out", str(tmp_path / "m"))
    assert rc == 1
    one_line_error(err, f"{messages}:1: field 'conversations': missing (this record has 'messages'")


# ---------------------------------------------------------------- random corruption

def corrupt_line(rng: random.Random, line: str) -> bytes:
    """One of: unchanged, bytes flipped, cut short, a random JSON value, a record with random field types."""
    kind, data = rng.randrange(5), line.encode()
    if kind == 0:
        return data
    if kind == 1:
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        return bytes(flipped)
    if kind == 2:
        return data[: rng.randrange(len(data))]
    values = [None, True, 3, -1.5, "s", [], {}, [1, "a"], {"role": "user"}, "\ud800", "x" * 50, "  "]
    if kind == 3:
        return json.dumps(rng.choice(values)).encode()
    record = json.loads(line)
    turn = rng.choice(record["conversations"])
    turn[rng.choice(["role", "content", "reasoning_content"])] = rng.choice(values)
    return json.dumps(record, ensure_ascii=rng.random() < 0.5).encode("utf-8", errors="surrogatepass")


@pytest.mark.parametrize("seed", range(3))
def test_randomly_corrupted_records_are_all_accounted_for(tmp_path, capsys, seed):
    rng = random.Random(seed)
    lines = (SAMPLE / "sft" / "kdconv_zh.jsonl").read_text().splitlines()[:60]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(corrupt_line(rng, line) + b"\n" for line in lines))
    expected = sum(1 for raw in src.read_bytes().split(b"\n") if raw.strip())
    rc = pack.main(["--stage", "sft", "--input", str(src), "--out", str(tmp_path / "o"), "--seq-len", "128",
                    "--skip-bad", "--workers", "1", "--quiet"])
    _, err = capsys.readouterr()
    assert rc == 0 and "Traceback" not in err, err
    c = shards.read_meta(tmp_path / "o")["counts"]
    assert c["records_read"] == expected
    assert c["records_kept"] + sum(c["dropped"].values()) + sum(c["skipped"].values()) == expected
    assert c["skipped"] and c["records_kept"] > 0


def test_rich_records_are_normalized_for_the_template():
    """Known keys only; record-level tools move onto an (added, empty) system turn; a calling turn's null
    content is ""; a plain record takes the plain path unchanged."""
    record = {"id": 7, "tools": [TOOL], "conversations": [
        {**Q, "meta": 1}, {"role": "assistant", "content": None, "reasoning_content": "r", "tool_calls": [
            {"id": "c1", "function": {"name": "calc", "arguments": '{"x": 1}'}, "index": 0}]},
        {**RESULT, "name": "calc"}, {**A, "reasoning_content": ""}]}
    assert parse_conversation(record) == [
        {"role": "system", "content": "", "tools": [TOOL]}, Q,
        {"role": "assistant", "content": "", "reasoning_content": "r", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "content": "2", "tool_call_id": "c1", "name": "calc"}, A]
    assert parse_conversation({"conversations": [Q, {**A, "tool_calls": []}]}) == [Q, A]
    system = {"role": "system", "content": "s", "tools": json.dumps([TOOL])}
    assert parse_conversation({"conversations": [system, Q, A]})[0] == {**system, "tools": [TOOL]}
    only_tools = {"role": "system", "content": None, "tools": [TOOL]}
    assert parse_conversation({"conversations": [only_tools, Q, A]})[0] == {**only_tools, "content": ""}
    with pytest.raises(RecordError) as err:
        parse_conversation({"tools": [TOOL]})
    assert (err.value.reason, err.value.field) == ("missing_field", "conversations")


def test_tools_sample_is_reproducible_valid_and_correct():
    """data/sample/tools is its script's output byte for byte, every record validates, and every tool
    result equals the call's expression evaluated here (an AST walk, independent of the script)."""
    import ast
    import importlib.util
    import operator

    path = SAMPLE / "tools" / "make_sample.py"
    spec = importlib.util.spec_from_file_location("make_sample", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines = module.OUT.read_text(encoding="utf-8").splitlines()
    assert lines == [json.dumps(r, ensure_ascii=False) for r in module.records()] and len(lines) == 120
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp):
            return ops[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        assert isinstance(node, ast.Constant) and isinstance(node.value, int)
        return node.value

    calls = 0
    for line in lines:
        turns = parse_conversation(json.loads(line))
        results = {t["tool_call_id"]: t["content"] for t in turns if t["role"] == "tool"}
        for call in (c for t in turns for c in t.get("tool_calls", ())):
            args = call["function"]["arguments"]
            args = json.loads(args) if isinstance(args, str) else args
            assert results[call["id"]] == str(value(ast.parse(args["expression"], mode="eval").body))
            calls += 1
    assert calls == 120
