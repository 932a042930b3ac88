"""preprocess/pack.py under bad input and a hostile file system: corrupt sources, record-level failures,
the accounting identity, truncation rules, zero rows, output-folder faults, the folder lock, resume checks.

Most cases run ``pack.main`` in-process (``--workers 1``) so that faults can be injected with monkeypatch;
each asserts the exit status, that the error is ONE line naming the file / field, and what is left on disk.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE, TOKENIZER, run_pack

import core.files
from core.files import FolderLock
from core.tokenizer import TextRefused, load_tokenizer
from preprocess import encode, pack, shards
from preprocess.encode import DROPPED_NO_LOSS, DROPPED_OVERLONG, OK, TRUNCATED, fit_unit
from preprocess.sources import SourceSpec, iter_items

TOK = load_tokenizer(TOKENIZER)
GOOD = {"conversations": [{"role": "user", "content": "你好"},
                          {"role": "assistant", "content": "你好！很高兴见到你。"}]}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``pack.main`` in-process with ``--workers 1 --quiet``: (exit status, stdout, stderr)."""
    rc = pack.main([*argv, "--workers", "1", "--quiet"])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str, *needles: str) -> None:
    assert err.count("\n") == 1 and err.startswith("pack.py: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def assert_nothing_left(out: Path) -> None:
    """No meta.json, no temp file, and no shard file without its finished .json record."""
    if not out.exists():
        return
    names = {p.name for p in out.iterdir()}
    assert "meta.json" not in names and not any(core.files.is_temp_file(n) for n in names), names
    for n in names:
        if n.startswith("shard_"):
            assert f"{n.split('.')[0]}.json" in names, f"{n} is a partial shard"


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- corrupt or truncated sources

def two_frame_zst(tmp_path: Path) -> tuple[Path, bytes, bytes, int]:
    """oasst1_zh as a .jsonl.zst of two zstd frames split in the middle of a line: (path, frame1, frame2, lines)."""
    import zstandard

    data = (SAMPLE / "sft" / "oasst1_zh.jsonl").read_bytes()
    cut = data.index(b"\n", len(data) // 2) - 10  # inside a line
    c = zstandard.ZstdCompressor(write_checksum=True)
    a, b = c.compress(data[:cut]), c.compress(data[cut:])
    path = tmp_path / "in.jsonl.zst"
    path.write_bytes(a + b)
    return path, a, b, data.count(b"\n")


def test_multi_frame_zst_is_read_whole(tmp_path, capsys):
    path, _, _, lines = two_frame_zst(tmp_path)  # every frame is read, none lost
    rc, _, err = run(capsys, "--stage", "sft", "--input", str(path), "--out", str(tmp_path / "o"))
    assert rc == 0, err
    assert shards.read_meta(tmp_path / "o")["counts"]["records_read"] == lines


@pytest.mark.parametrize("cut", ["frame_boundary", "mid_frame", "no_checksum", "garbage_inside", "garbage_after"])
def test_truncated_or_corrupt_zst_is_refused(tmp_path, capsys, cut):
    path, a, b, _ = two_frame_zst(tmp_path)
    mid = len(b) // 2
    path.write_bytes({"frame_boundary": a, "mid_frame": a + b[:mid], "no_checksum": a + b[:-4],
                      "garbage_inside": a + b[:mid] + bytes(range(7, 107)) + b[mid + 100:],
                      "garbage_after": a + b + b"garbage"}[cut])
    out = tmp_path / "o"
    for extra in ([], ["--skip-bad"]):  # a broken file is fatal: its lost records cannot be counted
        if cut == "frame_boundary" and extra:
            continue  # ends inside a record: with --skip-bad it is one counted truncated_record (below)
        rc, _, err = run(capsys, "--stage", "sft", "--input", str(path), "--out", str(out), *extra)
        assert rc == 1
        if cut == "frame_boundary":
            one_line_error(err, f"{path}:", "the file ends inside this record", "truncated")
        elif cut in ("mid_frame", "no_checksum"):
            one_line_error(err, f"{path}: truncated zstd stream: the frame starting at byte {len(a)}",
                           "the last complete line read was line")
        else:
            start = len(a) + (len(b) if cut == "garbage_after" else 0)
            one_line_error(err, f"{path}: corrupt zstd data in the frame starting at byte {start}")
        assert_nothing_left(out)
        assert not any(out.glob("shard_*")) if out.exists() else True
    if cut == "frame_boundary":
        rc, _, err = run(capsys, "--stage", "sft", "--input", str(path), "--out", str(out), "--skip-bad")
        assert rc == 0 and shards.read_meta(out)["counts"]["skipped"] == {"truncated_record": 1}


def test_single_frame_zst_cut_short(tmp_path, capsys):
    import zstandard

    path = tmp_path / "in.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress((SAMPLE / "sft" / "oasst1_zh.jsonl").read_bytes())[:3000])
    rc, _, err = run(capsys, "--stage", "sft", "--input", str(path), "--out", str(tmp_path / "o"), "--skip-bad")
    assert rc == 1
    one_line_error(err, f"{path}: truncated zstd stream: the frame starting at byte 0 is cut off at byte 3000",
                   "no complete line was read")


@pytest.mark.parametrize("damage", ["truncated", "flipped", "not_parquet"])
def test_corrupt_parquet_is_refused(tmp_path, capsys, damage):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (SAMPLE / "sft" / "kdconv_zh.jsonl").open()]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=40)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped":
        for i in range(200, len(data) // 2, 97):  # inside the first row groups' pages, not the footer
            data[i] ^= 0x5A
    else:
        data = bytearray(b"PAR1 this is not a parquet file at all PAR1")
    path.write_bytes(bytes(data))
    out = tmp_path / "o"
    rc, _, err = run(capsys, "--stage", "sft", "--input", str(path), "--out", str(out), "--skip-bad")
    assert rc == 1
    one_line_error(err, f"{path}: corrupt or unreadable Parquet file")
    assert_nothing_left(out)


# ---------------------------------------------------------------- record-level failures

LONG_USER = "很长的问题。" * 200
BAD_RECORDS = {
    "too_deep": ('{"conversations": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply", None),
    "bad_unicode": ('{"conversations": [{"role": "user", "content": "a\\ud800b"}, '
                    '{"role": "assistant", "content": "x"}]}', "lone UTF-16 surrogate", "conversations[0].content"),
    "unsupported_field": ({"conversations": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a", "reasoning_content": "hmm"}]},
                          "tinylm does not render tool calls / tools / reasoning_content yet",
                          "conversations[1].reasoning_content"),
    "too_long": ({"conversations": [{"role": "user", "content": "x" * 3000}, {"role": "assistant", "content": "y"}]},
                 "more than --max-record-chars 2,000", None),
    "not_object": ("[1, 2, 3]", "expected a JSON object, got list", None),
}


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


def test_record_the_tokenizer_refuses_is_a_bad_record(tmp_path, capsys, monkeypatch):
    real = encode.encode_documents

    def picky(tok, docs, tag_weight=1):  # as core.tokenizer reports a text its tokenizer cannot encode
        for i, doc in enumerate(docs):
            if any("BOOM" in piece.text for piece in doc):
                raise TextRefused(f"document {i}: text the tokenizer cannot encode (refused)", i)
        return real(tok, docs, tag_weight)
    monkeypatch.setattr(encode, "encode_documents", picky)
    boom = {"conversations": [{"role": "user", "content": "BOOM"}, {"role": "assistant", "content": "x"}]}
    src = jsonl(tmp_path / "in.jsonl", [GOOD, boom, GOOD])
    rc, _, err = run(capsys, "--stage", "sft", "--input", str(src), "--out", str(tmp_path / "o"))
    assert rc == 1
    one_line_error(err, f"{src}:2:", "the tokenizer refuses this record: text the tokenizer cannot encode (refused)")
    rc, _, err = run(capsys, "--stage", "sft", "--input", str(src), "--out", str(tmp_path / "o"), "--skip-bad")
    counts = shards.read_meta(tmp_path / "o")["counts"]
    assert rc == 0 and counts["skipped"] == {"tokenizer_refused": 1} and counts["records_kept"] == 2


def test_a_huge_line_is_never_held_in_memory(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"text": "' + b"x" * 5_000_000 + b'"}\n' +
                    json.dumps(GOOD).encode())
    items = list(iter_items([SourceSpec(src, 1.0)], max_line_bytes=1000))
    assert [(i.line, i.oversize, len(i.payload)) for i in items] == [
        (1, 0, len(json.dumps(GOOD))), (2, 5_000_012, 0), (3, 0, len(json.dumps(GOOD)))]
    assert items[2].unterminated and not items[0].unterminated


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


def test_pretrain_tokens_in_no_window_are_counted_and_warned(tmp_path, capsys):
    src = str(SAMPLE / "pretrain" / "wiki_en_demo.jsonl")
    rc, _, err = run(capsys, "--stage", "pretrain", "--input", src, "--out", str(tmp_path / "o"), "--seq-len", "1000",
                     "--shard-tokens", "1500")
    assert rc == 0
    meta = shards.read_meta(tmp_path / "o")
    c = meta["counts"]
    expected = sum(s["tokens"] - (s["train_rows"] * 1000 + 1 if s["train_rows"] else 0) for s in meta["shards"])
    assert c["unused_tokens"] == expected > 0.01 * c["tokens"]
    assert err.count("\n") == 1 and f"({c['unused_tokens']:,} of {c['tokens']:,}) are in no training window" in err


def test_a_source_its_weight_empties_is_warned_and_every_source_counted(tmp_path, capsys):
    big, small = SAMPLE / "sft" / "kdconv_zh.jsonl", jsonl(tmp_path / "small.jsonl", [GOOD, GOOD])
    rc, _, err = run(capsys, "--stage", "sft", "--input", str(big), f"{small}:0.01", "--out", str(tmp_path / "o"),
                     "--seq-len", "4096")
    assert rc == 0
    assert err == f"pack.py: warning: {small}:0.01 contributed no record: its weight keeps none of its records; " \
                  "raise the weight\n"
    sources = shards.read_meta(tmp_path / "o")["sources"]
    assert [(s["path"], s["records"]) for s in sources] == [(str(big), 120), (str(small), 0)]


# ---------------------------------------------------------------- truncation rules

def weights(prompt: int, answer: int) -> np.ndarray:
    return np.array([0] * prompt + [1] * answer + [0], dtype=np.uint8)  # prompt, answer + <|im_end|>, "\n"


def test_fit_unit_rules():
    assert fit_unit([weights(5, 5)], 16, "truncate") == (OK, [(0, 11)])
    assert fit_unit([weights(5, 20)], 16, "drop") == (DROPPED_OVERLONG, [])
    assert fit_unit([weights(5, 20)], 16, "truncate") == (TRUNCATED, [(0, 16)])
    assert fit_unit([weights(30, 5)], 16, "truncate") == (DROPPED_NO_LOSS, []), "nothing supervised survives"
    # DPO: the shared prompt loses tokens from the left, the same number on both sides; answers stay whole
    assert fit_unit([weights(20, 4), weights(20, 6)], 32, "truncate") == (TRUNCATED, [(10, 25), (10, 27)]), \
        "10 prompt + 5 answer + 10 prompt + 7 answer = 32"
    assert fit_unit([weights(20, 14), weights(20, 15)], 32, "truncate") == (DROPPED_OVERLONG, []), \
        "the answers alone do not fit (with one prompt token each)"
    assert fit_unit([weights(20, 4), weights(20, 6)], 32, "drop") == (DROPPED_OVERLONG, [])


def test_dpo_truncation_keeps_both_answers_whole(tmp_path, capsys):
    prompt = [{"role": "user", "content": "请详细解释。" * 60}]
    fits = {"chosen": prompt + [{"role": "assistant", "content": "好的。"}],
            "rejected": prompt + [{"role": "assistant", "content": "不。"}]}
    question = [{"role": "user", "content": "问"}]
    too_long = {"chosen": question + [{"role": "assistant", "content": "答案很长。" * 40}],
                "rejected": question + [{"role": "assistant", "content": "另一个长答案。" * 40}]}
    src = jsonl(tmp_path / "in.jsonl", [fits, too_long, fits])
    rc, _, err = run(capsys, "--stage", "dpo", "--input", str(src), "--out", str(tmp_path / "o"), "--seq-len", "128")
    assert rc == 0, err
    counts = shards.read_meta(tmp_path / "o")["counts"]
    assert counts["truncated"] == 2 and counts["dropped"] == {"overlong": 1} and counts["records_kept"] == 2
    f = shards.PackedFolder(tmp_path / "o")
    for s in f.shards:
        off = np.asarray(s.doc_offsets)
        for d, answer in zip(range(len(off) - 1), ["好的。", "不。"] * 2, strict=True):
            tokens, w = np.asarray(s.tokens[off[d]:off[d + 1]]), np.asarray(s.weights[off[d]:off[d + 1]])
            assert TOK.tokenizer.decode(tokens[w > 0].tolist(), skip_special_tokens=False) == answer + "<|im_end|>"
            assert len(tokens) <= 64


def test_truncated_sft_without_supervised_tokens_is_dropped_and_counted(tmp_path, capsys):
    long_prompt = {"conversations": [{"role": "user", "content": LONG_USER}, {"role": "assistant", "content": "好"}]}
    src = jsonl(tmp_path / "in.jsonl", [GOOD, long_prompt])
    rc, _, err = run(capsys, "--stage", "sft", "--input", str(src), "--out", str(tmp_path / "o"), "--seq-len", "64")
    counts = shards.read_meta(tmp_path / "o")["counts"]
    assert rc == 0 and counts["dropped"] == {"no_supervised_left": 1} and counts["records_kept"] == 1
    assert "50.0% of the records (1 of 2)" in err and err.count("\n") == 1


# ---------------------------------------------------------------- accounting

def test_accounting_identity_on_mixed_bad_input(tmp_path, capsys):
    long_answer = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "长" * 400}]}
    long_prompt = {"conversations": [{"role": "user", "content": LONG_USER}, {"role": "assistant", "content": "好"}]}
    huge = {"conversations": [{"role": "user", "content": "x" * 5000}, {"role": "assistant", "content": "y"}]}
    rows = [GOOD, long_answer, long_prompt, "{broken", BAD_RECORDS["too_deep"][0], BAD_RECORDS["bad_unicode"][0],
            BAD_RECORDS["unsupported_field"][0], "[]", GOOD, huge]
    src = jsonl(tmp_path / "in.jsonl", rows)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    rc = pack.main(["--stage", "sft", "--input", str(src), str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "o"),
                    "--seq-len", "64", "--skip-bad", "--workers", "1", "--max-record-chars", "4000"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    c = shards.read_meta(tmp_path / "o")["counts"]
    assert c["records_read"] == len(rows) + 1  # + the empty file
    assert c["records_kept"] + sum(c["dropped"].values()) + sum(c["skipped"].values()) == c["records_read"]
    assert (c["records_kept"], c["truncated"], c["dropped"]) == (3, 1, {"no_supervised_left": 1})
    assert c["skipped"] == {"bad_unicode": 1, "empty_file": 1, "invalid_json": 1, "not_object": 1, "too_deep": 1,
                            "too_long": 1, "unsupported_field": 1}
    assert ("read 11 = kept 3 (1 truncated) + dropped 1 (no_supervised_left 1) + skipped 7 (bad_unicode 1, "
            "empty_file 1, invalid_json 1, not_object 1, too_deep 1, too_long 1, unsupported_field 1)") in out
    warnings = [line for line in err.splitlines() if line.startswith("pack.py:")]  # (not --quiet: a tqdm bar too)
    assert len(warnings) == 2 and "18.2% of the records (2 of 11) are longer than --seq-len 64" in warnings[0]
    assert warnings[1] == ("pack.py: warning: 63.6% of the records (7 of 11) were bad and skipped (--skip-bad): "
                           "bad_unicode 1, empty_file 1, invalid_json 1, not_object 1, too_deep 1, too_long 1, "
                           "unsupported_field 1")


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


# ---------------------------------------------------------------- zero rows, workers

def test_zero_training_rows_is_an_error(tmp_path, capsys):
    src = jsonl(tmp_path / "in.jsonl", [{"text": "short document"}, {"text": "another one"}])
    out = tmp_path / "o"
    rc, _, err = run(capsys, "--stage", "pretrain", "--input", str(src), "--out", str(out), "--seq-len", "64")
    assert rc == 1
    one_line_error(err, "no training row", "--seq-len 64", "lower --seq-len")
    assert_nothing_left(out)
    assert not any(out.iterdir()) or {p.name for p in out.iterdir()} == {".lock"}
    bad = jsonl(tmp_path / "bad.jsonl", ["{nope", "[]"])
    rc, _, err = run(capsys, "--stage", "pretrain", "--input", str(bad), "--out", str(out), "--skip-bad")
    assert rc == 1
    one_line_error(err, f"no record was kept from {bad}", "skipped 2 (invalid_json 1, not_object 1)")
    assert_nothing_left(out)


def test_workers_capped_at_usable_cores(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pack, "usable_cores", lambda: 1)
    src = SAMPLE / "sft" / "kdconv_zh.jsonl"
    rc = pack.main(["--stage", "sft", "--input", str(src), "--out", str(tmp_path / "o"), "--workers", "64"])
    out, err = capsys.readouterr()
    assert rc == 0 and "pack.py: note: --workers 64 capped at the 1 usable core(s)" in err
    assert "read 120 = kept" in out


def _encode_or_die(items):
    """A worker that is killed (as by the OOM killer) on the second pass over the file."""
    if items[-1].line != 370:
        os.kill(os.getpid(), signal.SIGKILL)
    return encode.encode_in_worker(items)


def test_a_dead_worker_is_an_error_not_a_hang(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pack, "usable_cores", lambda: 2)
    monkeypatch.setattr(pack, "encode_in_worker", _encode_or_die)
    src = SAMPLE / "sft" / "alpaca_zh_demo.jsonl"  # 370 records, twice: 512-record chunks end at lines 142, 370
    out = tmp_path / "o"
    rc = pack.main(["--stage", "sft", "--input", f"{src}:2", "--out", str(out), "--workers", "2", "--quiet"])
    _, err = capsys.readouterr()
    assert rc == 1
    one_line_error(err, "a tokenizer worker process died", "the 512 records from", f"{src}:1 on", "--workers")
    assert_nothing_left(out)


# ---------------------------------------------------------------- the output folder

SFT = ["--stage", "sft", "--input", str(SAMPLE / "sft" / "kdconv_zh.jsonl"), "--seq-len", "256"]


def test_out_is_a_file_or_not_creatable(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = run(capsys, *SFT, "--out", str(blocker))
    assert rc == 1
    one_line_error(err, f"{blocker}: the output folder is a file, not a folder")
    rc, _, err = run(capsys, *SFT, "--out", str(blocker / "sub"))
    assert rc == 1
    one_line_error(err, f"{blocker / 'sub'}: cannot create the output folder (not a directory)")
    assert blocker.read_text() == "x"


def test_read_only_file_system(tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    out = tmp_path / "ro"
    monkeypatch.setattr(Path, "mkdir", read_only)
    rc, _, err = run(capsys, *SFT, "--out", str(out))
    assert rc == 1
    one_line_error(err, f"{out}: cannot create the output folder (read-only file system)")
    monkeypatch.undo()
    out.mkdir()
    real_open = os.open
    monkeypatch.setattr(core.files.os, "open", lambda path, flags, *a: read_only() if flags & os.O_CREAT
                        else real_open(path, flags, *a))
    rc, _, err = run(capsys, *SFT, "--out", str(out))
    assert rc == 1
    one_line_error(err, "read-only file system", str(out))
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("fault", ["dev_full", "fsync", "rename"])
def test_disk_full_or_failing_rename_mid_pack_leaves_nothing_half_written(tmp_path, capsys, monkeypatch, fault):
    argv = [*SFT[:3], str(SAMPLE / "sft" / "*.jsonl"), "--seq-len", "256", "--shard-tokens", "20000"]
    rc, _, err = run(capsys, *argv, "--out", str(tmp_path / "clean"))
    assert rc == 0, err
    victim = "shard_00002.mask"
    real_open, real_fsync, real_replace = Path.open, os.fsync, os.replace
    if fault == "dev_full":  # the temp file of one shard file is really /dev/full
        def fake_open(self, mode="r", *a, **k):
            return real_open(Path("/dev/full"), mode, *a, **k) if self.name.startswith(victim + ".tmp") \
                else real_open(self, mode, *a, **k)
        monkeypatch.setattr(Path, "open", fake_open)
    elif fault == "fsync":  # ENOSPC surfacing at fsync (delayed allocation)
        def fake_fsync(fd):
            if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(victim + ".tmp"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_fsync(fd)
        monkeypatch.setattr(core.files.os, "fsync", fake_fsync)
    else:
        def fake_replace(src, dst):
            if Path(dst).name == victim:
                raise OSError(errno.EIO, "Input/output error")
            return real_replace(src, dst)
        monkeypatch.setattr(core.files.os, "replace", fake_replace)
    out = tmp_path / "o"
    rc, _, err = run(capsys, *argv, "--out", str(out))
    assert rc == 1
    one_line_error(err, f"{out / victim}: cannot write (",
                   "input/output error" if fault == "rename" else "no space left on device")
    assert_nothing_left(out)
    assert not (out / victim).exists() and (out / "shard_00001.json").exists()
    monkeypatch.undo()  # space freed: the same command resumes and ends with the clean run's bytes
    rc, _, err = run(capsys, *argv, "--out", str(out))
    assert rc == 0, err
    assert files_of(out) == files_of(tmp_path / "clean")


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("victim", ["meta.json", ".pack_state.json", "shard_00000.json"])
@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe",
                                     b'{"plan_fingerprint": 7, "shards": {}, "files": 1, "records_end": "x"}'])
def test_corrupt_json_in_out_is_one_line(tmp_path, capsys, victim, content):
    out = tmp_path / "o"
    argv = [*SFT, "--shard-tokens", "10000", "--out", str(out)]
    rc, _, err = run(capsys, *argv)
    assert rc == 0, err
    if victim != "meta.json":  # an interrupted run: no meta.json, the state file and shard records
        meta = json.loads((out / "meta.json").read_text())
        (out / "meta.json").unlink()
        (out / ".pack_state.json").write_text(json.dumps({"plan_fingerprint": meta["plan_fingerprint"]}))
    (out / victim).write_bytes(content)
    before = files_of(out)
    rc, _, err = run(capsys, *argv)
    assert rc == 1
    one_line_error(err, f"{out / victim}: the ", "is corrupt", "--overwrite")
    assert files_of(out) == before, "nothing was changed"
    rc, _, err = run(capsys, *argv, "--overwrite")
    assert rc == 0, err
    assert shards.verify(out) == []


def test_second_pack_into_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    with FolderLock(out, "pack"):  # another process holds the folder (flock is per open file description)
        proc = run_pack(*SFT, "--out", str(out), check=False)
        assert proc.returncode == 1
        one_line_error(proc.stderr, f"{out}: another pack (pid {os.getpid()}) is using this folder")
        assert not (out / "meta.json").exists()
    run_pack(*SFT, "--out", str(out))  # released (as by a killed holder): no stale lock
    assert (out / ".lock").read_text() == ""


def test_two_real_packs_at_once_and_a_killed_one_leaves_no_stale_lock(tmp_path):
    import subprocess
    import sys
    import time

    from conftest import REPO

    out = tmp_path / "o"
    slow = ["--stage", "pretrain", "--input", f"{SAMPLE / 'pretrain' / '*.jsonl'}:50", "--workers", "1",
            "--seq-len", "128", "--out", str(out)]
    first = subprocess.Popen([sys.executable, str(REPO / "preprocess" / "pack.py"), *slow, "--quiet"],
                             start_new_session=True)
    try:
        deadline = time.time() + 60
        while not (out / ".pack_state.json").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.01)  # the state file is written while the lock is held
        second = run_pack(*slow, check=False)
        assert first.poll() is None, "the first pack must still be running for this test to mean anything"
        assert second.returncode == 1
        one_line_error(second.stderr, f"{out}: another pack (pid {first.pid}) is using this folder")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not (out / "meta.json").exists()
    rc = run_pack("--stage", "pretrain", "--input", str(SAMPLE / "pretrain" / "wiki_en_demo.jsonl"),
                  "--seq-len", "128", "--out", str(out), check=False)
    assert rc.returncode == 0, rc.stderr  # the kernel dropped the dead holder's lock


# ---------------------------------------------------------------- resume checks shard checksums

@pytest.mark.parametrize("interrupted", [False, True])
def test_resume_repacks_a_shard_whose_checksum_changed(tmp_path, capsys, interrupted):
    argv = [*SFT[:3], str(SAMPLE / "sft" / "*.jsonl"), "--seq-len", "256", "--shard-tokens", "20000"]
    rc, _, err = run(capsys, *argv, "--out", str(tmp_path / "clean"))
    assert rc == 0, err
    out = tmp_path / "o"
    shutil.copytree(tmp_path / "clean", out)
    reference = files_of(out)
    if interrupted:
        meta = json.loads((out / "meta.json").read_text())
        (out / "meta.json").unlink()
        (out / ".pack_state.json").write_text(json.dumps({"plan_fingerprint": meta["plan_fingerprint"]}))
    victim = out / "shard_00001.bin"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    victim.write_bytes(bytes(data))
    shard0 = (out / "shard_00000.bin").stat().st_mtime_ns
    rc = pack.main([*argv, "--out", str(out), "--workers", "1"])
    _, err = capsys.readouterr()
    assert rc == 0 and f"{out / 'shard_00001'}: its files do not match their recorded checksums" in err
    assert files_of(out) == reference and shards.verify(out) == []
    assert (out / "shard_00000.bin").stat().st_mtime_ns == shard0, "the intact shard before it is kept"


# ---------------------------------------------------------------- bin/eval packs through the same options

def test_eval_packs_with_pack_options_and_defaults(tmp_path):
    from dataclasses import fields

    from preprocess.options import RecordOptions
    from serve.evaluate import DataOptions, pack_jsonl

    for f in fields(RecordOptions):
        assert getattr(DataOptions("sft", 64), f.name) == f.default, f.name
    src = str(SAMPLE / "sft" / "oasst1_zh.jsonl")
    for overlong in ("truncate", "drop"):
        got = pack_jsonl([src], "sft", TOKENIZER, tmp_path / f"e_{overlong}", DataOptions("sft", 64, overlong=overlong),
                         quiet=True)
        run_pack("--stage", "sft", "--input", src, "--out", str(tmp_path / f"p_{overlong}"), "--seq-len", "64",
                 "--overlong", overlong)
        assert got["counts"] == shards.read_meta(tmp_path / f"p_{overlong}")["counts"]
        assert got["options"] == shards.read_meta(tmp_path / f"p_{overlong}")["options"]
