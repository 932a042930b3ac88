"""MiniMind's data files read as they are (tests/fixtures/minimind/): every shape packs and cleans with nothing
skipped, the RL prompt reader reads the RL files (prompts, tools, ``gt``), and a malformed record of those
shapes is one line naming file:line:field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO
from pack_helpers import TOK, decode, documents, jsonl, one_line_error, run, supervised_text

from core.chat_template import render_text
from core.errors import TinyLMError
from core.tokenizer import prompt_ids
from preprocess import clean, shards
from preprocess.prompts import read_prompts
from preprocess.records import parse_conversation
from train.rollout import PromptSet

FIXTURES = REPO / "tests" / "fixtures" / "minimind"
PACKED = {  # fixture -> pack.py options (the stage MiniMind trains the file with)
    "minimind3/pretrain_t2t": ["--stage", "pretrain"],
    "minimind3/pretrain_t2t_mini": ["--stage", "pretrain"],
    "minimind3/sft_t2t": ["--stage", "sft"],
    "minimind3/sft_t2t_mini": ["--stage", "sft"],
    "minimind3/dpo": ["--stage", "dpo"],
    "minimind3/lora_exam": ["--stage", "sft"],
    "minimind3/lora_medical": ["--stage", "sft"],
    "minimind2/pretrain_hq": ["--stage", "pretrain", "--parse-special"],
    "minimind2/sft_mini_512": ["--stage", "sft"],
    "minimind2/sft_512": ["--stage", "sft"],
    "minimind2/sft_1024": ["--stage", "sft"],
    "minimind2/sft_2048": ["--stage", "sft"],
    "minimind2/r1_mix_1024": ["--stage", "reason"],
    "minimind2/dpo": ["--stage", "dpo"],
    "minimind2/lora_medical": ["--stage", "sft"],
    "minimind2/lora_identity": ["--stage", "sft"],
}
PROMPTS = ("minimind3/rlaif", "minimind3/agent_rl", "minimind3/agent_rl_math", "minimind2/rlaif-mini")


def fixture(name: str) -> Path:
    return FIXTURES / f"{name}.jsonl"


def records(name: str) -> list[dict]:
    return [json.loads(line) for line in fixture(name).read_text(encoding="utf-8").splitlines()]


def test_every_fixture_file_is_covered():
    on_disk = {f"{p.parent.name}/{p.stem}" for p in FIXTURES.glob("*/*.jsonl")}
    assert on_disk == set(PACKED) | set(PROMPTS)
    assert all(3 <= len(records(name)) <= 8 for name in on_disk)


@pytest.mark.parametrize("name", sorted(PACKED))
def test_every_minimind_file_packs_with_nothing_skipped(tmp_path, capsys, name):
    out = tmp_path / "o"
    options = PACKED[name]
    seq_len = "32" if options[1] == "pretrain" else "1024"  # pretrain: several windows from a few records
    rc, _, err = run(capsys, *options, "--input", str(fixture(name)), "--out", str(out), "--seq-len", seq_len)
    assert rc == 0, err
    counts = shards.read_meta(out)["counts"]
    n = len(records(name))
    assert (counts["records_read"], counts["records_kept"], counts["skipped"]) == (n, n, {}), counts
    assert not counts.get("dropped"), counts
    if "--parse-special" in options:  # MiniMind2's pretrain text holds ChatML: its markers become their ids
        ids = {int(i) for tokens, _ in documents(out) for i in tokens}
        assert {TOK.special_ids["<|im_start|>"], TOK.special_ids["<|im_end|>"]} <= ids


def test_the_readme_tool_record_packs_as_the_template_renders_it(tmp_path, capsys):
    """MiniMind's README record (tools and a flat call as JSON strings, a tool turn without an id): the
    call, its result and the answer are rendered; the loss covers the call line and the answer only."""
    record = records("minimind3/sft_t2t_mini")[2]
    calls = '[{"name":"calculate_math","arguments":{"expression":"256 * 37"}}]'
    assert record["conversations"][2]["tool_calls"] == calls
    src = jsonl(tmp_path / "t.jsonl", [record])
    rc, _, err = run(capsys, "--stage", "sft", "--input", str(src), "--out", str(tmp_path / "o"), "--seq-len", "1024")
    assert rc == 0, err
    [(tokens, weights)] = documents(tmp_path / "o")
    turns = parse_conversation(record)
    assert decode(tokens) == render_text(turns)
    assert '\n<tool_response>\n{"result":"9472"}\n</tool_response>' in decode(tokens)
    assert supervised_text(tokens, weights) == (
        '<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "256 * 37"}}\n</tool_call><|im_end|>'
        "256 乘以 37 等于 9472。<|im_end|>")


def test_flat_and_wrapped_shapes_normalise_to_one_form():
    """A flat call in a JSON string and the OpenAI-wrapped call in a list give the same turns; a flat tool
    definition is kept (and rendered) flat, as MiniMind's template renders it."""
    record = records("minimind3/sft_t2t_mini")[2]
    wrapped = json.loads(json.dumps(record))
    wrapped["conversations"][0]["tools"] = json.loads(record["conversations"][0]["tools"])
    wrapped["conversations"][2]["tool_calls"] = [
        {"type": "function", "function": {"name": "calculate_math", "arguments": {"expression": "256 * 37"}}}]
    turns = parse_conversation(record)
    assert turns == parse_conversation(wrapped)
    assert turns[2] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calculate_math", "arguments": {"expression": "256 * 37"}}}]}
    assert turns[3] == {"role": "tool", "content": '{"result":"9472"}'}
    flat = records("minimind3/sft_t2t_mini")[3]
    definitions = json.loads(flat["conversations"][0]["tools"])
    assert "function" not in definitions[0]
    assert parse_conversation(flat)[0]["tools"] == definitions
    assert "\n" + json.dumps(definitions[0], ensure_ascii=False) + "\n" in render_text(parse_conversation(flat))


def test_every_datasets_style_empty_key_counts_as_absent():
    """A turn carrying every key with "" (a `datasets` export) is a plain turn."""
    record = records("minimind3/sft_t2t_mini")[6]
    assert all(set(t) == {"role", "content", "reasoning_content", "tools", "tool_calls"}
               for t in record["conversations"])
    assert parse_conversation(record) == [{"role": t["role"], "content": t["content"]}
                                          for t in record["conversations"]]


@pytest.mark.parametrize("name", sorted(PACKED))
def test_clean_reads_every_minimind_file(tmp_path, capsys, name):
    stage = PACKED[name][1]
    report = tmp_path / "report.json"
    rc = clean.main(["--stage", stage, "--input", str(fixture(name)), "--out", str(tmp_path / "c.jsonl"),
                     "--report", str(report), "--workers", "1", "--quiet"])
    _, err = capsys.readouterr()
    assert rc == 0, err
    counts = json.loads(report.read_text())["counts"]
    assert counts["read"] == len(records(name)) and counts["skipped"] == {}, counts


def test_cleaned_tool_records_pack_to_the_same_tokens(tmp_path, capsys):
    """clean.py writes the normalised turns; packing them gives the tokens the original file gives."""
    src = fixture("minimind3/sft_t2t_mini")
    rc = clean.main(["--stage", "sft", "--input", str(src), "--out", str(tmp_path / "c.jsonl"), "--dedup", "none",
                     "--min-chars", "0", "--lang", "any", "--no-source", "--workers", "1", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    cleaned = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(cleaned) == len(records("minimind3/sft_t2t_mini"))
    for name, path in (("a", src), ("b", tmp_path / "c.jsonl")):
        rc, _, err = run(capsys, "--stage", "sft", "--input", str(path), "--out", str(tmp_path / name),
                         "--seq-len", "1024")
        assert rc == 0, err
    pack_a, pack_b = documents(tmp_path / "a"), documents(tmp_path / "b")
    assert len(pack_a) == len(pack_b) == len(cleaned)
    assert all((ta == tb).all() and (wa == wb).all() for (ta, wa), (tb, wb) in zip(pack_a, pack_b, strict=True))


def test_rl_prompt_reader_reads_rlaif_placeholders():
    """The empty final assistant turn is a placeholder: dropped, no reference; a real earlier answer stays."""
    prompts = read_prompts(fixture("minimind3/rlaif"))
    assert len(prompts) == len(records("minimind3/rlaif"))
    assert all(p.turns[-1]["role"] == "user" and p.columns == {} for p in prompts)
    assert [t["role"] for t in prompts[2].turns] == ["user", "assistant", "user"]
    assert [t["role"] for t in prompts[1].turns] == ["system", "user"]
    mini = read_prompts(fixture("minimind2/rlaif-mini"))
    assert all(p.turns[-1]["role"] == "user" and p.columns == {"reference": "无"} for p in mini)


@pytest.mark.parametrize("name", ["minimind3/agent_rl", "minimind3/agent_rl_math"])
def test_rl_prompt_reader_reads_agent_rl_tools_and_gt(name):
    """Prompts with their tools (on the system turn, rendered with the prompt) and the ``gt`` column."""
    raw = records(name)
    prompts = read_prompts(fixture(name))
    assert [p.columns for p in prompts] == [{"gt": r["gt"]} for r in raw]
    for p, r in zip(prompts, raw, strict=True):
        system = r["conversations"][0]
        assert [t["role"] for t in p.turns] == ["system", "user"]
        assert p.turns[0] == {"role": "system", "content": system["content"], "tools": json.loads(system["tools"])}
        text = TOK.tokenizer.decode(prompt_ids(TOK, p.turns), skip_special_tokens=False)
        assert text == render_text(p.turns, add_generation_prompt=True)
        assert all(json.dumps(t, ensure_ascii=False) in text for t in p.turns[0]["tools"])
    rollout_prompts = PromptSet(fixture(name))
    rollout_prompts.attach(TOK, max_new_tokens=16, max_positions=4096)
    assert rollout_prompts.n_rows == len(raw) and all(rollout_prompts.ids)


TOOLS = [{"name": "calculate_math", "parameters": {"type": "object"}}]
USER = {"role": "user", "content": "256 乘以 37"}
RESULT = {"role": "tool", "content": '{"result":"9472"}'}
ANSWER = {"role": "assistant", "content": "9472"}


def tool_record(calls: object, tools: object = TOOLS) -> dict:
    return {"conversations": [{"role": "system", "content": "", "tools": json.dumps(tools)}, USER,
                              {"role": "assistant", "content": "", "tool_calls": calls}, RESULT, ANSWER]}


MALFORMED = {  # name -> (record, field, message)
    "calls_not_json": (tool_record('[{"name":"calculate_math","arguments":{"expression":"1+1"}'),
                       "conversations[2].tool_calls", "a string that is not JSON"),
    "undeclared_tool": (tool_record('[{"name":"get_weather","arguments":{}}]'),
                        "conversations[2].tool_calls[0].name", "calls 'get_weather', which the record's tools list"),
    "call_without_name": (tool_record('[{"arguments":{"expression":"1+1"}}]'),
                          "conversations[2].tool_calls[0].name", "missing"),
    "definition_without_name": (tool_record("[]", tools=[{"description": "math"}]),
                                "conversations[0].tools[0].name", "missing"),
    "tool_defined_twice": (tool_record("[]", tools=TOOLS * 2),
                           "conversations[0].tools[1].name", "'calculate_math' is defined twice"),
    "bad_function_name": (tool_record("[]", tools=[{"name": "calculate math"}]),
                          "conversations[0].tools[0].name", "expected 1-64 letters, digits, _ or -"),
    "more_results_than_calls": ({"conversations": [USER, {"role": "assistant", "content": "", "tool_calls": json.dumps(
        [{"name": "calculate_math", "arguments": {}}])}, RESULT, RESULT, ANSWER]},
        "conversations[3].role", "expected 'assistant', got 'tool'"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_minimind_records_are_one_line(tmp_path, capsys, name):
    record, field, message = MALFORMED[name]
    src = jsonl(tmp_path / "in.jsonl", [records("minimind3/sft_t2t_mini")[2], record])
    rc, _, err = run(capsys, "--stage", "sft", "--input", str(src), "--out", str(tmp_path / "o"))
    assert rc == 1
    one_line_error(err, f"{src}:2: field '{field}': ", message)


def test_malformed_agent_rl_prompt_is_one_line(tmp_path):
    good, bad = records("minimind3/agent_rl")[:2]
    bad["conversations"][0]["tools"] = bad["conversations"][0]["tools"][:-2]
    src = jsonl(tmp_path / "p.jsonl", [good, bad])
    with pytest.raises(TinyLMError) as e:
        read_prompts(src)
    assert str(e.value).startswith(f"{src}:2: field 'conversations[0].tools': a string that is not JSON")
