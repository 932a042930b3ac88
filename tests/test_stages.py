"""train/stages: DPO (ln 2 at the start, margin rises, stored == online reference, pairs stay together,
stale / missing references refused), LoRA (merged == adapted, frozen base bit-identical, small
checkpoints, exact resume), distillation (KL 0 against itself, foreign tokenizer refused), reasoning
(tag weights reach the loss) and the stage-flag checks. Tiny models on the shipped sample."""

from __future__ import annotations

import dataclasses
import errno
import importlib.machinery
import importlib.util
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import ModelConfig, TinyLM
from model.lora import LoRAConfig, LoRALinear, apply_lora, lora_parameters, merge_lora
from model.transformer import HeadInput
from preprocess import shards
from train import defaults, loading, weights
from train import run as run_mod
from train.metrics import read_metrics
from train.options import OptionError
from train.run import main
from train.stages import (
    STAGES,
    DistillStage,
    DPOStage,
    ReasonStage,
    StageContext,
    StepNorm,
    Supervised,
    token_cross_entropy,
)
from train.stages.dpo import DPODataset, document_logps, valid_pairs
from train.stages.grpo import GRPOOptions
from train.weights import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is faster, immune to busy cores


def args(stage: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--stage", stage, "--data", str(data), "--out", str(out), "--batch-size", "4", "--grad-accum", "1",
            "--optimizer", "adamw", "--lr", "3e-3", "--log-every", "1", "--eval-every", "0", "--val-rows", "4",
            "--no-progress", *extra]


def train_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "loss" in r]


@pytest.fixture(scope="module")
def base(packed_sample, tmp_path_factory) -> Path:
    """A tiny model after 12 SFT steps: the --init-from / reference / teacher / LoRA base of these tests."""
    out = tmp_path_factory.mktemp("runs") / "base"
    assert main(args("sft", packed_sample["sft"], out, "--model", "tiny", "--max-steps", "12",
                     "--batch-size", "8")) == 0
    return out


@pytest.fixture
def dpo_data(packed_sample, tmp_path) -> Path:
    """A private copy of the packed DPO sample (reference log-probs are written beside its shards)."""
    return Path(shutil.copytree(packed_sample["dpo"], tmp_path / "dpo"))


# ---- DPO --------------------------------------------------------------------------------------------------

def test_dpo_starts_at_ln2_and_raises_the_margin(dpo_data, base, tmp_path):
    """Full-batch steps (the 16 training rows of the sample in every step): the first loss is ln 2 (policy ==
    reference), then the margin and accuracy on those pairs rise; validation metrics are logged."""
    out = tmp_path / "run"  # not the data folder: an output never replaces an input
    assert main(args("dpo", dpo_data, out, "--init-from", str(base), "--max-steps", "3", "--batch-size", "8",
                     "--grad-accum", "2", "--val-rows", "30", "--lr", "2e-3", "--eval-every", "3",
                     "--beta", "0.5")) == 0
    records = train_records(out)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(records[0]["margin"]) < 1e-4
    assert records[-1]["margin"] > 0.2 and records[-1]["acc"] > 0.7, records[-1]
    assert records[-1]["loss"] < math.log(2) - 0.05
    val = [r for r in read_metrics(out) if "val_loss" in r]
    assert len(val) == 1 and {"val_margin", "val_acc", "val_pairs"} <= set(val[0]) and val[0]["val_pairs"] > 0
    ckpt = loading.load(out)
    ref = ckpt.reference
    assert ref.path == str(loading.resolve(base)) and ckpt.stage_options["beta"] == 0.5
    ref_dir = shards.ref_folder(dpo_data, ref.fingerprint)
    meta = json.loads((ref_dir / "meta.json").read_text())
    assert meta["reference"]["path"] == ref.path and (ref_dir / "shard_00000.ref").is_file()


def _setup(stage: DPOStage, folder: Path, base: Path) -> DPODataset:
    dataset = stage.open_dataset(str(folder))
    init = loading.load(base)
    stage.setup(StageContext(dataset, torch.device("cpu"), batch_size=5, init=init, say=lambda *a, **k: None))
    return dataset


def test_dpo_stored_reference_equals_online(packed_sample, base, tmp_path):
    """Several shards; a policy that differs from the reference; the same rows: equal losses and metrics."""
    folder = Path(shutil.copytree(packed_sample["dpo_shards"], tmp_path / "dpo"))
    assert len(shards.read_meta(folder)["shards"]) >= 3
    stored, online = DPOStage(beta=0.1), DPOStage(beta=0.1, online_ref=True)
    data_stored, data_online = _setup(stored, folder, base), _setup(online, folder, base)
    assert online.ref_model is not None and stored.ref_model is None and data_online.ref is None
    assert len(data_stored.ref) == len(data_stored.shards)
    policy = TinyLM(loading.load(base).model_config)
    weights.load_model_state(policy, loading.load(base).model, "base")
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    rows = np.arange(data_stored.n_rows)[::3]  # rows from every shard
    a, b = data_stored.collate(rows), data_online.collate(rows)
    assert a.ref_doc_logps is not None and b.ref_doc_logps is None
    norm = StepNorm(stored.count(a).float(), 1)
    loss_a, parts_a = stored.loss(policy, a, norm)
    loss_b, parts_b = online.loss(policy, b, norm)
    assert abs(loss_a.item() - math.log(2)) > 1e-3  # a real difference from the reference
    assert loss_a.item() == pytest.approx(loss_b.item(), abs=1e-5)
    assert parts_a["margin"].item() == pytest.approx(parts_b["margin"].item(), abs=1e-5)
    assert parts_a["acc"].item() == parts_b["acc"].item()


def test_dpo_pairs_stay_in_one_row(packed_sample):
    """Every row holds whole pairs (an even number of documents, chosen first) with both sides supervised, so
    a micro-batch always has both halves of each of its pairs."""
    data = DPODataset(packed_sample["dpo_shards"])
    batch = data.collate(np.arange(data.n_rows))
    docs = batch.doc_ids.max(dim=1).values + 1
    assert (docs % 2 == 0).all() and data.width % 2 == 0
    pairs = valid_pairs(batch, data.width).sum().item()
    assert pairs == docs.sum().item() // 2 == data.meta["counts"]["documents"] // 2
    index = (batch.weights.reshape(-1) > 0).nonzero().squeeze(1)  # uniform model (zero head): log-prob =
    uniform = HeadInput(torch.zeros(len(index), 8), torch.zeros(6400, 8), torch.zeros(()))  # -(supervised) ln V
    per_doc = document_logps(Supervised(index, uniform, tuple(batch.weights.shape)), batch, data.width)
    counts = torch.zeros_like(per_doc).scatter_add_(1, batch.doc_ids.long().clamp(min=0), (batch.weights > 0).float())
    assert torch.allclose(per_doc, -counts * math.log(6400), rtol=1e-5)


def test_dpo_bad_inputs_are_one_line_errors(packed_sample, dpo_data, base, tmp_path, capsys):
    def fails(argv: list[str], *needles: str) -> None:
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("train/run.py: error: "), err
        for needle in needles:
            assert needle in err, (needle, err)

    fails(args("dpo", packed_sample["sft"], tmp_path / "a", "--init-from", str(base)), "packed for stage 'sft'",
          str(packed_sample["sft"]))
    fails(args("dpo", dpo_data, tmp_path / "b", "--model", "tiny"), "needs a reference model", "--init-from")
    # make the reference files, then corrupt them in turn
    assert main(args("dpo", dpo_data, tmp_path / "c", "--init-from", str(base), "--max-steps", "1")) == 0
    ref_dir = next(dpo_data.glob("ref_*"))
    meta_path = ref_dir / "meta.json"
    good = meta_path.read_text()
    meta = json.loads(good)
    meta["dataset"]["plan_fingerprint"] = "0" * 64  # the dataset was re-packed since
    meta_path.write_text(json.dumps(meta))
    fails(args("dpo", dpo_data, tmp_path / "d", "--init-from", str(base), "--max-steps", "1"),
          str(meta_path), "stale reference log-probs")
    meta = json.loads(good)
    meta["reference"]["fingerprint"] = "f" * 64
    meta_path.write_text(json.dumps(meta))
    fails(args("dpo", dpo_data, tmp_path / "e", "--init-from", str(base), "--max-steps", "1"),
          str(meta_path), "not the reference")
    meta_path.write_text(good)
    ref_file = ref_dir / "shard_00000.ref"
    ref_file.write_bytes(ref_file.read_bytes()[:-4])
    fails(args("dpo", dpo_data, tmp_path / "f", "--init-from", str(base), "--max-steps", "1"), str(ref_file))
    meta_path.unlink()  # an unfinished folder is recomputed
    assert main(args("dpo", dpo_data, tmp_path / "g", "--init-from", str(base), "--max-steps", "1")) == 0
    assert (ref_dir / "meta.json").is_file()


def test_junk_reference_or_teacher_and_a_read_only_dataset_are_one_line(packed_sample, dpo_data, base, tmp_path,
                                                                         capsys, monkeypatch):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint" * 64)
    for argv in (args("dpo", dpo_data, tmp_path / "a", "--init-from", str(base), "--ref-from", str(junk)),
                 args("distill", packed_sample["sft"], tmp_path / "b", "--teacher", str(junk), "--model", "tiny")):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err == f"train/run.py: error: {junk}: not a tinylm checkpoint: not a torch checkpoint file " \
                      "(checkpoints are only read as tensors and plain values)"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    def read_only(src, dst):  # noqa: ANN001, ANN202
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", read_only)  # the dataset folder cannot take the reference log-probs
    assert main(args("dpo", dpo_data, tmp_path / "c", "--init-from", str(base), "--max-steps", "1")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shard_00000.ref: cannot write (read-only file system)" in err
    assert err.endswith("make it writable or pass --online-ref")
    assert not list(dpo_data.glob("ref_*/*.tmp.*"))


def test_stage_flags_are_checked(capsys):
    def usage(*argv: str) -> str:
        with pytest.raises(SystemExit) as exc:
            run_mod.parse_args(["--data", "x", "--out", "y", *argv])
        assert exc.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert "--beta applies to --stage dpo only, not --stage sft" in usage("--stage", "sft", "--beta", "0.2")
    assert "--teacher applies to --stage distill only" in usage("--stage", "dpo", "--teacher", "t")
    assert "--online-ref applies to --stage dpo only" in usage("--stage", "reason", "--online-ref")
    assert "--lora-alpha needs --lora-rank" in usage("--stage", "sft", "--lora-alpha", "8")
    assert "--merge needs --lora-rank" in usage("--stage", "dpo", "--merge")
    assert "LoRA targets foo unknown" in usage("--stage", "sft", "--lora-rank", "2", "--lora-targets", "q_proj,foo")
    ok = run_mod.parse_args(["--data", "x", "--out", "y", "--stage", "reason", "--lora-rank", "2", "--lora-targets",
                             "q_proj,v_proj"])
    assert ok.model.lora == LoRAConfig(2, 2.0, ("q_proj", "v_proj"))


@pytest.mark.parametrize("argv, flag", [
    (("--stage", "grpo", "--prompts", "p", "--rollout-temperature", "inf"), "--rollout-temperature"),
    (("--stage", "grpo", "--prompts", "p", "--success-threshold", "nan"), "--success-threshold"),
    (("--stage", "grpo", "--prompts", "p", "--group-size", "1"), "--group-size"),
    (("--stage", "sft", "--data", "x", "--seed", "-1"), "--seed"),
    (("--stage", "sft", "--data", "x", "--max-steps", "9" * 5000), "--max-steps"),
    (("--stage", "sft", "--data", "x", "--lr", "nan"), "--lr"),
    (("--stage", "sft", "--data", "x", "--warmup-steps", "-3"), "--warmup-steps"),
    (("--stage", "dpo", "--data", "x", "--beta", "inf"), "--beta"),
    (("--stage", "distill", "--data", "x", "--alpha", "1.5"), "--alpha"),
    (("--stage", "sft", "--data", "x", "--dtype", "fp8"), "--dtype"),
])
def test_bad_numbers_and_dtypes_are_one_line_naming_the_flag(capsys, argv, flag):
    with pytest.raises(SystemExit) as exc:
        run_mod.parse_args(["--out", "y", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"train/run.py: error: argument {flag}: must be ") and len(err[-1]) < 200, err[-1]


def test_dtype_flags_take_one_vocabulary_and_the_old_spellings():
    def dtypes(*argv: str) -> tuple[str, str]:
        cfg = run_mod.parse_args(["--stage", "grpo", "--prompts", "p", "--out", "y", *argv])
        return cfg.hardware.dtype, cfg.stage.rollout_dtype

    assert dtypes() == ("auto", "float32")
    assert dtypes("--dtype", "bf16", "--rollout-dtype", "bf16") == ("bfloat16", "bfloat16")
    assert dtypes("--dtype", "float16", "--rollout-dtype", "float32") == ("float16", "float32")
    assert dtypes("--dtype", "fp32") == ("float32", "float32")


def test_stage_options_are_checked_however_they_are_built():
    """The ranges argparse applies are applied again to options built in code (one line naming the flag)."""
    with pytest.raises(OptionError, match=r"^--beta must be a finite number > 0, got 0\.0$"):
        DPOStage(beta=0.0)
    with pytest.raises(OptionError, match=r"^--alpha must be a finite number >= 0 and <= 1, got 2\.0$"):
        DistillStage(alpha=2.0)
    with pytest.raises(OptionError, match=r"^--group-size must be an integer >= 2, got 1$"):
        GRPOOptions(group_size=1)
    with pytest.raises(OptionError, match=r"--pass-k must be in \[1, --group-size 4\], got 5"):
        GRPOOptions(group_size=4, pass_k=5)


def test_help_shows_the_defaults_the_run_uses(capsys):
    """--help is generated from the option fields: the default it prints is the value a run gets."""
    with pytest.raises(SystemExit):
        run_mod.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    grpo = run_mod.parse_args(["--stage", "grpo", "--prompts", "p", "--out", "y"])
    dpo = run_mod.parse_args(["--stage", "dpo", "--data", "x", "--out", "y"])
    assert f"samples per prompt (default {grpo.stage.group_size})" in text
    assert f"completion length limit (default {grpo.stage.max_new_tokens})" in text
    assert f"(pi_r - ref_r))) (default {dpo.stage.beta})" in text
    assert f"optimizer steps (default {dpo.optim.max_steps})" in text
    assert f"seed (default {dpo.run.seed})" in text
    assert grpo.stage.rollout_config(0).group_size == grpo.stage.group_size == 8


def test_lr_defaults_come_from_the_table_and_help_shows_it(capsys, monkeypatch):
    """One definition (``train/defaults.py``): --help prints the table and the loop uses it; --lr wins."""
    def shown() -> str:
        with pytest.raises(SystemExit):
            run_mod.parse_args(["--help"])
        return capsys.readouterr().out

    assert defaults.table_text() in shown()
    assert set(STAGES) <= {stage for stage, _, _ in defaults.TABLE} and set(defaults.OPTIMIZER) == set(STAGES)
    row = defaults.TABLE[("dpo", "adamw", "*")]
    monkeypatch.setitem(defaults.TABLE, ("dpo", "adamw", "*"), dataclasses.replace(row, lr=3e-6))
    assert re.search(r"^dpo +adamw +\* +3e-06 ", shown(), re.M)  # the row, whatever the column widths
    dpo = run_mod.parse_args(["--data", "x", "--out", "y", "--stage", "dpo"])
    assert run_mod.loop_config(dpo, DPOStage(), torch.device("cpu")).optim.lr == 3e-6
    dpo = dataclasses.replace(dpo, optim=dataclasses.replace(dpo.optim, lr=0.25))
    assert run_mod.loop_config(dpo, DPOStage(), torch.device("cpu")).optim.lr == 0.25


# ---- LoRA ---------------------------------------------------------------------------------------------------

def test_merged_model_equals_adapted_model():
    torch.manual_seed(0)
    model = TinyLM(ModelConfig.from_preset("tiny"))
    ids = torch.randint(0, 6400, (2, 24))
    before = model(ids).logits
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    adapted_layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(adapted_layers) == 7 * 2
    assert torch.equal(model(ids).logits, before)  # B = 0: exactly the base function
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        for _, p in lora_parameters(model):
            p.normal_(0, 0.05)
    adapted = model(ids).logits
    assert (adapted - before).abs().max() > 1e-3
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(TinyLM(ModelConfig.from_preset("tiny")).state_dict())
    assert torch.allclose(merged(ids).logits, adapted, atol=1e-5)


def merge_cli():
    """The ``bin/merge`` script as a module (same interpreter: no second torch import)."""
    sys.path.insert(0, str(ROOT / "bin"))
    try:
        loader = importlib.machinery.SourceFileLoader("bin_merge", str(ROOT / "bin" / "merge"))
        spec = importlib.util.spec_from_loader("bin_merge", loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bin"))
    return module


def test_lora_run_freezes_base_saves_small_adapter_merges_and_resumes(packed_sample, base, tmp_path, monkeypatch,
                                                                     capsys):
    trained = {}
    real_train = run_mod.train

    def spy(model, stage, *a, **k):
        trained["model"] = model
        return real_train(model, stage, *a, **k)

    monkeypatch.setattr(run_mod, "train", spy)
    lora = ("--init-from", str(base), "--lora-rank", "4", "--lora-alpha", "8", "--max-steps", "6", "--lr", "1e-2")
    out = tmp_path / "lora"
    assert main(args("sft", packed_sample["lora"], out, *lora, "--merge")) == 0
    base_ckpt = loading.load(base)
    state = trained["model"].state_dict()
    for key, value in base_ckpt.model.items():  # frozen: bit-identical after training
        assert torch.equal(state[key], value), key
    ckpt = loading.load(out)
    assert set(ckpt.model) == {n for n, _ in lora_parameters(trained["model"])}
    assert len(ckpt.training.optimizer["state"]) == len(ckpt.model)  # only adapters in the optimizer
    assert ckpt.base.path == base_ckpt.path and ckpt.lora.to_dict() == {"rank": 4, "alpha": 8.0,
                                                                        "targets": list(LoRAConfig(4, 8).targets)}
    with pytest.raises(CheckpointError, match="holds only a LoRA adapter.*bin/merge"):
        weights.load_model_state(TinyLM(ckpt.model_config), ckpt.model, ckpt.path)
    size, base_size = Path(ckpt.path).stat().st_size, Path(base_ckpt.path).stat().st_size
    assert size < base_size / 10, (size, base_size)
    # merged (written by --merge) == base + adapter, and it is a plain checkpoint
    merged = loading.load(out / "merged")
    assert merged.merged_from["adapter"] == ckpt.path and (out / "merged" / "tokenizer").is_dir()
    dense = TinyLM(merged.model_config)
    weights.load_model_state(dense, merged.model, merged.path)
    adapted = loading.adapted_model(ckpt)
    ids = torch.randint(0, 6400, (2, 32))
    with torch.no_grad():
        a, b, c = adapted(ids).logits, dense(ids).logits, trained["model"].cpu()(ids).logits
    assert torch.allclose(a, b, atol=1e-5) and torch.equal(a, c)
    with torch.no_grad():
        plain = TinyLM(base_ckpt.model_config)
        weights.load_model_state(plain, base_ckpt.model, "base")
        assert (plain(ids).logits - b).abs().max() > 1e-4  # the adapter did change the function
    # bin/merge writes the same weights, and refuses a checkpoint without an adapter in one line
    cli = merge_cli()
    assert cli.main(["--ckpt", str(out), "--out", str(tmp_path / "m2")]) == 0
    again = loading.load(tmp_path / "m2").model
    assert all(torch.equal(again[k], merged.model[k]) for k in merged.model)
    capsys.readouterr()
    assert cli.main(["--ckpt", str(base), "--out", str(tmp_path / "m3")]) == 1
    err = capsys.readouterr().err
    assert "not a LoRA checkpoint" in err and len(err.splitlines()) == 1
    # resume: stop after 3 steps, resume to 6: the same losses as the uninterrupted run
    half = tmp_path / "half"
    assert main(args("sft", packed_sample["lora"], half, *lora, "--stop-after", "3")) == 0
    assert main(args("sft", packed_sample["lora"], half, *lora[2:], "--resume")) == 0
    assert [r["loss"] for r in train_records(half)] == [r["loss"] for r in train_records(out)]
    assert main(args("sft", packed_sample["lora"], half, "--resume", "--max-steps", "7")) == 1  # not without LoRA


def test_lora_is_the_same_for_any_stage(dpo_data, base, tmp_path):
    """LoRA on DPO (the stage knows nothing of it): only adapters are saved, the reference is the dense base."""
    out = tmp_path / "dpo-lora"
    assert main(args("dpo", dpo_data, out, "--init-from", str(base), "--lora-rank", "2", "--max-steps", "2")) == 0
    ckpt, base_ckpt = loading.load(out), loading.load(base)
    assert ckpt.lora == LoRAConfig(2, 2.0) and ckpt.base == base_ckpt.source_record()
    assert ckpt.reference == base_ckpt.source_record()
    assert set(ckpt.model) == {n for n, _ in lora_parameters(loading.adapted_model(ckpt))}
    assert all(k.endswith((".lora_A", ".lora_B")) for k in ckpt.model)
    assert train_records(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # adapter B = 0: policy == ref


# ---- distillation ------------------------------------------------------------------------------------------------

def test_distill_kl_is_zero_against_itself(packed_sample, base):
    stage = DistillStage(teacher=base, alpha=0.3, temperature=2.0)
    dataset = stage.open_dataset(str(packed_sample["sft"]))
    stage.setup(StageContext(dataset, torch.device("cpu"), say=lambda *a, **k: None))
    ckpt = loading.load(base)
    student = TinyLM(ckpt.model_config)
    weights.load_model_state(student, ckpt.model, "base")
    batch = dataset.collate(np.arange(8))
    norm = StepNorm(stage.count(batch).float(), 1)
    loss, parts = stage.loss(student, batch, norm)
    assert parts["kl"].item() == 0.0 and parts["ce"].item() > 1.0
    assert loss.item() == pytest.approx(0.3 * parts["ce"].item(), rel=1e-6)
    torch.manual_seed(0)
    other = TinyLM(ckpt.model_config)
    loss2, parts2 = stage.loss(other, batch, norm)
    assert parts2["kl"].item() > 0.01
    assert loss2.item() == pytest.approx(0.3 * parts2["ce"].item() + 0.7 * 4.0 * parts2["kl"].item(), rel=1e-5)


def test_distill_trains_a_smaller_student_and_refuses_a_foreign_teacher(packed_sample, base, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(args("distill", packed_sample["sft"], out, "--teacher", str(base), "--model", "tiny", "--model-arg",
                     "num_hidden_layers=1", "--max-steps", "6", "--alpha", "0.2", "--eval-every", "6")) == 0
    records = train_records(out)
    assert records[-1]["kl"] < records[0]["kl"] and all(math.isfinite(r["loss"]) for r in records)
    assert "val_kl" in read_metrics(out)[-1]
    ckpt = loading.load(out)
    assert ckpt.teacher.path == str(loading.resolve(base)) and ckpt.model_config.num_hidden_layers == 1
    payload = torch.load(loading.resolve(base), weights_only=True)
    payload["tokenizer"] = {**payload["tokenizer"], "fingerprint": "e" * 64, "path": "/other/tokenizer.json"}
    foreign = tmp_path / "foreign.pt"
    torch.save(payload, foreign)
    assert main(args("distill", packed_sample["sft"], tmp_path / "x", "--teacher", str(foreign), "--model",
                     "tiny")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "uses another tokenizer" in err and str(foreign) in err
    assert main(args("distill", packed_sample["sft"], tmp_path / "y", "--model", "tiny")) == 1
    assert "needs --teacher" in capsys.readouterr().err
    assert main(args("distill", packed_sample["dpo"], tmp_path / "z", "--teacher", str(base))) == 1
    assert "packed for stage 'dpo'" in capsys.readouterr().err


def test_reason_tag_weights_reach_the_loss(packed_sample):
    stage = ReasonStage()
    dataset = stage.open_dataset(str(packed_sample["reason"]))
    batch = dataset.collate(np.arange(8))
    tags = [dataset.meta["tokenizer"]["special_ids"][t] for t in ("<think>", "</think>", "<answer>", "</answer>")]
    at_tags = torch.isin(batch.targets, torch.tensor(tags)) & (batch.weights > 0)
    assert at_tags.any() and (batch.weights[at_tags] == 10).all()
    assert set(batch.weights[(batch.weights > 0) & ~at_tags].unique().tolist()) == {1.0}
    torch.manual_seed(0)
    model = TinyLM(ModelConfig.from_preset("tiny"))
    n = stage.count(batch).float()
    loss, _ = stage.loss(model, batch, StepNorm(n, 1))
    logits = model(batch.input_ids, position_ids=batch.position_ids, doc_ids=batch.doc_ids).logits
    ce = token_cross_entropy(logits, batch.targets)
    weighted = (ce * batch.weights).sum() / n
    unweighted = (ce * (batch.weights > 0)).sum() / n
    assert loss.item() == pytest.approx(weighted.item(), rel=1e-6)
    assert abs(weighted.item() - unweighted.item()) > 0.1


def test_reason_stage_trains(packed_sample, base, tmp_path):
    out = tmp_path / "reason"
    assert main(args("reason", packed_sample["reason"], out, "--init-from", str(base), "--max-steps", "3",
                     "--eval-every", "3")) == 0
    records = read_metrics(out)
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert any("val_loss" in r for r in records) and loading.load(out).stage == "reason"
