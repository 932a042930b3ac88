"""Large generated inputs in the shapes of MiniMind's published files, streamed to disk, for the full-size benches.

Two shapes, each written until the file holds at least the requested megabytes:

- **pretrain** (``pretrain_t2t``): ``{"text"}`` records, the pretrain set repeated; pass k rotates every text by
  7k characters, so the copies are records that tokenize like the original (repeats are left out, as below).
- **sft_t2t** (MiniMind-3's ``sft_t2t_mini.jsonl``): ``{"conversations"}`` records as MiniMind stores them. Each
  record draws its shape from a seeded generator: ``tool_share`` of them are tool records (a system turn whose
  ``"tools"`` is a JSON *string* of flat definitions ``[{"name", "description", "parameters"}]``, a user turn,
  an assistant turn with ``"content": ""`` (or a short preface) and ``"tool_calls"`` as a JSON string of flat calls
  ``[{"name", "arguments": {...}}]``, a ``tool`` turn per call, then a final answer); ``reasoning_share`` are
  answers with ``reasoning_content`` (the reasoning set's ``<think>`` part) and the answer as content; the rest
  are the SFT set's chats (single- and multi-turn, with a system turn where the source has one). The tool
  skeletons (definitions, calls, results, system prompts) come from the MiniMind-3 fixtures
  (``tests/fixtures/minimind/minimind3/sft_t2t*.jsonl``), their user question and final answer from real SFT
  text. Pass k over a source rotates every content by 7k characters; a record that still equals an earlier one
is left out, so no two records of a file are equal.

Only the source sets (tens of MB) are held in memory; each record is written as soon as it is made.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from itertools import count
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "minimind" / "minimind3"
SHAPES = ("pretrain", "sft_t2t")
ROTATE = 7  # characters each pass over a source rotates its texts by
MAX_REPEATS = 100_000  # consecutive repeated records before the sources count as exhausted
THINK = re.compile(r"\A<think>\n(.*?)\n</think>\n<answer>\n(.*)\n</answer>\Z", re.DOTALL)


def rotated(text: str, k: int) -> str:
    """``text`` rotated left by ``k`` characters (modulo its length)."""
    if not text:
        return text
    k %= len(text)
    return text[k:] + text[:k]


def _jsonl(files: list[Path]) -> Iterator[dict]:
    for f in files:
        with f.open(encoding="utf-8") as lines:
            yield from (json.loads(line) for line in lines if line.strip())


def _cycle(rows: list) -> Iterator[tuple[object, int]]:
    """(row, pass number) over ``rows`` forever."""
    if not rows:
        raise ValueError("no source records")
    for k in count():
        for row in rows:
            yield row, k


def _flat_tool(tool: dict) -> dict:
    """A tool definition without OpenAI's ``{"type": "function", "function": ...}`` wrapper."""
    return tool["function"] if isinstance(tool.get("function"), dict) else tool


def _flat_call(call: dict) -> dict:
    """A call as MiniMind writes it: ``{"name", "arguments": {...}}`` (arguments an object)."""
    function = call["function"] if isinstance(call.get("function"), dict) else call
    arguments = function["arguments"]
    return {"name": function["name"], "arguments": json.loads(arguments) if isinstance(arguments, str) else arguments}


def tool_skeletons(files: list[Path] | None = None) -> list[list[dict]]:
    """The tool records of the MiniMind-3 sft fixtures in MiniMind's stored form: ``tools`` and ``tool_calls``
    as JSON strings of flat definitions and calls; the first user turn and the last assistant turn are the
    slots :func:`sft_t2t_records` fills with real text."""
    out = []
    for row in _jsonl(files or sorted(FIXTURES.glob("sft_t2t*.jsonl"))):
        turns = row["conversations"]
        tools = turns[0].get("tools") if turns[0]["role"] == "system" else None
        if not tools:
            continue
        tools = json.loads(tools) if isinstance(tools, str) else tools
        skeleton = [{"role": "system", "content": turns[0].get("content") or "",
                     "tools": json.dumps([_flat_tool(t) for t in tools], ensure_ascii=False)}]
        for turn in turns[1:]:
            kept = {"role": turn["role"], "content": turn.get("content") or ""}
            calls = turn.get("tool_calls")
            if calls:
                calls = json.loads(calls) if isinstance(calls, str) else calls
                kept["tool_calls"] = json.dumps([_flat_call(c) for c in calls], ensure_ascii=False)
            skeleton.append(kept)
        out.append(skeleton)
    return out


def _rotated_turns(turns: list[dict], k: int) -> list[dict]:
    return [{**t, "content": rotated(t["content"], k * ROTATE)} for t in turns]


def _tool_record(skeleton: list[dict], chat: list[dict], k: int) -> list[dict]:
    """``skeleton`` with its user question and final answer taken from ``chat`` (rotated by pass ``k``)."""
    user = next(t["content"] for t in chat if t["role"] == "user")
    answer = chat[-1]["content"]
    turns = [dict(t) for t in skeleton]
    first_user = next(i for i, t in enumerate(turns) if t["role"] == "user")
    turns[first_user]["content"] = rotated(user, k * ROTATE)
    turns[-1]["content"] = rotated(answer, k * ROTATE)
    return turns


def _reasoning_record(chat: list[dict], k: int) -> list[dict]:
    """A reasoning-set chat (``<think>…</think><answer>…</answer>`` content) with its reasoning moved to
    ``reasoning_content``, as MiniMind-3 stores it."""
    user, assistant = chat[0], chat[-1]
    match = THINK.match(assistant["content"])
    reasoning, answer = match.groups() if match else ("", assistant["content"])
    return [{"role": "user", "content": rotated(user["content"], k * ROTATE)},
            {"role": "assistant", "content": rotated(answer, k * ROTATE),
             "reasoning_content": rotated(reasoning, k * ROTATE)}]


def sft_t2t_records(sft_files: list[Path], reasoning_files: list[Path], tool_share: float = 0.08,
                    reasoning_share: float = 0.1, seed: int = 0) -> Iterator[dict]:
    """Endless ``{"conversations"}`` records in MiniMind-3's sft_t2t shape (see the module docstring)."""
    chats = _cycle([row["conversations"] for row in _jsonl(sft_files)])
    reasoning = _cycle([row["conversations"] for row in _jsonl(reasoning_files)])
    skeletons = tool_skeletons()
    if not skeletons:
        raise ValueError(f"no tool records in {FIXTURES}")
    rng = random.Random(seed)
    for n in count():
        chat, k = next(chats)
        draw = rng.random()
        if draw < tool_share:
            turns = _tool_record(skeletons[n % len(skeletons)], chat, k)
        elif draw < tool_share + reasoning_share:
            turns = _reasoning_record(*next(reasoning))
        else:
            turns = _rotated_turns(chat, k)
        yield {"conversations": turns}


def pretrain_records(files: list[Path]) -> Iterator[dict]:
    """Endless ``{"text"}`` records: the set, then again with every text rotated by 7 characters more."""
    for row, k in _cycle([row["text"] for row in _jsonl(files)]):
        yield {"text": rotated(row, k * ROTATE)}


def write_until(records: Iterator[dict], mb: float, dest: Path) -> Path:
    """``records`` as JSON Lines (UTF-8, ``ensure_ascii=False``) in ``dest`` until it holds ``mb`` MB, each line
    written once: a record equal to an earlier one (a short text whose rotations repeat, or a record two source
    files share) is left out, found by a set of 8-byte digests of the lines written."""
    written = repeats = 0
    seen: set[int] = set()
    with dest.open("wb") as out:
        while written < mb * 1e6:
            data = (json.dumps(next(records), ensure_ascii=False) + "\n").encode("utf-8")
            digest = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
            if digest in seen:
                repeats += 1
                if repeats > MAX_REPEATS:
                    raise ValueError(f"{dest}: the sources give no new records (too few or too short)")
                continue
            seen.add(digest)
            repeats = 0
            out.write(data)
            written += len(data)
    return dest


def generate(shape: str, data: Path, mb: float, dest: Path) -> Path:
    """A file of ``mb`` MB in ``shape`` (one of :data:`SHAPES`) from the sets under ``data`` (pretrain/, sft/,
    reasoning/)."""
    if shape == "pretrain":
        records = pretrain_records(sorted((data / "pretrain").glob("*.jsonl")))
    elif shape == "sft_t2t":
        records = sft_t2t_records(sorted((data / "sft").glob("*.jsonl")), sorted((data / "reasoning").glob("*.jsonl")))
    else:
        raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    return write_until(records, mb, dest)


STAGE = {"pretrain": "pretrain", "sft_t2t": "sft"}  # the pack.py / clean.py stage that reads each shape
