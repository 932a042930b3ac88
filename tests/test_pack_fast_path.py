"""pack.py's fast path against its reference path: the same shards, byte for byte.

The fast path parses lines with orjson, splits each read block at its newlines in one call and gets ids
from ``encode_batch_fast``. The reference is what it replaced: ``json.loads`` for every record (orjson
made to refuse everything), a whole file split at b"\\n" for the lines, ``encode_batch`` for the ids.
"""

from __future__ import annotations

import dataclasses
import json
import types

import orjson
import pytest
from conftest import SAMPLE
from pack_helpers import files_of

from preprocess import pack, packer, records, sources
from preprocess.sources import SourceSpec, iter_items

# Lines where orjson and the standard library may part ways; every one must end as json.loads decides.
HOSTILE = [
    b'\xef\xbb\xbf{"text": "a byte-order mark before the first record"}',
    b'{"text": "NaN is not JSON, but the standard library reads it", "x": NaN}',
    b'{"text": "an integer wider than 64 bits", "n": 123456789012345678901234567890}',
    b'{"text": "1e400 overflows a double", "f": 1e400}',
    b'{"text": "a lone \\ud800 surrogate escape"}',
    b'{"text": "a CRLF line"}\r',
    b"   \t ",
    b"",
    b'{"text": "duplicate key", "text": "the last one wins"}',
    b'{"text": "escapes \\u00e9\\u4e2d\\n and a tab\\t"}',
    b'{"text": 5}',
    b'{"text": "   "}',
    b"not json at all",
    b"\xff\xfe invalid UTF-8",
    b'["an", "array"]',
    b'{"text": "' + "很长的一行".encode() * 3000 + b'"}',
    b'{"text": "the file ends inside this record", ',
]


class ReferenceEncoder:
    """A tokenizer whose ``encode_batch_fast`` is its ``encode_batch`` (offsets computed, then unused)."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer

    def encode_batch_fast(self, texts: list[str], add_special_tokens: bool) -> list:
        return self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)

    def __getattr__(self, name: str) -> object:
        return getattr(self.tokenizer, name)


def refuse(payload: bytes) -> None:
    raise orjson.JSONDecodeError("refused to force the reference path", "", 0)


def reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every record through json.loads, every id through encode_batch."""
    monkeypatch.setattr(records, "orjson", types.SimpleNamespace(loads=refuse, JSONDecodeError=orjson.JSONDecodeError))
    load = packer.load_tokenizer

    def load_reference(path: str) -> object:
        tok = load(path)
        return dataclasses.replace(tok, literal=ReferenceEncoder(tok.literal),
                                   tokenizer=ReferenceEncoder(tok.tokenizer))
    monkeypatch.setattr(packer, "load_tokenizer", load_reference)


def pack_twice(tmp_path, monkeypatch, stage: str, inputs: list[str], *extra: str) -> tuple[dict, dict]:
    """The files of one in-process pack on the fast path and one on the reference path."""
    def one(out: str) -> dict:
        rc = pack.main(["--stage", stage, "--input", *inputs, "--out", str(tmp_path / out), "--workers", "1",
                        "--quiet", "--seq-len", "128", "--shard-tokens", "40000", *extra])
        assert rc == 0
        return files_of(tmp_path / out)
    fast = one("fast")
    with monkeypatch.context() as m:
        reference_path(m)
        reference = one("reference")
    return fast, reference


@pytest.mark.parametrize("stage,folder", [("pretrain", "pretrain"), ("sft", "sft"), ("reason", "reasoning"),
                                          ("dpo", "dpo")])
def test_sample_shards_are_byte_identical_on_both_paths(tmp_path, monkeypatch, stage, folder):
    fast, reference = pack_twice(tmp_path, monkeypatch, stage, [str(SAMPLE / folder / "*.jsonl")])
    assert fast == reference
    assert sum(name.startswith("shard_") for name in fast) >= 4  # several shards, each compared


def test_hostile_lines_end_as_the_standard_library_decides(tmp_path, monkeypatch):
    src = tmp_path / "hostile.jsonl"
    src.write_bytes(b"\n".join(HOSTILE))  # the last line has no newline
    fast, reference = pack_twice(tmp_path, monkeypatch, "pretrain", [str(src)], "--skip-bad",
                                 "--max-record-chars", "10000", "--seq-len", "16")  # the last --seq-len wins
    assert fast == reference
    counts = json.loads(fast["meta.json"])["counts"]
    assert counts["records_read"] == 15 and counts["records_kept"] == 7
    assert counts["skipped"] == {"bad_type": 1, "bad_unicode": 1, "empty_content": 1, "invalid_json": 1,
                                 "not_object": 1, "not_utf8": 1, "too_long": 1, "truncated_record": 1}


@pytest.mark.parametrize("block", [1, 2, 7, 64, 1 << 20])
def test_lines_across_blocks_match_a_whole_file_split(tmp_path, monkeypatch, block):
    src = tmp_path / "lines.jsonl"
    data = b"\n".join(HOSTILE[:-1]) + b"\n\n" + b"x" * 300 + b"\n" + HOSTILE[-1]
    src.write_bytes(data)
    monkeypatch.setattr(sources, "READ_BYTES", block)
    items = list(iter_items([SourceSpec(src, 1.0)], max_line_bytes=200))
    lines = data.split(b"\n")
    expected = [(n, b"" if len(line) > 200 else line.rstrip(b"\r"), len(line) if len(line) > 200 else 0,
                 n == len(lines)) for n, line in enumerate(lines, 1) if line.strip()]
    assert [(i.line, i.payload, i.oversize, i.unterminated) for i in items] == expected
    assert sum(i.oversize > 0 for i in items) == 2  # the long record and the 300 x's
