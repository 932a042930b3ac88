"""train.sh recipes: refused in one line when unknown or when MiniMind's files are missing; steps from epochs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train_sh(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "train.sh")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, "OUT_DIR": str(tmp_path / "out"), **env})


def test_an_unknown_recipe_is_one_line(tmp_path):
    proc = _train_sh({"RECIPE": "minimind9"}, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "train.sh: unknown RECIPE 'minimind9' (known: minimind3-mini, minimind2-small)"
    assert not (tmp_path / "out").exists()


def test_a_recipe_names_the_missing_download(tmp_path):
    proc = _train_sh({"RECIPE": "minimind3-mini", "MINIMIND_DATA": str(tmp_path / "dataset")}, tmp_path)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert line.count("\n") == 0 and f"{tmp_path / 'dataset' / 'pretrain_t2t_mini.jsonl'}" in line
    assert "MINIMIND_DATA" in line


def test_rows_per_step_must_split_over_the_processes(tmp_path):
    data = tmp_path / "dataset"
    data.mkdir()
    for name in ("pretrain_hq.jsonl", "sft_mini_512.jsonl"):
        (data / name).write_text('{"text": "x"}\n')
    proc = _train_sh({"RECIPE": "minimind2-small", "MINIMIND_DATA": str(data), "NPROC": "3"}, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "train.sh: 256 rows per step do not split over NPROC=3"
