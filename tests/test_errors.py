"""core/errors.py: one error type. Every TinyLMError keeps its type and location across a process boundary
(pack's workers), a hint is added without re-wrapping, read_json raises the caller's own type, and
run_main prints one line."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import TinyLMError, run_main
from core.files import read_json
from core.tokenizer import TextRefused
from preprocess.records import RecordError
from preprocess.shards import ShardError
from preprocess.sources import Item

REPO = Path(__file__).resolve().parents[1]


def located() -> RecordError:
    return RecordError("bad_type", "expected a non-empty list of turns", "conversations").at(Item("in.jsonl", 7, b""))


def test_every_error_pickles_with_its_type_and_location():
    for error in (TinyLMError("m", path="p", line=3, field="f"), located(), TextRefused("document 2: refused", 2),
                  ShardError("checksum mismatch", path="shard_00000.bin")):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error) and back.__dict__ == error.__dict__


def test_a_record_error_located_at_its_item():
    assert str(located()) == "in.jsonl:7: field 'conversations': expected a non-empty list of turns"
    empty = RecordError("empty_file", "the file contains no records").at(Item("e.jsonl", 0, None))
    assert str(empty) == "e.jsonl: the file contains no records" and empty.reason == "empty_file"


def test_with_hint_keeps_the_same_error():
    error = ShardError("bad", path="f.json", field="x")
    assert error.with_hint("do y") is error and str(error) == "f.json: field 'x': bad; do y"


def test_read_json_raises_the_callers_own_type(tmp_path):
    (tmp_path / "a.json").write_text("{")
    with pytest.raises(ShardError, match=r"a.json: the thing is corrupt: not valid JSON"):
        read_json(tmp_path / "a.json", "thing", ShardError)
    with pytest.raises(ShardError, match=r"b.json: the thing is missing"):
        read_json(tmp_path / "b.json", "thing", ShardError)


def test_run_main_prints_one_line(capsys):
    def fails() -> None:
        raise located()

    def interrupted() -> None:
        raise KeyboardInterrupt

    assert run_main("tool", fails) == 1
    assert capsys.readouterr().err == f"tool: error: {located()}\n"
    assert run_main("tool", interrupted, "interrupted; re-run to resume") == 130
    assert capsys.readouterr().err == "tool: interrupted; re-run to resume\n"
    assert run_main("tool", lambda: None) == 0


def test_the_error_line_is_one_write(monkeypatch):
    """DDP ranks print the same error at the same moment into one pipe: each line must reach it in one
    write, or the texts interleave (seen in CI: two ranks' lines joined into one, the newlines after)."""
    writes: list[str] = []

    class Stream:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stderr", Stream())

    def fails() -> None:
        raise located()

    assert run_main("tool", fails) == 1
    assert writes == [f"tool: error: {located()}\n"]


def test_run_main_leaves_every_object_to_the_garbage_collector():
    """A tool body run in-process (a test session) leaves no object out of the collector's reach: a cycle
    made before run_main and dropped after it is collected (start-up tweaks are the tools' own,
    ``core.startup``). A fresh interpreter, so that nothing earlier froze anything."""
    code = ("import gc, sys, weakref; sys.path.insert(0, sys.argv[1]); from core.errors import run_main\n"
            "class Node: pass\n"
            "node = Node(); node.me = node; alive = weakref.ref(node)\n"
            "run_main('t', lambda: 0); del node; gc.collect(); print(alive() is None)")
    out = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True"]
