"""train.sh recipes: refused in one line when unknown or when MiniMind's files are missing; steps from epochs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _train_sh(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "train.sh")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable, "OUT_DIR": str(tmp_path / "out"), **env})


def test_an_unknown_recipe_is_one_line(tmp_path):
    proc = _train_sh({"RECIPE": "minimind9"}, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("train.sh: unknown RECIPE 'minimind9' "
                                   "(known: minimind3-mini, minimind2-small, calculator)")
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


@pytest.mark.parametrize("recipe, folder", [("minimind3-mini", "minimind3"), ("minimind2-small", "minimind2")])
def test_a_recipe_runs_end_to_end_on_minimind_shaped_files(recipe, folder, tmp_path):
    """MiniMind's own file names and shapes (tests/fixtures/minimind), MiniMind's shipped tokenizer and chat
    template, steps from EPOCHS, and the final model link -- at toy scale (tiny model, 64-token rows)."""
    env = {"RECIPE": recipe, "MINIMIND_DATA": str(ROOT / "tests" / "fixtures" / "minimind" / folder),
           "MODEL": "tiny", "SEQ_LEN": "64", "RECIPE_ROWS_PRETRAIN": "4", "RECIPE_ROWS_SFT": "2", "MICRO_BATCH": "2",
           "EPOCHS": "1", "SKIP_CHAT": "1", "SKIP_REPORT": "1", "OMP_NUM_THREADS": "1"}
    proc = _train_sh(env, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "out" / recipe
    assert (run / "final").resolve() == (run / "sft").resolve()
    sft_meta = json.loads((run / "packed" / "sft" / "meta.json").read_text())
    assert sft_meta["counts"]["skipped"] == {} and sft_meta["counts"]["records_read"] > 0
    family = sft_meta["chat_template"]["family"]
    assert family == ("minimind3" if recipe == "minimind3-mini" else "minimind2")
    rows = {stage: json.loads((run / "packed" / stage / "meta.json").read_text())["counts"]["rows"]
            for stage in ("pretrain", "sft")}
    steps = {stage: max(json.loads(line).get("step", 0) for line in (run / stage / "metrics.jsonl").open())
             for stage in ("pretrain", "sft")}
    assert steps == {"pretrain": -(-rows["pretrain"] // 4), "sft": -(-rows["sft"] // 2)}  # one epoch each
