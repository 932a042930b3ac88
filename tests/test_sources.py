"""preprocess/sources.py: JSONL, multi-frame .zst and Parquet readers, refusal of a corrupt or truncated
file (fatal whatever --skip-bad says), bounded memory for a huge line, and the mixing weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SAMPLE, run_pack
from pack_helpers import GOOD, assert_nothing_left, files_of, jsonl, one_line_error, run

from preprocess import shards
from preprocess.sources import SourceSpec, iter_items

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


# ---------------------------------------------------------------- formats, line sizes, weights

def test_zst_and_parquet_inputs_give_the_same_tokens(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    src = SAMPLE / "sft" / "oasst1_zh.jsonl"
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(src.read_bytes()))
    rows = [json.loads(line) for line in src.open()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    outs = {}
    for name, path in {"jsonl": src, "zst": tmp_path / "a.jsonl.zst", "parquet": tmp_path / "a.parquet"}.items():
        run_pack("--stage", "sft", "--input", str(path), "--out", str(tmp_path / name))
        outs[name] = {k: v for k, v in files_of(tmp_path / name).items() if k.endswith((".bin", ".mask", ".idx"))}
    assert outs["jsonl"] == outs["zst"] == outs["parquet"]


def test_a_huge_line_is_never_held_in_memory(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"text": "' + b"x" * 5_000_000 + b'"}\n' +
                    json.dumps(GOOD).encode())
    items = list(iter_items([SourceSpec(src, 1.0)], max_line_bytes=1000))
    assert [(i.line, i.oversize, len(i.payload)) for i in items] == [
        (1, 0, len(json.dumps(GOOD))), (2, 5_000_012, 0), (3, 0, len(json.dumps(GOOD)))]
    assert items[2].unterminated and not items[0].unterminated


def test_mixing_weights_repeat_and_subsample(tmp_path):
    src = SAMPLE / "sft" / "kdconv_zh.jsonl"
    n = sum(1 for _ in src.open())
    counts = {}
    for weight in ("1", "2", "0.5"):
        out = tmp_path / weight
        run_pack("--stage", "sft", "--input", f"{src}:{weight}", "--out", str(out), "--seq-len", "2048")
        counts[weight] = shards.read_meta(out)["counts"]["records_read"]
    assert counts["1"] == n and counts["2"] == 2 * n
    assert 0.35 * n < counts["0.5"] < 0.65 * n
    run_pack("--stage", "sft", "--input", f"{src}:0.5", "--out", str(tmp_path / "again"), "--seq-len", "2048")
    assert files_of(tmp_path / "again") == files_of(tmp_path / "0.5")


def test_a_source_its_weight_empties_is_warned_and_every_source_counted(tmp_path, capsys):
    big, small = SAMPLE / "sft" / "kdconv_zh.jsonl", jsonl(tmp_path / "small.jsonl", [GOOD, GOOD])
    rc, _, err = run(capsys, "--stage", "sft", "--input", str(big), f"{small}:0.01", "--out", str(tmp_path / "o"),
                     "--seq-len", "4096")
    assert rc == 0
    assert err == f"pack.py: warning: {small}:0.01 contributed no record: its weight keeps none of its records; " \
                  "raise the weight\n"
    sources = shards.read_meta(tmp_path / "o")["sources"]
    assert [(s["path"], s["records"]) for s in sources] == [(str(big), 120), (str(small), 0)]
