"""preprocess/shards.py, the format: uint16/uint32 tokens, headers and sizes, meta.json's fields checked
against the shards (one line naming the file and field), checksums, token ids within the vocabulary."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench.bench_verify import build_dataset
from preprocess import shards

# ---------------------------------------------------------------- writing and mapping

def test_uint32_tokens_when_vocab_exceeds_uint16(tmp_path):
    assert shards.token_dtype_for(6400) == "uint16" and shards.token_dtype_for(70_000) == "uint32"
    tokens = np.array([1, 65_535, 65_536, 69_999], dtype=np.uint32)
    arrays = shards.ShardArrays(tokens, np.ones(4, np.uint8), np.array([0, 4]), np.array([0, 1]))
    with pytest.raises(shards.ShardError, match="does not fit uint16"):
        shards.write_shard(tmp_path, 0, arrays, "uint16", {})
    shards.write_shard(tmp_path, 0, arrays, "uint32", {})
    back = shards.open_shard(tmp_path, "shard_00000", "uint32")
    assert np.asarray(back.tokens).tolist() == tokens.tolist()


def test_write_shard_records_the_largest_token_id(tmp_path):
    folder = small_dataset(tmp_path / "data")
    record = json.loads((folder / "meta.json").read_text())["shards"][0]
    tokens = shards.open_shard(folder, record["name"], "uint16").tokens
    assert record["max_token"] == int(np.asarray(tokens).max())


def test_truncated_or_corrupted_shard_is_refused_by_name(tmp_path, packed_sample):
    folder = tmp_path / "copy"
    shutil.copytree(packed_sample["sft"], folder)
    assert shards.verify(folder) == []
    victim = folder / "shard_00001.bin"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert shards.verify(folder) == [f"{victim}: checksum mismatch (the file was changed or corrupted)"]
    victim.write_bytes(bytes(data[:-2]))
    with pytest.raises(shards.ShardError, match="shard_00001.bin: .* bytes, the header promises"):
        shards.PackedFolder(folder)


# ---------------------------------------------------------------- naming, the window rule, completion

def test_shard_names_and_the_files_that_belong_to_a_shard():
    assert shards.shard_name(3) == "shard_00003"
    names = ["shard_00003.bin", "shard_00003.mask", "shard_12345.json", "shard_00003.bin.tmp.77", "meta.json",
             "shard_3.bin", "xshard_00001.bin", ".pack_state.json", "shard_00001"]
    assert [shards.shard_index(n) for n in names] == [3, 3, 12345, 3, None, None, None, None, None]


def test_the_pretrain_window_rule_is_what_a_folder_serves(tmp_path):
    """A row is seq_len + 1 tokens from r * seq_len: (n - 1) // seq_len rows; the tail after the last one is
    unused. Checked against the rows PackedFolder hands out."""
    seq = 64
    build_dataset(tmp_path / "d", 20_000, stage="pretrain", seq_len=seq, shard_tokens=8192)
    folder = shards.PackedFolder(tmp_path / "d")
    assert [len(s.tokens) for s in folder.shards] == [8192, 8192, 3616]
    for index, shard in enumerate(folder.shards):
        n = len(shard.tokens)
        rows = shards.window_rows(n, seq)
        served = int(folder.row_start[index + 1] - folder.row_start[index])
        assert rows == shard.training_rows(seq, packed=False) == served
        last, _, _ = folder.row(int(folder.row_start[index + 1]) - 1)
        assert np.array_equal(np.asarray(last), np.asarray(shard.tokens[(rows - 1) * seq:rows * seq + 1]))
        assert len(last) == seq + 1 and shards.unused_window_tokens(n, seq) == n - (rows * seq + 1)
    assert (shards.window_rows(seq, seq), shards.window_rows(seq + 1, seq)) == (0, 1)
    assert shards.unused_window_tokens(seq, seq) == seq and shards.unused_window_tokens(seq + 1, seq) == 0


def test_finished_shards_is_the_prefix_of_sound_shards(tmp_path):
    folder = small_dataset(tmp_path / "data")
    records = shards.read_meta(folder)["shards"]
    check = ("uint16", 6400, 64)
    assert shards.finished_shards(folder, records, *check) == (records, None)
    assert shards.finished_shards(folder, [*records[:2], None, records[2]], *check) == (records[:2], None)
    done, problem = shards.finished_shards(folder, [records[0], records[2]], *check)
    assert done == records[:1] and str(problem) == (f"{folder / 'shard_00001.json'}: records shard_00002 in the "
                                                    "place of shard_00001")
    done, problem = shards.finished_shards(folder, [records[0], {**records[1], "files": {}}], *check)
    assert done == records[:1] and str(problem).startswith(f"{folder / 'shard_00001.json'}: field 'files': must list")
    victim = folder / "shard_00001.bin"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: only the checksum tells
    victim.write_bytes(bytes(data))
    done, problem = shards.finished_shards(folder, records, *check)
    assert done == records[:1] and str(problem) == f"{victim}: checksum mismatch (the file was changed or corrupted)"


# ---------------------------------------------------------------- opening a folder checks it against meta.json

def small_dataset(folder: Path, stage: str = "sft") -> Path:
    """20k random tokens in 3 shards; sft: rows of two 32-token documents (seq_len 64)."""
    build_dataset(folder, 20_000, stage=stage, seq_len=64, shard_tokens=8192)
    return folder


def edit_meta(folder: Path, change) -> None:  # noqa: ANN001
    meta = json.loads((folder / "meta.json").read_text())
    change(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def one_line_error(folder: Path, verify: bool = True) -> str:
    with pytest.raises(shards.ShardError) as info:
        shards.PackedFolder(folder, verify=verify)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def _set(key: str, value):  # noqa: ANN001, ANN202
    return lambda m: m.__setitem__(key, value)


META_PROBLEMS = {
    "seq_len missing": (lambda m: m.pop("seq_len"), "meta.json: field 'seq_len': None is not a positive integer"),
    "seq_len a string": (_set("seq_len", "64"), "meta.json: field 'seq_len': '64' is not a positive integer"),
    "seq_len below the rows": (_set("seq_len", 16), "shard_00000.idx: a packed row holds 64 tokens, more than "
                                                    "meta.json's seq_len 16"),
    "vocab below the ids": (lambda m: m["tokenizer"].__setitem__("vocab_size", 100),
                            "shard_00000.bin: token id .* >= the tokenizer's vocab_size 100"),
    "uint32 over uint16 files": (_set("token_dtype", "uint32"), r"shard_00000.bin: item size 2 in the header, "
                                                                r"expected 4 \(uint32\)"),
    "unknown dtype": (_set("token_dtype", "int8"), "field 'token_dtype': 'int8' is not one of uint16, uint32"),
    "uint16 for a big vocab": (lambda m: m["tokenizer"].__setitem__("vocab_size", 70_000),
                               "field 'token_dtype': uint16 cannot hold the ids of a 70000-token vocabulary"),
    "tokenizer missing": (lambda m: m.pop("tokenizer"), "field 'tokenizer': missing or not an object"),
    "shards not a list": (_set("shards", {}), "field 'shards': missing or not a list"),
    "a file missing from a record": (lambda m: m["shards"][1]["files"].pop("shard_00001.mask"),
                                     r"field 'shards\[1\].files': must list exactly"),
    "a shard name that leaves the folder": (lambda m: m["shards"][0].__setitem__("name", "../x"),
                                            r"field 'shards\[0\].name': '../x' is not a shard name"),
    "token count contradicts": (lambda m: m["shards"][1].__setitem__("tokens", m["shards"][1]["tokens"] + 1),
                                "shard_00001.idx: meta.json says .* tokens for shard_00001, its files hold"),
    "byte size contradicts": (lambda m: m["shards"][2]["files"]["shard_00002.bin"].__setitem__("bytes", 999),
                              "shard_00002.bin: .* bytes, meta.json says 999"),
    "format version": (_set("format_version", 2), "field 'format_version': 2, this tinylm reads 1"),
}


@pytest.mark.parametrize("problem", sorted(META_PROBLEMS))
def test_meta_fields_that_are_missing_wrong_or_contradict_the_shards_are_one_line(tmp_path, problem):
    folder = small_dataset(tmp_path / "data")
    assert shards.PackedFolder(folder, verify=True).n_rows > 0  # sound before the edit
    change, expected = META_PROBLEMS[problem]
    edit_meta(folder, change)
    message = one_line_error(folder, verify=False)  # the structural checks need no checksums
    assert re.search(expected, message), message
    assert str(folder) in message


@pytest.mark.parametrize("text, expected", [("{", "not valid JSON"), ("[]", "not a JSON object"),
                                            ("", "not valid JSON")])
def test_corrupt_meta_json_is_one_line(tmp_path, text, expected):
    folder = small_dataset(tmp_path / "data")
    (folder / "meta.json").write_text(text)
    message = one_line_error(folder)
    assert f"{folder / 'meta.json'}:" in message and expected in message


def test_checksums_catch_a_changed_byte_that_the_structure_does_not(tmp_path):
    folder = small_dataset(tmp_path / "data")
    victim = folder / "shard_00001.mask"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    assert one_line_error(folder) == f"{victim}: checksum mismatch (the file was changed or corrupted)"
    assert shards.PackedFolder(folder, verify=False).n_rows > 0  # --no-verify: only the structure is checked
    assert shards.verify(folder) == [f"{victim}: checksum mismatch (the file was changed or corrupted)"]


def test_token_ids_beyond_the_vocabulary_are_refused_with_or_without_checksums(tmp_path):
    folder = small_dataset(tmp_path / "data")
    meta = json.loads((folder / "meta.json").read_text())
    shard = shards.open_shard(folder, "shard_00000", "uint16")
    tokens = np.array(shard.tokens)
    tokens[7] = 6500  # a packer bug or another tokenizer: the embedding has 6400 rows
    arrays = shards.ShardArrays(tokens, np.array(shard.weights), np.array(shard.doc_offsets), np.array(shard.row_docs))
    meta["shards"][0] = shards.write_shard(folder, 0, arrays, "uint16", {})  # an honest record: max_token 6500
    (folder / "meta.json").write_text(json.dumps(meta))
    expected = f"{folder / 'shard_00000.bin'}: token id 6500 >= the tokenizer's vocab_size 6400 (meta.json)"
    for verify in (True, False):
        assert one_line_error(folder, verify).startswith(expected)
    del meta["shards"][0]["max_token"]  # a dataset packed before max_token existed: the ids are scanned
    (folder / "meta.json").write_text(json.dumps(meta))
    assert one_line_error(folder, verify=False).startswith(expected)


def test_another_tokenizer_is_one_line_for_opening_and_verifying(tmp_path):
    folder = small_dataset(tmp_path / "data")
    meta = shards.read_meta(folder)
    other = "f" * 64
    expected = (f"{folder / 'meta.json'}: packed with another tokenizer ({meta['tokenizer']['path']}): tokenizer "
                f"fingerprint {meta['tokenizer']['fingerprint'][:12]}…, the given tokenizer's {other[:12]}…")
    with pytest.raises(shards.ShardError) as info:
        shards.PackedFolder(folder, tokenizer_fingerprint=other)
    assert str(info.value) == expected and shards.verify(folder, other) == [expected]
    assert shards.PackedFolder(folder, meta["tokenizer"]["fingerprint"]).n_rows > 0
    assert shards.verify(folder, meta["tokenizer"]["fingerprint"]) == []
