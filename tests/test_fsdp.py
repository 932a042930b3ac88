"""--fsdp (train/sharding.py): 2 sharded processes equal 1 process over 20 AdamW steps for pretrain, SFT and
DPO, and DDP for pretrain; the gathered checkpoint is the ordinary one (same keys, same optimizer layout, read
by the one loader); a stopped sharded run resumes bit-exact; bad combinations are one line naming the flag.

The torchrun launches are started together (each waits mostly on start-up), so the file stays short."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_train import ONE_THREAD, PY, ROOT, SAMPLE, TOKENIZER, losses  # its runs' helpers

from train import checkpoint, config, loading
from train.metrics import read_metrics
from train.run import main
from train.stages import STAGES

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 20
TOL = 1e-5


def pack(stage: str, out: Path, seq_len: int) -> Path:
    subprocess.run([PY, str(ROOT / "preprocess" / "pack.py"), "--stage", stage, "--input",
                    str(SAMPLE / stage / "*.jsonl"), "--out", str(out), "--tokenizer", str(TOKENIZER),
                    "--seq-len", str(seq_len), "--overlong", "drop", "--quiet"], check=True, capture_output=True)
    return out


def args(stage: str, data: Path, out: Path, *extra: str) -> list[str]:
    """A tiny CPU run of STEPS AdamW steps, 8 rows per step: 2 rows x 4 micro-batches on one process (the
    caller halves --grad-accum for 2 processes), a log line every step, a checkpoint every 10."""
    return ["--stage", stage, "--data", str(data), "--out", str(out), "--batch-size", "2", "--grad-accum", "4",
            "--optimizer", "adamw", "--lr", "3e-3", "--max-steps", str(STEPS), "--log-every", "1",
            "--eval-every", "10", "--val-rows", "8", "--save-every", "10", "--keep-last", "0", "--no-progress",
            *extra]


def two_processes(argv: list[str]) -> list[str]:
    """The same global batch on 2 processes: half the accumulation each."""
    argv = list(argv)
    argv[argv.index("--grad-accum") + 1] = "2"
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train" / "run.py"),
            *argv]


def run_together(commands: dict[str, list[str]]) -> None:
    """Start every command, wait for all; each must succeed."""
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True) for name, cmd in commands.items()}
    failed = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failed[name] = err[-3000:]
    assert not failed, failed


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Pretrain, SFT and DPO as 1 process and as 2 FSDP processes (SFT and DPO start from the 1-process pretrain
    run), pretrain as 2 DDP processes, and an FSDP pretrain run that stops after step 10 and is resumed (the
    launches are few: each costs two interpreters' start-up)."""
    root = tmp_path_factory.mktemp("fsdp")
    data = {"pretrain": pack("pretrain", root / "data_pretrain", 64), "sft": pack("sft", root / "data_sft", 128),
            "dpo": pack("dpo", root / "data_dpo", 128)}
    out = {f"single_{stage}": root / f"single_{stage}" for stage in data} | {"data_pretrain": data["pretrain"]}
    extra = {"pretrain": ("--model", "tiny"),
             "sft": ("--init-from", str(out["single_pretrain"])), "dpo": ("--init-from", str(out["single_pretrain"]))}

    def argv(stage: str, name: str, *more: str) -> list[str]:
        return args(stage, data[stage], root / name, *extra[stage], *more)

    for stage in data:
        assert main(argv(stage, f"single_{stage}")) == 0
    commands = {}
    for name, stage, flags in (("ddp_pretrain", "pretrain", ()), ("fsdp_pretrain", "pretrain", ("--fsdp",)),
                               ("fsdp_sft", "sft", ("--fsdp",)), ("fsdp_dpo", "dpo", ("--fsdp",)),
                               ("resumed", "pretrain", ("--fsdp", "--stop-after", "10"))):
        out[name] = root / name
        commands[name] = two_processes(argv(stage, name, *flags))
    run_together(commands)
    assert checkpoint.latest(out["resumed"]).name == checkpoint.checkpoint_name(10)
    run_together({"resume": two_processes(argv("pretrain", "resumed", "--fsdp", "--resume"))})
    return out


def val_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(run) if "val_loss" in r}


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
def test_fsdp_matches_one_process(runs, stage):
    one, fsdp = losses(runs[f"single_{stage}"]), losses(runs[f"fsdp_{stage}"])
    assert sorted(one) == sorted(fsdp) == list(range(1, STEPS + 1))
    for step in one:
        assert abs(fsdp[step] - one[step]) < TOL, (step, one[step], fsdp[step])
    val_one, val_fsdp = val_losses(runs[f"single_{stage}"]), val_losses(runs[f"fsdp_{stage}"])
    assert sorted(val_one) == sorted(val_fsdp) == [10, 20]
    assert all(abs(val_one[s] - val_fsdp[s]) < TOL for s in val_one)


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
def test_fsdp_checkpoint_is_the_ordinary_one(runs, stage):
    """Gathered on rank 0 into the single-file format: the same keys, shapes, dtypes and optimizer layout as a
    1-process checkpoint, values within the tolerance."""
    one, fsdp = loading.load(runs[f"single_{stage}"]), loading.load(runs[f"fsdp_{stage}"])
    assert fsdp.step == one.step == STEPS and fsdp.stage == stage
    assert sorted(fsdp.model) == sorted(one.model)
    for key, tensor in one.model.items():
        got = fsdp.model[key]
        assert got.shape == tensor.shape and got.dtype == tensor.dtype and got.device.type == "cpu"
        assert (got - tensor).abs().max() < TOL, key
    a, b = one.training.optimizer, fsdp.training.optimizer
    assert a["param_groups"] == b["param_groups"] and sorted(a["state"]) == sorted(b["state"])
    for i, state in a["state"].items():
        assert torch.equal(state["step"], b["state"][i]["step"])
        assert (state["exp_avg_sq"] - b["state"][i]["exp_avg_sq"]).abs().max() < TOL
    assert len(fsdp.training.rng) == 2 and fsdp.training.world == 2


def test_fsdp_matches_ddp(runs):
    ddp, fsdp = losses(runs["ddp_pretrain"]), losses(runs["fsdp_pretrain"])
    assert sorted(ddp) == sorted(fsdp) == list(range(1, STEPS + 1))
    assert all(abs(fsdp[step] - ddp[step]) < TOL for step in ddp), (ddp, fsdp)


def test_fsdp_stop_and_resume_is_bit_exact(runs):
    ref, got = losses(runs["fsdp_pretrain"]), losses(runs["resumed"])
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == ref  # exactly equal floats, every step
    assert val_losses(runs["resumed"]) == val_losses(runs["fsdp_pretrain"])
    a, b = loading.load(runs["fsdp_pretrain"]), loading.load(runs["resumed"])
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    for i, state in a.training.optimizer["state"].items():
        assert all(torch.equal(v, b.training.optimizer["state"][i][k]) for k, v in state.items())


def test_one_process_resumes_a_sharded_checkpoint(runs, tmp_path):
    """The gathered checkpoint of step 10 continues in a plain 1-process run as the 1-process run did."""
    out = tmp_path / "continued"
    out.mkdir()
    shutil.copy(runs["fsdp_pretrain"] / checkpoint.checkpoint_name(10), out)
    assert main(args("pretrain", runs["data_pretrain"], out, "--model", "tiny", "--resume")) == 0
    one, got = losses(runs["single_pretrain"]), losses(out)
    assert sorted(got) == list(range(11, STEPS + 1))
    assert all(abs(got[step] - one[step]) < TOL for step in got), (one, got)


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_fsdp_without_torchrun_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args("pretrain", SAMPLE, out, "--model", "tiny", "--fsdp")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fsdp" in err[0] and "torchrun" in err[0]
    assert not out.exists()


@pytest.mark.parametrize(("extra", "needle"), [(("--lora-rank", "4"), "--fsdp with --lora-rank"),
                                               (("--stage", "grpo"), "--fsdp with --stage grpo")])
def test_fsdp_unsupported_combinations_are_argparse_errors(tmp_path, capsys, extra, needle):
    argv = args("pretrain", SAMPLE, tmp_path / "run", "--fsdp", *extra)
    if "grpo" in extra:
        argv = [a for a in argv if a not in ("--data", str(SAMPLE))] + ["--prompts", str(tmp_path / "p.jsonl")]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "needle"), [(("--optimizer", "muon"), "pass --optimizer adamw"),
                                               (("--dtype", "fp16"), "pass --dtype bf16 or fp32")])
def test_fsdp_refuses_muon_and_float16_in_one_line(tmp_path, extra, needle):
    """Muon orthogonalises whole matrices (refused rather than gathered); fp16 needs a sharded GradScaler."""
    cfg = config.parse_args(args("pretrain", SAMPLE, tmp_path / "run", "--fsdp", *extra))
    with pytest.raises(config.UsageError, match=needle) as refused:
        config.loop_config(cfg, STAGES["pretrain"](options=cfg.stage), torch.device("cpu"))
    assert "--fsdp" in str(refused.value) and "\n" not in str(refused.value)


def test_pretrain_default_optimizer_is_refused_under_fsdp(tmp_path):
    """Pretrain defaults to Muon: --fsdp without --optimizer says to pass adamw."""
    argv = args("pretrain", SAMPLE, tmp_path / "run", "--fsdp")
    i = argv.index("--optimizer")
    cfg = config.parse_args(argv[:i] + argv[i + 2:])
    with pytest.raises(config.UsageError, match="pass --optimizer adamw"):
        config.loop_config(cfg, STAGES["pretrain"](options=cfg.stage), torch.device("cpu"))
