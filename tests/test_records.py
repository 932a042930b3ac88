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


@pytest.mark.parametrize("turns", [
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}],
    [{"role": "system", "content": "s", "tools": "[{...}]"}, {"role": "user", "content": "q"},
     {"role": "assistant", "content": "a"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "call"}, {"role": "tool", "content": "42"},
     {"role": "assistant", "content": "42"}],
])
def test_richer_schema_is_refused_by_name_not_stripped(tmp_path, capsys, turns):
    src = jsonl(tmp_path / "in.jsonl", [{"conversations": turns}])
    rc, _, err = run(capsys, "--stage", "sft", "--input", str(src), "--out", str(tmp_path / "o"))
    assert rc == 1
    one_line_error(err, f"{src}:1:", "tinylm does not render tool calls / tools / reasoning_content yet")
    top = jsonl(tmp_path / "top.jsonl", [{**GOOD, "tools": [{"type": "function"}]}])
    rc, _, err = run(capsys, "--stage", "sft", "--input", str(top), "--out", str(tmp_path / "o"))
    assert rc == 1
    one_line_error(err, f"{top}:1: field 'tools':")


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
