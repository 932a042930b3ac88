"""Shared fixtures: the shipped sample and tokenizer, a helper that runs pack.py as a user would, and the one
door to the development data outside the repository (``needs_shared``, ``optional_shared``).

The development data (``../shared/data``, or ``$TINYLM_SHARED_DATA``) is not part of a clone. A test that
needs it fails with the reason when ``CI=true`` (CI always has it) and is skipped with the reason elsewhere;
skip reasons are printed in the summary (``-rs``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
TOKENIZER = REPO / "data" / "tokenizer"
SHARED_DATA = Path(os.environ.get("TINYLM_SHARED_DATA", REPO.parent / "shared" / "data"))


class SharedDataAbsent(UserWarning):
    """A test ran without its optional development-data part (shown in pytest's warnings summary)."""


def _absent(path: Path) -> str:
    return (f"{path} is absent: this needs the development data (../shared/data beside the repository, "
            "or TINYLM_SHARED_DATA), which a clone does not have")


def needs_shared(*parts: str) -> Path:
    """The path ``SHARED_DATA/parts...``; when it is absent the calling test fails under ``CI=true`` and is
    skipped elsewhere, with the path in the reason either way."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(_absent(path) + "; CI always has it")
        pytest.skip(_absent(path))
    return path


def optional_shared(*parts: str) -> Path | None:
    """For a test that checks the shipped files and, when present, the development data's as well: the path,
    or (absent, not under ``CI=true``) None with a :class:`SharedDataAbsent` warning; fails under CI."""
    path = SHARED_DATA.joinpath(*parts)
    if path.exists():
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(_absent(path) + "; CI always has it")
    warnings.warn(_absent(path) + "; checked without it", SharedDataAbsent, stacklevel=2)
    return None


@pytest.fixture(scope="session")
def shared_data():
    """:func:`needs_shared` as a fixture: ``shared_data("reference_tokenizer")`` is that folder, or the test
    fails (CI) / is skipped (a clone) naming it."""
    return needs_shared


def pytest_configure(config: pytest.Config) -> None:
    """Print every skip's reason in the summary, so a test that could not run on this machine says why."""
    if "s" not in config.option.reportchars and "a" not in config.option.reportchars:
        config.option.reportchars += "s"


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
