"""Shared fixtures: the shipped sample and tokenizer, and a helper that runs pack.py as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
TOKENIZER = REPO / "data" / "tokenizer"


def run_pack(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python preprocess/pack.py ARGS --quiet`` in a subprocess; returns the completed process."""
    proc = subprocess.run([sys.executable, str(REPO / "preprocess" / "pack.py"), *args, "--quiet"],
                          capture_output=True, text=True, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"pack.py failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def packed_sample(tmp_path_factory) -> dict[str, Path]:
    """Every stage of the shipped sample packed once (seq-len 256, 30k-token shards so there are several;
    ``--overlong drop``, so every stored document is a whole conversation).

    Keys: pretrain, sft, reason, dpo, plus ``lora`` (the sample's LoRA conversations, packed as sft) and
    ``dpo_shards`` (the DPO sample in 3k-token shards: several shards of pairs)."""
    root = tmp_path_factory.mktemp("packed")
    inputs = {"pretrain": ("pretrain", "pretrain", "30000"), "sft": ("sft", "sft", "30000"),
              "reason": ("reason", "reasoning", "30000"), "dpo": ("dpo", "dpo", "30000"),
              "lora": ("sft", "lora", "30000"), "dpo_shards": ("dpo", "dpo", "3000")}
    out = {}
    for key, (stage, folder, shard_tokens) in inputs.items():
        out[key] = root / key
        run_pack("--stage", stage, "--input", str(SAMPLE / folder / "*.jsonl"), "--out", str(out[key]),
                 "--seq-len", "256", "--shard-tokens", shard_tokens, "--workers", "2", "--overlong", "drop")
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests (tiny models gain nothing from more, and lose on busy cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
