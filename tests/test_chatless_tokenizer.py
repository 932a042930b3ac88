"""A tokenizer without single-id ``<|im_start|>`` / ``<|im_end|>``: pretraining on it works end to end; every
place that renders a chat (pack's chat stages, prompts, bin/chat, bin/serve) refuses it in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, SAMPLE, TOKENIZER, run_pack

from core.tokenizer import TokenizerError, encode_chat, load_tokenizer

HI = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.fixture(scope="module")
def chatless(tmp_path_factory):
    """The shipped tokenizer with its two ChatML tokens renamed (so they are no longer in it at all)."""
    folder = tmp_path_factory.mktemp("chatless")
    text = (TOKENIZER / "tokenizer.json").read_text(encoding="utf-8")
    text = text.replace('"<|im_start|>"', '"<|x_start|>"').replace('"<|im_end|>"', '"<|x_end|>"')
    (folder / "tokenizer.json").write_text(text, encoding="utf-8")
    return folder


def test_loads_and_refuses_chats_in_one_line(chatless):
    tok = load_tokenizer(chatless)
    assert not tok.has_chat and load_tokenizer(TOKENIZER).has_chat
    with pytest.raises(TokenizerError) as e:
        encode_chat(tok, HI, add_generation_prompt=True)
    message = str(e.value)
    assert "\n" not in message and str(chatless) in message and "<|im_start|>" in message
    assert "pretraining on it works" in message


def test_pretraining_works_and_chat_tools_refuse(chatless, tmp_path):
    packed = tmp_path / "pretrain"
    run_pack("--stage", "pretrain", "--input", str(SAMPLE / "pretrain" / "wiki_en_demo.jsonl"), "--out", str(packed),
             "--tokenizer", str(chatless), "--seq-len", "64", "--workers", "1")
    assert json.loads((packed / "meta.json").read_text())["counts"]["rows"] > 0
    sft = run_pack("--stage", "sft", "--input", str(SAMPLE / "sft" / "oasst1_zh.jsonl"), "--out", str(tmp_path / "sft"),
                   "--tokenizer", str(chatless), check=False)
    assert sft.returncode == 1 and sft.stderr.count("\n") == 1 and "cannot render chats (--stage sft)" in sft.stderr
    assert not (tmp_path / "sft" / "meta.json").exists()
    run = tmp_path / "run"
    train = subprocess.run([sys.executable, str(REPO / "train" / "run.py"), "--stage", "pretrain",
                            "--data", str(packed), "--out", str(run), "--model", "tiny", "--max-steps", "2",
                            "--batch-size", "2", "--eval-every", "0", "--save-every", "2"],
                           capture_output=True, text=True, cwd=REPO)
    assert train.returncode == 0, train.stderr[-2000:]
    chat = subprocess.run([sys.executable, str(REPO / "bin" / "chat"), "--ckpt", str(run), "--prompt", "hi"],
                          capture_output=True, text=True, cwd=REPO)
    assert chat.returncode == 1 and chat.stderr.count("\n") == 1, chat.stderr
    assert "cannot render chats (bin/chat)" in chat.stderr and "Traceback" not in chat.stderr
