"""train.sh: the README's main command runs the whole chain (--smoke) and ends with a chat answer; a re-run
resumes and adds the optional stages (DPO, LoRA, tools), then reason + GRPO. train.sh runs three times for
the module (fixtures), each behaviour is its own test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from preprocess import shards
from train import defaults, loading
from train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def bash(*argv: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "train.sh"), *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


# OMP_NUM_THREADS=1: a tiny model gains nothing from 2 threads and loses a lot when a core is busy.
SMOKE_ENV = {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def run_ok(out: Path, **env: str) -> subprocess.CompletedProcess:
    """``bash train.sh --smoke`` into ``out`` with ``env``; it must succeed (the output's tail otherwise)."""
    proc = bash("--smoke", env={"OUT_DIR": str(out), **SMOKE_ENV, **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, str]:
    """The README's main command, ``--smoke``: (its OUT_DIR, its stdout). Run once for the module."""
    out = tmp_path_factory.mktemp("train_sh") / "smoke"
    return out, run_ok(out).stdout


@pytest.fixture(scope="module")
def rerun(smoke) -> tuple[Path, str, str]:
    """The same OUT_DIR again, with three optional stages (2 steps each): DPO from the SFT model, LoRA + merge,
    and tool-use / thinking SFT on data/sample/tools: (OUT_DIR, its stdout, the first run's SFT checkpoint)."""
    out, _ = smoke
    sft = loading.load(out / "sft").path
    return out, run_ok(out, SKIP_PACK="1", SKIP_CHAT="1", DPO="1", DPO_STEPS="2", LORA="1", LORA_STEPS="2",
                       TOOLS="1", TOOLS_STEPS="2").stdout, sft


@pytest.fixture(scope="module")
def rl(rerun) -> Path:
    """Then GRPO=1 after the reason stage: RL with the gsm8k + format rewards, pass@k before and after."""
    out = rerun[0]
    run_ok(out, SKIP_PACK="1", SKIP_PRETRAIN="1", SKIP_SFT="1", SKIP_CHAT="1", REASON="1", REASON_STEPS="2",
           GRPO="1")
    return out


def test_smoke_runs_every_step_and_ends_with_a_chat_answer(smoke):
    _, text = smoke
    for n, what in enumerate(("tokenizer", "pack", "pretrain", "SFT", "chat"), start=1):
        assert f"[{n}/5] {what}" in text
    answer = next(line for line in text.splitlines() if line.startswith("answer: "))
    assert answer.removeprefix("answer: ").strip(), "empty chat answer"
    assert "done in" in text


def test_optimizer_and_learning_rates_come_from_the_defaults_table(smoke):
    """train/defaults.py's row for the smoke preset, passed to train/run.py for each stage."""
    _, text = smoke
    for stage in ("pretrain", "sft"):
        optimizer = defaults.OPTIMIZER[stage]
        row, muon = defaults.lookup(stage, optimizer, "tiny"), defaults.lookup(stage, "muon", "tiny")
        assert f"--optimizer {optimizer} --lr {row.lr:g} --muon-lr {muon.muon_lr:g} --schedule {defaults.SCHEDULE}" \
            in next(line for line in text.splitlines() if "train/run.py" in line and f"--stage {stage}" in line)


def test_sft_starts_from_the_pretrained_model_with_its_tokenizer(smoke):
    out, _ = smoke
    pre, sft = loading.load(out / "pretrain"), loading.load(out / "sft")
    assert sft.init_from.path == pre.path
    assert pre.tokenizer.fingerprint == sft.tokenizer.fingerprint


def test_sft_logs_a_validation_loss(smoke):
    out, _ = smoke
    assert any("val_loss" in r for r in read_metrics(out / "sft"))


def test_clean_runs_first_and_the_held_out_slice_comes_from_its_output(smoke):
    """CLEAN=1 (default): clean.py writes each stage's records and report; pack leaves out the record on every
    50th line of that output (no copy of the data is made) and bin/eval scores exactly those records."""
    out, _ = smoke
    for stage in ("pretrain", "sft"):
        cleaned = (out / "data" / "clean" / stage / f"{stage}.jsonl").read_text().splitlines()
        report = json.loads((out / "data" / "clean" / f"{stage}.report.json").read_text())
        assert report["counts"]["written"] == len(cleaned) > 0
        meta = shards.read_meta(out / "packed" / stage)
        held = len(cleaned) // 50
        assert meta["options"]["hold_out_every"] == 50 and meta["counts"]["dropped"].get("held_out") == held > 0
        assert [Path(s["path"]).resolve() for s in meta["sources"]] == \
            [(out / "data" / "clean" / stage / f"{stage}.jsonl").resolve()]
        scored = json.loads((out / stage / "eval_results.jsonl").read_text().splitlines()[-1])
        assert scored["records"]["records_read"] == len(cleaned)
        assert scored["records"]["dropped"] == {"not_held_out": len(cleaned) - held}
    assert not (out / "data" / "heldout").exists() and not (out / "data" / "train").exists()


def test_a_rerun_resumes_and_skip_chat_skips_the_answer(rerun):
    _, text, _ = rerun
    assert "resuming" in text and "skipped (SKIP_CHAT=1)" in text


def test_dpo_trains_from_sft_with_it_as_the_reference(rerun):
    out, _, sft = rerun
    dpo = loading.load(out / "dpo")
    assert dpo.stage == "dpo" and dpo.reference.path == sft and dpo.step == 2


def test_lora_trains_adapters_on_sft_and_merges_them(rerun):
    out, _, sft = rerun
    lora = loading.load(out / "lora")
    assert lora.base.path == sft and lora.lora.rank == 8
    assert loading.load(out / "lora" / "merged").merged_from["adapter"] == lora.path


def test_tools_stage_fine_tunes_sft_on_the_whole_tools_sample(rerun):
    out, _, sft = rerun
    tools = loading.load(out / "tools")
    assert tools.stage == "sft" and tools.init_from.path == sft and tools.step == 2
    assert shards.read_meta(out / "packed" / "tools")["counts"]["records_read"] == 120


def test_grpo_trains_from_reason_with_both_rewards_logged(rl):
    grpo = loading.load(rl / "grpo")
    assert grpo.stage == "grpo" and grpo.step == 2 and grpo.init_from.path == loading.load(rl / "reason").path
    assert grpo.stage_options["reward"] == ["gsm8k", "format@0.5"]
    assert all("reward/gsm8k" in r and "reward/format" in r for r in read_metrics(rl / "grpo") if "loss" in r)


def test_grpo_scores_pass_at_k_before_and_after(rl):
    scored = [json.loads(line) for line in (rl / "grpo" / "eval_results.jsonl").read_text().splitlines()]
    assert [r["reward_metrics"]["prompts"] for r in scored] == [4, 4]
    assert scored[1]["ckpt"] == loading.load(rl / "grpo").path


def test_clean_0_packs_the_raw_files(tmp_path):
    out = tmp_path / "raw"
    proc = bash("--smoke", env={"OUT_DIR": str(out), "PYTHON": sys.executable, "CLEAN": "0", "SKIP_PRETRAIN": "1",
                                "SKIP_SFT": "1", "SKIP_CHAT": "1", "PACK_ARGS": "--quiet"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "clean.py" not in proc.stdout and not (out / "data" / "clean").exists()
    meta = shards.read_meta(out / "packed" / "sft")
    raw = sorted((ROOT / "data" / "sample" / "sft").glob("*.jsonl"))
    assert sorted(Path(s["path"]).resolve() for s in meta["sources"]) == [f.resolve() for f in raw]
    assert meta["counts"]["dropped"]["held_out"] == sum(len(f.read_text().splitlines()) // 50 for f in raw)
    assert not (out / "data").exists()  # the held-out slice is left out by line number, never copied


def test_help_and_bad_argument():
    assert "--smoke" in bash("--help").stdout
    bad = bash("--fast")
    assert bad.returncode == 2 and "unknown argument" in bad.stderr
