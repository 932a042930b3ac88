"""preprocess/pack.py, the CLI and the library: round trips, determinism, resume after kill -9, the
accounting identity, zero rows, workers, the output folder under a hostile file system, the folder lock,
resume checks, and bin/eval packing through the same function and options.

Most fault cases run ``pack.main`` in-process (``--workers 1``) so that faults can be injected with
monkeypatch; each asserts the exit status, that the error is ONE line naming the file / field, and what is
left on disk."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SAMPLE, TOKENIZER, run_pack
from pack_helpers import (
    BAD_RECORDS,
    GOOD,
    LONG_USER,
    TOK,
    assert_nothing_left,
    decode,
    documents,
    files_of,
    jsonl,
    one_line_error,
    records,
    run,
    supervised_text,
)

import core.files
from core.chat_template import render_text
from core.files import FolderLock
from preprocess import encode, pack, packer, parallel, shards
from preprocess.records import parse_conversation
from preprocess.sources import Item

# ---------------------------------------------------------------- round trips

def test_pretrain_round_trip(packed_sample):
    texts = [r["text"] for r in records("pretrain")]
    docs = documents(packed_sample["pretrain"])
    assert [decode(t) for t, _ in docs] == [t + "<|endoftext|>" for t in texts]
    assert all((w == 1).all() for _, w in docs)
    meta = shards.read_meta(packed_sample["pretrain"])
    assert len(meta["shards"]) > 1 and meta["counts"]["records_kept"] == len(texts)


def test_sft_round_trip_and_mask(packed_sample):
    meta = shards.read_meta(packed_sample["sft"])
    docs = documents(packed_sample["sft"])
    convs = [r["conversations"] for r in records("sft")]
    assert meta["counts"]["records_read"] == len(convs)
    assert meta["counts"]["records_kept"] == len(docs) == len(convs) - meta["counts"]["dropped"]["overlong"]
    rendered = Counter(render_text(c) for c in convs)
    decoded = Counter(decode(t) for t, _ in docs)
    assert not decoded - rendered, "every stored document is the exact rendering of an input record"
    expected_mask = {render_text(c): "".join(t["content"] + "<|im_end|>" for t in c if t["role"] == "assistant")
                     for c in convs}
    for tokens, weights in docs:
        assert supervised_text(tokens, weights) == expected_mask[decode(tokens)]
        assert set(np.unique(weights)) <= {0, 1} and len(tokens) <= 256


def test_dpo_pairs_stay_together(packed_sample):
    docs = documents(packed_sample["dpo"])
    f = shards.PackedFolder(packed_sample["dpo"])
    for s in f.shards:  # every row holds whole pairs: an even number of documents, starting on an even one
        assert (np.asarray(s.row_docs) % 2 == 0).all()
    pairs = {(render_text(r["chosen"]), render_text(r["rejected"])): r for r in records("dpo")}
    assert len(docs) % 2 == 0
    for (ct, cw), (rt, rw) in zip(docs[::2], docs[1::2], strict=True):
        record = pairs[(decode(ct), decode(rt))]
        assert supervised_text(ct, cw) == record["chosen"][-1]["content"] + "<|im_end|>"
        assert supervised_text(rt, rw) == record["rejected"][-1]["content"] + "<|im_end|>"


# ---------------------------------------------------------------- determinism, resume

def test_output_identical_for_any_worker_count(tmp_path):
    args = ["--stage", "sft", "--input", str(SAMPLE / "sft" / "*.jsonl"), "--seq-len", "256", "--shard-tokens", "12000"]
    run_pack(*args, "--out", str(tmp_path / "w1"), "--workers", "1")
    run_pack(*args, "--out", str(tmp_path / "w2"), "--workers", "2")
    assert files_of(tmp_path / "w1") == files_of(tmp_path / "w2")
    assert len(shards.read_meta(tmp_path / "w1")["shards"]) > 2


def test_chunks_close_at_the_record_count_or_the_byte_size():
    sizes = [10, 20, 5, 5, 5, 5, 100]
    items = [Item("a.jsonl", n, b"x" * size) for n, size in enumerate(sizes, 1)]
    items += [Item("b.parquet", n, {"text": "y" * 100}) for n in range(1, 5)]  # rows count by number only
    batches = list(parallel.chunks(iter(items), 3, 25))
    assert [len(b) for b in batches] == [2, 3, 2, 3, 1]
    assert [i for b in batches for i in b] == items
    assert [len(b) for b in parallel.chunks(iter(items), 3)] == [3, 3, 3, 2]  # clean.py's chunks: by number only


def test_the_last_chunks_shrink_so_workers_end_together():
    items = [Item("a.jsonl", n, b"x") for n in range(1, 101)]
    batches = list(parallel.chunks(iter(items), 512, expected=100, parts=4))
    assert [len(b) for b in batches] == [25, 18, 14, 10, 8, 8, 8, 8, 1]  # a quarter of what is left, at least 8
    assert [i for b in batches for i in b] == items
    wrong = list(parallel.chunks(iter(items), 30, expected=40, parts=2))  # more items than expected: all still come
    assert [len(b) for b in wrong] == [20, 10, 8, 8, 8, 8, 8, 8, 8, 8, 6] and sum(map(len, wrong)) == 100


def test_output_identical_for_any_chunking(tmp_path, monkeypatch):
    src = tmp_path / "mixed.jsonl"
    lines = [json.dumps(GOOD), BAD_RECORDS["bad_unicode"][0], "not json", json.dumps(
        {"conversations": [{"role": "user", "content": LONG_USER}, {"role": "assistant", "content": "好"}]})]
    src.write_text("\n".join(lines * 5) + "\n")
    args = ["--stage", "sft", "--input", str(SAMPLE / "sft" / "*.jsonl"), str(src), "--seq-len", "128",
            "--shard-tokens", "30000", "--skip-bad"]
    assert pack.main([*args, "--out", str(tmp_path / "default"), "--workers", "1", "--quiet"]) == 0
    for name, per_chunk, size in (("one_each", 512, 1), ("seven", 7, 1 << 30)):
        monkeypatch.setattr(packer, "CHUNK_RECORDS", per_chunk)
        monkeypatch.setattr(packer, "CHUNK_BYTES", size)
        assert pack.main([*args, "--out", str(tmp_path / name), "--workers", "1", "--quiet"]) == 0
        assert files_of(tmp_path / name) == files_of(tmp_path / "default")
    assert len(shards.read_meta(tmp_path / "default")["shards"]) > 2


def test_resume_after_kill_is_byte_identical(tmp_path):
    args = ["--stage", "pretrain", "--input", str(SAMPLE / "pretrain" / "*.jsonl"), "--seq-len", "128",
            "--shard-tokens", "20000", "--workers", "2"]
    run_pack(*args, "--out", str(tmp_path / "whole"))
    reference = files_of(tmp_path / "whole")
    n_shards = len(shards.read_meta(tmp_path / "whole")["shards"])
    for attempt, kill_after in enumerate((1, n_shards // 2, n_shards - 2)):
        out = tmp_path / f"killed{attempt}"
        cmd = [sys.executable, str(REPO / "preprocess" / "pack.py"), *args, "--out", str(out), "--quiet"]
        proc = subprocess.Popen(cmd, start_new_session=True)
        marker = out / f"{shards.shard_name(kill_after)}.json"
        deadline = time.time() + 60
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (out / "meta.json").exists(), "killed before the end: no meta.json"
        (out / "shard_99999.bin.tmp").write_bytes(b"junk from the killed run")
        run_pack(*args, "--out", str(out))
        assert files_of(out) == reference


def test_rerun_of_finished_dataset_is_a_no_op_and_other_inputs_are_refused(tmp_path):
    src = SAMPLE / "sft" / "kdconv_zh.jsonl"
    run_pack("--stage", "sft", "--input", str(src), "--out", str(tmp_path / "o"))
    before = files_of(tmp_path / "o")
    run_pack("--stage", "sft", "--input", str(src), "--out", str(tmp_path / "o"))
    assert files_of(tmp_path / "o") == before
    proc = run_pack("--stage", "sft", "--input", str(SAMPLE / "sft" / "oasst1_zh.jsonl"), "--out", str(tmp_path / "o"),
                    check=False)
    assert proc.returncode == 1 and "already holds a packed dataset" in proc.stderr
    assert files_of(tmp_path / "o") == before


# ---------------------------------------------------------------- accounting, warnings, zero rows

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


def test_zero_training_rows_is_an_error(tmp_path, capsys):
    src = jsonl(tmp_path / "in.jsonl", [{"text": "short document"}, {"text": "another one"}])
    out = tmp_path / "o"
    rc, _, err = run(capsys, "--stage", "pretrain", "--input", str(src), "--out", str(out), "--seq-len", "64")
    assert rc == 1
    one_line_error(err, "no training row", "--seq-len 64", "lower --seq-len")
    assert not out.exists()  # the folder this failed pack created is removed again
    bad = jsonl(tmp_path / "bad.jsonl", ["{nope", "[]"])
    rc, _, err = run(capsys, "--stage", "pretrain", "--input", str(bad), "--out", str(out), "--skip-bad")
    assert rc == 1
    one_line_error(err, f"no record was kept from {bad}", "skipped 2 (invalid_json 1, not_object 1)")
    assert_nothing_left(out)


# ---------------------------------------------------------------- tokenizer, workers

def test_missing_input_and_bad_tokenizer(tmp_path):
    missing = str(tmp_path / "nope*.jsonl")
    proc = run_pack("--stage", "sft", "--input", missing, "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 1 and "matches no file" in proc.stderr and "Traceback" not in proc.stderr
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=300))
    plain.save(str(tmp_path / "tokenizer.json"))
    src = SAMPLE / "sft" / "kdconv_zh.jsonl"
    proc = run_pack("--stage", "sft", "--input", str(src), "--out", str(tmp_path / "o"), "--tokenizer", str(tmp_path),
                    check=False)
    assert proc.returncode == 1 and "<|endoftext|>" in proc.stderr and "tokenizer.json" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_reference_tokenizer_has_no_reasoning_tags(tmp_path, shared_data):
    ref = shared_data("reference_tokenizer")
    src = SAMPLE / "reasoning" / "gsm8k_en_think.jsonl"
    proc = run_pack("--stage", "reason", "--input", str(src), "--out", str(tmp_path / "o"), "--tokenizer", str(ref),
                    check=False)
    assert proc.returncode == 1 and "--tag-weight 1" in proc.stderr
    run_pack("--stage", "reason", "--input", str(src), "--out", str(tmp_path / "o"), "--tokenizer", str(ref),
             "--tag-weight", "1")
    assert shards.read_meta(tmp_path / "o")["tokenizer"]["vocab_size"] == 6400


def test_workers_capped_at_usable_cores(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(packer, "usable_cores", lambda: 1)
    src = SAMPLE / "sft" / "kdconv_zh.jsonl"
    rc = pack.main(["--stage", "sft", "--input", str(src), "--out", str(tmp_path / "o"), "--workers", "64"])
    out, err = capsys.readouterr()
    assert rc == 0 and "pack.py: note: --workers 64 capped at the 1 usable core(s)" in err
    assert "read 120 = kept" in out


def _encode_or_die(items):
    """A worker that is killed (as by the OOM killer) on every chunk but one that ends the file's first pass."""
    if items[-1].line != 370:
        os.kill(os.getpid(), signal.SIGKILL)
    return encode.encode_in_worker(items)


def test_a_dead_worker_is_an_error_not_a_hang(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(packer, "usable_cores", lambda: 2)
    monkeypatch.setattr(packer, "encode_in_worker", _encode_or_die)
    src = SAMPLE / "sft" / "alpaca_zh_demo.jsonl"  # 370 records (247 kB), twice: the first 128 KiB chunk is killed
    out = tmp_path / "o"
    rc = pack.main(["--stage", "sft", "--input", f"{src}:2", "--out", str(out), "--workers", "2", "--quiet"])
    _, err = capsys.readouterr()
    assert rc == 1
    one_line_error(err, "a tokenizer worker process died", "the chunk of records from", f"{src}:1 on", "--workers")
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


# ---------------------------------------------------------------- the library: pack(PackOptions) -> PackResult

def test_pack_returns_the_result_that_main_prints(tmp_path, capsys):
    """The library prints nothing; its PackResult holds the meta.json it wrote and the warnings; main prints
    exactly those and the summary, with the same bytes on disk; a re-run is complete and writes nothing; a
    run interrupted after some shards keeps them and ends with the same meta.json."""
    src = str(SAMPLE / "sft" / "oasst1_zh.jsonl")
    out = tmp_path / "lib"
    options = pack.PackOptions("sft", [src], out, seq_len=64, workers=1, shard_tokens=3000, quiet=True)
    result = pack.pack(options)
    assert capsys.readouterr() == ("", "")
    assert result.meta == json.loads((out / "meta.json").read_text()) and result.counts == result.meta["counts"]
    assert (result.out, result.kept_shards, result.already_complete) == (out, 0, False) and result.seconds > 0
    cut = result.counts["truncated"] + sum(result.counts["dropped"].values())
    assert cut > 0 and len(result.warnings) == 1 and result.notes == []
    assert result.warnings[0].startswith(f"{cut / result.counts['records_read']:.1%} of the records ({cut:,} of ")
    rc = pack.main(["--stage", "sft", "--input", src, "--out", str(tmp_path / "cli"), "--seq-len", "64",
                    "--workers", "1", "--shard-tokens", "3000"])
    printed, err = capsys.readouterr()
    assert rc == 0 and err.splitlines()[-1] == f"pack.py: warning: {result.warnings[0]}"
    assert printed.splitlines()[1] == f"  records   {pack.accounting_line(result.counts)}"
    assert files_of(tmp_path / "cli") == files_of(out)
    n = len(result.meta["shards"])
    again = pack.pack(options)
    assert again.already_complete and again.kept_shards == n and again.meta == result.meta
    assert again.warnings == [] and again.seconds == 0 and files_of(out) == files_of(tmp_path / "cli")
    assert n >= 3
    (out / "meta.json").unlink()  # as if killed while writing the last shard
    (out / ".pack_state.json").write_text(json.dumps({"plan_fingerprint": result.meta["plan_fingerprint"]}))
    for path in out.glob(f"{shards.shard_name(n - 1)}.*"):
        path.unlink()
    resumed = pack.pack(options)
    assert (resumed.kept_shards, resumed.already_complete) == (n - 1, False) and resumed.meta == result.meta
    assert files_of(out) == files_of(tmp_path / "cli")


def test_a_meta_json_of_another_format_version_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "o"
    argv = [*SFT, "--out", str(out)]
    rc, _, err = run(capsys, *argv)
    assert rc == 0, err
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format_version": shards.VERSION + 1}))
    before = files_of(out)
    rc, _, err = run(capsys, *argv)  # the same inputs and options: still not a dataset this tinylm reads
    assert rc == 1
    one_line_error(err, f"{out / 'meta.json'}: field 'format_version': {shards.VERSION + 1}, this tinylm reads "
                   f"{shards.VERSION}; pass --overwrite to repack {out} from scratch")
    assert files_of(out) == before
    rc, _, err = run(capsys, *argv, "--overwrite")
    assert rc == 0 and shards.read_meta(out)["format_version"] == shards.VERSION, err


# ---------------------------------------------------------------- bin/eval packs through the same function and options

def test_eval_packs_with_pack_options_and_defaults(tmp_path, capsys):
    from dataclasses import fields

    from preprocess.options import RecordOptions
    from serve.evaluate import DataOptions, pack_jsonl

    for f in fields(RecordOptions):
        assert getattr(DataOptions("sft", 64), f.name) == f.default, f.name
    src = str(SAMPLE / "sft" / "oasst1_zh.jsonl")
    for overlong in ("truncate", "drop"):
        got = pack_jsonl([src], "sft", TOKENIZER, tmp_path / f"e_{overlong}", DataOptions("sft", 64, overlong=overlong),
                         quiet=True)
        warned = capsys.readouterr().err
        packed = run_pack("--stage", "sft", "--input", src, "--out", str(tmp_path / f"p_{overlong}"), "--seq-len",
                          "64", "--overlong", overlong)
        assert warned.startswith("bin/eval: warning: ") and warned == packed.stderr.replace("pack.py:", "bin/eval:")
        assert got["counts"] == shards.read_meta(tmp_path / f"p_{overlong}")["counts"]
        assert got["options"] == shards.read_meta(tmp_path / f"p_{overlong}")["options"]


# ---------------------------------------------------------------- thinking and tool calls

TOOL_RECORDS = [
    {"tools": [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}],
     "conversations": [{"role": "user", "content": "12*7?"},
                       {"role": "assistant", "reasoning_content": "Use calc.", "content": None,
                        "tool_calls": [{"id": "c1", "type": "function",
                                        "function": {"name": "calc", "arguments": '{"expr": "12*7"}'}}]},
                       {"role": "tool", "tool_call_id": "c1", "content": "84"},
                       {"role": "assistant", "content": "84"}]},
    {"conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
                       {"role": "assistant", "reasoning_content": "1+1=2", "content": "2", "extra": "ignored"}]},
]


@pytest.mark.parametrize("stage", ["sft", "reason"])
def test_thinking_and_tool_records_round_trip(tmp_path, capsys, stage):
    """Pack renders tools, calls, results and reasoning_content as the template does; the loss covers the
    thinking, the content, the call text and <|im_end|> of assistant turns, never results or the tools list."""
    src = jsonl(tmp_path / "t.jsonl", TOOL_RECORDS)
    rc, _, err = run(capsys, "--stage", stage, "--input", str(src), "--out", str(tmp_path / "o"))
    assert rc == 0 and err == "", err
    docs = documents(tmp_path / "o")
    first = parse_conversation(TOOL_RECORDS[0])
    assert [decode(t) for t, _ in docs] == [render_text(first), render_text(TOOL_RECORDS[1]["conversations"])]
    assert [supervised_text(t, w) for t, w in docs] == [
        '<think>\nUse calc.\n</think>\n\n<tool_call>\n{"name": "calc", "arguments": {"expr": "12*7"}}\n'
        "</tool_call><|im_end|>84<|im_end|>",
        "<think>\n1+1=2\n</think>\n\n2<|im_end|>"]
    think = [TOK.special_ids["<think>"], TOK.special_ids["</think>"]]
    assert {int(w) for t, w in docs for w in w[np.isin(t, think)]} == ({10} if stage == "reason" else {1})


def test_a_tokenizer_without_tool_tags_packs_them_as_text_and_says_so(tmp_path, capsys):
    spec = json.loads((TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if "tool_" not in t["content"]]
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    src = jsonl(tmp_path / "t.jsonl", TOOL_RECORDS[:1])
    rc, _, err = run(capsys, "--stage", "sft", "--input", str(src), "--out", str(tmp_path / "o"),
                     "--tokenizer", str(tmp_path / "tok"))
    assert rc == 0
    assert err == (f"pack.py: warning: {tmp_path / 'tok' / 'tokenizer.json'}: <tool_call> </tool_call> "
                   "<tool_response> </tool_response> not single ids in this tokenizer: rendered and trained as text\n")
    [(tokens, weights)] = documents(tmp_path / "o")
    assert decode(tokens) == render_text(parse_conversation(TOOL_RECORDS[0]))
    assert not set(tokens.tolist()) & set(range(7, 11)) and set(weights.tolist()) == {0, 1}
