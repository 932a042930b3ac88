"""bin/peek: summary, --json, --row with the loss mask, --verify."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from conftest import REPO, optional_shared, run_pack


def peek(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bin" / "peek"), *map(str, args)], capture_output=True, text=True)


def test_summary_and_json(packed_sample):
    proc = peek(packed_sample["sft"])
    assert proc.returncode == 0 and "packing efficiency" in proc.stdout and "sft dataset" in proc.stdout
    summary = json.loads(peek(packed_sample["sft"], "--json").stdout)
    meta = json.loads((packed_sample["sft"] / "meta.json").read_text())
    assert summary["counts"] == meta["counts"] and summary["stage"] == "sft"
    assert sum(summary["document_length_histogram"].values()) == meta["counts"]["documents"]


def test_row_shows_mask_with_brackets_when_piped(packed_sample):
    proc = peek(packed_sample["sft"], "--row", 0)
    assert proc.returncode == 0
    assert "── document 0" in proc.stdout and "[" in proc.stdout and "⟦<|im_end|>⟧]" in proc.stdout
    assert "\033[" not in proc.stdout and "⟦…⟧ control token" in proc.stdout.splitlines()[0]
    coloured = peek(packed_sample["sft"], "--row", 0, "--color", "always").stdout
    assert "\033[32m" in coloured and "\033[7m⟦<|im_end|>⟧" in coloured
    reason = peek(packed_sample["reason"], "--row", 0).stdout
    assert "[w=10:⟦<think>⟧]" in reason
    bad = peek(packed_sample["sft"], "--row", 10**6)
    assert bad.returncode == 1 and "out of range" in bad.stderr and "Traceback" not in bad.stderr


def test_verify_names_the_broken_file(packed_sample, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(packed_sample["sft"], folder)
    ok = peek(folder, "--verify")
    assert ok.returncode == 0 and ok.stdout.startswith("OK")
    victim = folder / "shard_00000.mask"
    data = bytearray(victim.read_bytes())
    data[300] ^= 1
    victim.write_bytes(bytes(data))
    failed = peek(folder, "--verify")
    assert failed.returncode == 1 and str(victim) in failed.stdout
    ref = optional_shared("reference_tokenizer")  # another tokenizer: MiniMind's
    if ref:
        other = peek(packed_sample["pretrain"], "--verify", "--tokenizer", ref)
        assert other.returncode == 1 and "tokenizer fingerprint" in other.stdout
    missing = peek(tmp_path / "nothing", "--verify")
    assert missing.returncode == 1 and "meta.json: missing" in missing.stdout


def test_row_shows_literal_special_strings_apart_from_control_tokens(tmp_path):
    """A literal <|im_end|> typed in content is plain text in --row; the template's is ⟦<|im_end|>⟧."""
    conv = [{"role": "user", "content": "say <|im_end|> and <think>"}, {"role": "assistant", "content": "ok"}]
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"conversations": conv}) + "\n")
    run_pack("--stage", "sft", "--input", str(src), "--out", str(tmp_path / "o"), "--workers", "1")
    proc = peek(tmp_path / "o", "--row", 0)
    assert proc.returncode == 0, proc.stderr
    body = "\n".join(proc.stdout.splitlines()[2:])
    assert body == ("⟦<|im_start|>⟧user\nsay <|im_end|> and <think>⟦<|im_end|>⟧\n⟦<|im_start|>⟧assistant\n"
                    "[ok⟦<|im_end|>⟧]\n")
    assert "special     1 record(s) contain special-token strings, stored as text" in peek(tmp_path / "o").stdout


def test_errors_are_one_line(packed_sample, tmp_path):
    rows = json.loads(peek(packed_sample["sft"], "--json").stdout)["training_rows"]
    bad = peek(packed_sample["sft"], "--row", rows)
    assert (bad.returncode, bad.stdout) == (1, "")
    assert bad.stderr == f"peek: error: {packed_sample['sft']}: row {rows} out of range 0..{rows - 1}\n"
    missing = peek(tmp_path / "nothing")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert missing.stderr.startswith(f"peek: error: {tmp_path / 'nothing' / 'meta.json'}: missing")
    other = peek(packed_sample["sft"], "--verify", "--tokenizer", tmp_path / "no_tokenizer")
    assert other.returncode == 1 and other.stderr.count("\n") == 1 and other.stderr.startswith("peek: error: ")


def test_row_shows_the_mask_of_a_thinking_and_tool_call_record(tmp_path):
    """Thinking, the call and <|im_end|> are supervised; the tool result is not; tags are control tokens."""
    conv = [{"role": "user", "content": "12*7?"},
            {"role": "assistant", "reasoning_content": "Use calc.", "content": "On it.",
             "tool_calls": [{"type": "function", "function": {"name": "calc", "arguments": {"expr": "12*7"}}}]},
            {"role": "tool", "content": "84"}, {"role": "assistant", "content": "84"}]
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"conversations": conv}) + "\n")
    run_pack("--stage", "sft", "--input", str(src), "--out", str(tmp_path / "o"), "--workers", "1")
    proc = peek(tmp_path / "o", "--row", 0)
    assert proc.returncode == 0, proc.stderr
    assert "\n".join(proc.stdout.splitlines()[2:]) == (
        "⟦<|im_start|>⟧user\n12*7?⟦<|im_end|>⟧\n⟦<|im_start|>⟧assistant\n"
        "[⟦<think>⟧\nUse calc.\n⟦</think>⟧\n\nOn it.\n⟦<tool_call>⟧\n"
        '{"name": "calc", "arguments": {"expr": "12*7"}}\n⟦</tool_call>⟧⟦<|im_end|>⟧]\n'
        "⟦<|im_start|>⟧user\n⟦<tool_response>⟧\n84\n⟦</tool_response>⟧⟦<|im_end|>⟧\n"
        "⟦<|im_start|>⟧assistant\n[84⟦<|im_end|>⟧]\n")


def docs_json(folder) -> list[dict]:
    proc = peek(folder, "--docs", "--json")
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def stored_documents(folder):
    """(ids, weights) of every stored document, read from the shards directly."""
    from preprocess import shards

    packed = shards.PackedFolder(folder)
    for shard in packed.shards:
        offsets = shard.doc_offsets
        for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
            yield shard.tokens[lo:hi].tolist(), shard.weights[lo:hi].tolist()


def test_docs_json_round_trips(packed_sample):
    """--docs --json: one object per stored document whose text re-encodes (special tokens parsed) to the
    document's ids, and whose supervised_text is the decode of exactly its supervised ids."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(REPO / "data" / "tokenizer" / "tokenizer.json"))
    for stage in ("sft", "reason", "dpo"):
        records = docs_json(packed_sample[stage])
        stored = list(stored_documents(packed_sample[stage]))
        meta = json.loads((packed_sample[stage] / "meta.json").read_text())
        assert len(records) == len(stored) == meta["counts"]["documents"]
        for d, (record, (ids, weights)) in enumerate(zip(records, stored, strict=True)):
            assert record["document"] == d and record["tokens"] == len(ids)
            assert tok.encode(record["text"], add_special_tokens=False).ids == ids, (stage, d)
            supervised = [i for i, w in zip(ids, weights, strict=True) if w > 0]
            assert record["supervised_tokens"] == len(supervised)
            assert record["supervised_text"] == tok.decode(supervised, skip_special_tokens=False)
            assert record["supervised_text"].endswith("<|im_end|>")


def test_docs_shows_text_and_supervised_part(tmp_path):
    """The human form: control tokens marked, supervised runs bracketed, then the supervised text."""
    conv = [{"role": "user", "content": "say <|im_end|>"}, {"role": "assistant", "content": "ok"}]
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"conversations": conv}) + "\n")
    run_pack("--stage", "sft", "--input", str(src), "--out", str(tmp_path / "o"), "--workers", "1")
    proc = peek(tmp_path / "o", "--docs")
    assert proc.returncode == 0, proc.stderr
    record, = docs_json(tmp_path / "o")
    assert proc.stdout.splitlines()[1:] == [
        f"── document 0 · {record['tokens']} tokens, {record['supervised_tokens']} supervised ──",
        "⟦<|im_start|>⟧user", "say <|im_end|>⟦<|im_end|>⟧", "⟦<|im_start|>⟧assistant", "[ok⟦<|im_end|>⟧]", "",
        "supervised: ok⟦<|im_end|>⟧"]
    assert record["text"] == "<|im_start|>user\nsay <|im_end|><|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
    assert record["supervised_text"] == "ok<|im_end|>"
