"""preprocess/augment.py and pack's chat options: MiniMind's two augmentations are seeded and deterministic,
off by default, recorded in meta.json with the chat family; --chat-template declares a family."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import SAMPLE, run_pack
from test_chat_families import TEMPLATES, folder_with

from core.tokenizer import load_tokenizer
from preprocess import shards
from preprocess.augment import SYSTEM_PROMPTS, Augment, chat_documents, with_system_prompt

SFT = SAMPLE / "sft" / "kdconv_zh.jsonl"


def test_choices_are_deterministic_for_a_seed_and_follow_the_probabilities() -> None:
    aug = Augment(drop_empty_think=0.8, add_system_prompt=0.2, seed=3)
    first = [aug.choose("/some/where/sft.jsonl", i) for i in range(2000)]
    assert first == [Augment(0.8, 0.2, 3).choose("/else/sft.jsonl", i) for i in range(2000)]
    assert first != [Augment(0.8, 0.2, 4).choose("/some/where/sft.jsonl", i) for i in range(2000)]
    assert first != [aug.choose("/some/where/other.jsonl", i) for i in range(2000)]
    dropped = sum(c.drop_empty_think for c in first) / len(first)
    added = [c.system_prompt for c in first if c.system_prompt is not None]
    assert 0.76 < dropped < 0.84 and 0.17 < len(added) / len(first) < 0.23
    assert set(added) == set(SYSTEM_PROMPTS)
    assert all(Augment().choose("sft.jsonl", i) == Augment(0.0, 0.0, 3).choose("sft.jsonl", i) for i in range(100))
    assert Augment().choose("sft.jsonl", 0).system_prompt is None and not Augment().choose("x", 0).drop_empty_think


def test_system_prompt_only_where_there_is_none_and_no_tools() -> None:
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert with_system_prompt(turns, "S") == [{"role": "system", "content": "S"}, *turns]
    system = [{"role": "system", "content": "mine"}, *turns]
    assert with_system_prompt(system, "S") is system
    tools = [{"role": "system", "content": "", "tools": [{"type": "function"}]}, *turns]
    assert with_system_prompt(tools, "S") is tools
    assert with_system_prompt(turns, None) is turns


def test_documents_drop_empty_think_blocks(tmp_path: Path) -> None:
    tok = load_tokenizer(folder_with(tmp_path / "mm3", TEMPLATES["minimind3"]))
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    kept, = chat_documents(tok, turns, "sft", Augment().choose("x", 0))
    dropped, = chat_documents(tok, turns, "sft", Augment(drop_empty_think=1.0).choose("x", 0))
    assert "".join(p.text for p in kept).endswith("assistant\n<think>\n\n</think>\n\na<|im_end|>\n")
    assert "".join(p.text for p in dropped).endswith("assistant\na<|im_end|>\n")


def shard_bytes(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.glob("shard_*"))]


def test_pack_records_family_and_augmentations_and_is_deterministic(tmp_path: Path) -> None:
    tok = folder_with(tmp_path / "mm3", TEMPLATES["minimind3"])
    common = ["--stage", "sft", "--input", str(SFT), "--tokenizer", str(tok), "--seq-len", "256"]
    aug = ["--drop-empty-think", "0.8", "--add-system-prompt", "0.2", "--augment-seed", "7"]
    run_pack(*common, *aug, "--out", str(tmp_path / "a"), "--workers", "1")
    run_pack(*common, *aug, "--out", str(tmp_path / "b"), "--workers", "2")
    run_pack(*common, "--out", str(tmp_path / "plain"), "--workers", "1")
    run_pack(*common, *aug[:-1], "8", "--out", str(tmp_path / "c"), "--workers", "1")
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert shard_bytes(tmp_path / "a") != shard_bytes(tmp_path / "c") != shard_bytes(tmp_path / "plain")
    meta = shards.read_meta(tmp_path / "a")
    digest = load_tokenizer(tok).chat.template_sha256
    assert meta["chat_template"] == {"family": "minimind3", "template_sha256": digest, "declared": False,
                                     "augment": {"drop_empty_think": 0.8, "add_system_prompt": 0.2, "seed": 7}}
    assert shards.read_meta(tmp_path / "plain")["chat_template"]["augment"] == {
        "drop_empty_think": 0.0, "add_system_prompt": 0.0, "seed": 0}


def test_pack_refuses_an_unknown_template_unless_declared(tmp_path: Path) -> None:
    odd = folder_with(tmp_path / "odd", TEMPLATES["qwen3"].replace("You may call", "You can call"))
    common = ["--stage", "sft", "--input", str(SFT), "--tokenizer", str(odd), "--seq-len", "256"]
    refused = run_pack(*common, "--out", str(tmp_path / "r"), check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "--chat-template tinylm" in refused.stderr and str(odd / "tokenizer_config.json") in refused.stderr
    assert not (tmp_path / "r" / "meta.json").exists()
    run_pack(*common, "--out", str(tmp_path / "t"), "--chat-template", "tinylm")
    record = shards.read_meta(tmp_path / "t")["chat_template"]
    assert record["family"] == "tinylm" and record["declared"] is True
    pretrain = run_pack("--stage", "pretrain", "--input", str(SAMPLE / "pretrain" / "*.jsonl"), "--tokenizer",
                        str(odd), "--out", str(tmp_path / "p"), check=False)
    assert pretrain.returncode == 0, pretrain.stderr
    assert shards.read_meta(tmp_path / "p")["chat_template"] is None
    bad = run_pack(*common, "--out", str(tmp_path / "x"), "--drop-empty-think", "nan", check=False)
    assert bad.returncode == 2 and "--drop-empty-think" in bad.stderr
    assert json.loads(json.dumps(record)) == record
