"""Helpers for the tests of preprocess/: pack.py run in-process, the one-line error check, what a failed
pack may leave on disk, and readers of a packed folder's documents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import SAMPLE, TOKENIZER

import core.files
from core.tokenizer import load_tokenizer
from preprocess import pack, shards

TOK = load_tokenizer(TOKENIZER)


GOOD = {"conversations": [{"role": "user", "content": "你好"},
                          {"role": "assistant", "content": "你好！很高兴见到你。"}]}


LONG_USER = "很长的问题。" * 200


BAD_RECORDS = {
    "too_deep": ('{"conversations": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply", None),
    "bad_unicode": ('{"conversations": [{"role": "user", "content": "a\\ud800b"}, '
                    '{"role": "assistant", "content": "x"}]}', "lone UTF-16 surrogate", "conversations[0].content"),
    "unsupported_field": ({"conversations": [{"role": "user", "content": "q"}, {"role": "function", "content": "4"},
                                             {"role": "assistant", "content": "a"}]},
                          "role 'function': tinylm renders tool calls, tools, reasoning_content and 'tool' turns",
                          "conversations[1].role"),
    "too_long": ({"conversations": [{"role": "user", "content": "x" * 3000}, {"role": "assistant", "content": "y"}]},
                 "more than --max-record-chars 2,000", None),
    "not_object": ("[1, 2, 3]", "expected a JSON object, got list", None),
}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``pack.main`` in-process with ``--workers 1 --quiet``: (exit status, stdout, stderr)."""
    rc = pack.main([*argv, "--workers", "1", "--quiet"])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str, *needles: str, tool: str = "pack.py") -> None:
    """``err`` is exactly one ``<tool>: error:`` line, without a traceback, holding every needle."""
    assert err.count("\n") == 1 and err.startswith(f"{tool}: error: ") and "Traceback" not in err, err
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


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def decode(ids) -> str:
    return TOK.tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=False)


def documents(folder: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, weights) of every stored document, in storage order."""
    f = shards.PackedFolder(folder)
    out = []
    for s in f.shards:
        off = np.asarray(s.doc_offsets)
        out += [(np.asarray(s.tokens[a:b]), np.asarray(s.weights[a:b])) for a, b in zip(off[:-1], off[1:], strict=True)]
    return out


def records(stage_folder: str) -> list[dict]:
    return [json.loads(line) for p in sorted((SAMPLE / stage_folder).glob("*.jsonl")) for line in p.open()]


def supervised_text(tokens: np.ndarray, weights: np.ndarray) -> str:
    return decode(tokens[weights > 0])
