"""train.sh: the README's main command runs the whole chain (--smoke) and ends with a chat answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from preprocess import shards
from train import defaults, loading
from train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def bash(*argv: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "train.sh"), *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_smoke_runs_end_to_end(tmp_path):
    out = tmp_path / "smoke"
    # OMP_NUM_THREADS=1: a tiny model gains nothing from 2 threads and loses a lot when a core is busy.
    proc = bash("--smoke", env={"OUT_DIR": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for n, what in enumerate(("tokenizer", "pack", "pretrain", "SFT", "chat"), start=1):
        assert f"[{n}/5] {what}" in text
    answer = next(line for line in text.splitlines() if line.startswith("answer: "))
    assert answer.removeprefix("answer: ").strip(), "empty chat answer"
    assert "done in" in text
    for stage in ("pretrain", "sft"):  # optimizer and LRs from the defaults table (train/defaults.py)
        optimizer = defaults.OPTIMIZER[stage]
        row, muon = defaults.lookup(stage, optimizer, "tiny"), defaults.lookup(stage, "muon", "tiny")
        assert f"--optimizer {optimizer} --lr {row.lr:g} --muon-lr {muon.muon_lr:g} --schedule {defaults.SCHEDULE}" \
            in next(line for line in text.splitlines() if "train/run.py" in line and f"--stage {stage}" in line)
    pre, sft = loading.load(out / "pretrain"), loading.load(out / "sft")
    assert sft.init_from.path == pre.path
    assert pre.tokenizer.fingerprint == sft.tokenizer.fingerprint
    assert any("val_loss" in r for r in read_metrics(out / "sft"))
    # CLEAN=1 (default): clean.py ran first, and the held-out slice was cut from its output
    for stage in ("pretrain", "sft"):
        cleaned = (out / "data" / "clean" / stage / f"{stage}.jsonl").read_text().splitlines()
        report = json.loads((out / "data" / "clean" / f"{stage}.report.json").read_text())
        assert report["counts"]["written"] == len(cleaned) > 0
        assert set((out / "data" / "heldout" / f"{stage}.jsonl").read_text().splitlines()) <= set(cleaned)

    # the re-run also takes three optional stages (2 steps each): DPO from the SFT model, LoRA + merge,
    # and tool-use / thinking SFT on data/sample/tools
    again = bash("--smoke", env={"OUT_DIR": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                                 "SKIP_PACK": "1", "SKIP_CHAT": "1", "DPO": "1", "DPO_STEPS": "2", "LORA": "1",
                                 "LORA_STEPS": "2", "TOOLS": "1", "TOOLS_STEPS": "2"})
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming" in again.stdout and "skipped (SKIP_CHAT=1)" in again.stdout
    dpo, lora = loading.load(out / "dpo"), loading.load(out / "lora")
    assert dpo.stage == "dpo" and dpo.reference.path == sft.path and dpo.step == 2
    assert lora.base.path == sft.path and lora.lora.rank == 8
    assert loading.load(out / "lora" / "merged").merged_from["adapter"] == lora.path
    tools = loading.load(out / "tools")
    assert tools.stage == "sft" and tools.init_from.path == sft.path and tools.step == 2
    assert shards.read_meta(out / "packed" / "tools")["counts"]["records_read"] == 120

    # GRPO=1 after the reason stage: RL with the gsm8k + format rewards, then pass@k before and after
    rl = bash("--smoke", env={"OUT_DIR": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                              "SKIP_PACK": "1", "SKIP_PRETRAIN": "1", "SKIP_SFT": "1", "SKIP_CHAT": "1",
                              "REASON": "1", "REASON_STEPS": "2", "GRPO": "1"})
    assert rl.returncode == 0, rl.stdout[-3000:] + rl.stderr[-3000:]
    grpo = loading.load(out / "grpo")
    assert grpo.stage == "grpo" and grpo.step == 2 and grpo.init_from.path == loading.load(out / "reason").path
    assert grpo.stage_options["reward"] == ["gsm8k", "format@0.5"]
    assert all("reward/gsm8k" in r and "reward/format" in r for r in read_metrics(out / "grpo") if "loss" in r)
    scored = [json.loads(line) for line in (out / "grpo" / "eval_results.jsonl").read_text().splitlines()]
    assert [r["reward_metrics"]["prompts"] for r in scored] == [4, 4] and scored[1]["ckpt"] == grpo.path


def test_clean_0_packs_the_raw_files(tmp_path):
    out = tmp_path / "raw"
    proc = bash("--smoke", env={"OUT_DIR": str(out), "PYTHON": sys.executable, "CLEAN": "0", "SKIP_PRETRAIN": "1",
                                "SKIP_SFT": "1", "SKIP_CHAT": "1", "PACK_ARGS": "--quiet"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "clean.py" not in proc.stdout and not (out / "data" / "clean").exists()
    raw = set((ROOT / "data" / "sample" / "sft" / "oasst1_zh.jsonl").read_text().splitlines())
    assert raw & set((out / "data" / "heldout" / "sft.jsonl").read_text().splitlines())


def test_help_and_bad_argument():
    assert "--smoke" in bash("--help").stdout
    bad = bash("--fast")
    assert bad.returncode == 2 and "unknown argument" in bad.stderr
