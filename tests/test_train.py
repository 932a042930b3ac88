"""train/: exact kill/resume, DDP == single process, loss falls, MoE aux + router gradient, all-masked
steps, strict checkpoint loading, and the small pieces (schedule, parameter groups, bits per byte)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model import ModelConfig, TinyLM
from train import checkpoint, loading
from train.data import PackedDataset
from train.metrics import METRICS_FILE, Throughput, format_line, read_metrics, token_byte_lengths
from train.optim import param_groups
from train.run import main
from train.schedule import Schedule
from train.stages import SFTStage, StageContext, StepNorm

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
TOKENIZER = ROOT / "data" / "tokenizer"
PY = sys.executable
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: 1 thread is as fast and immune to busy cores


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is faster, immune to busy cores


def pack(stage: str, out: Path, seq_len: int) -> Path:
    subprocess.run([PY, str(ROOT / "preprocess" / "pack.py"), "--stage", stage, "--input",
                    str(SAMPLE / stage / "*.jsonl"), "--out", str(out), "--tokenizer", str(TOKENIZER),
                    "--seq-len", str(seq_len), "--quiet"], check=True)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packed")
    return {"pretrain": pack("pretrain", root / "pretrain", 64), "sft": pack("sft", root / "sft", 128)}


def args(data_dir: Path, out: Path, *extra: str, stage: str = "pretrain") -> list[str]:
    """A tiny CPU run: 8 rows of 64 tokens per step in 2 micro-batches, a log line every step (AdamW: these
    tests were written for it; tests/test_optim.py covers Muon)."""
    return ["--stage", stage, "--data", str(data_dir), "--out", str(out), "--model", "tiny", "--batch-size", "4",
            "--grad-accum", "2", "--optimizer", "adamw", "--lr", "3e-3", "--log-every", "1", "--eval-every", "0",
            "--val-rows", "8", "--no-progress", *extra]


def losses(run: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in read_metrics(run):
        if "loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = r["loss"]
    return out


# ---- exact resume ---------------------------------------------------------------------------------------

STEPS = 30
RESUME = ("--max-steps", str(STEPS), "--model-arg", "dropout=0.1")  # dropout: resuming must restore the RNG


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """An uninterrupted run with a checkpoint every 10 steps."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    assert main(args(data["pretrain"], out, *RESUME, "--save-every", "10", "--keep-last", "0")) == 0
    assert [p.name for p in checkpoint.list_checkpoints(out)] == [checkpoint.checkpoint_name(s) for s in (10, 20, 30)]
    return out


def test_stop_and_resume_is_bit_exact(data, reference, tmp_path):
    out = tmp_path / "resumed"
    assert main(args(data["pretrain"], out, *RESUME, "--save-every", "10", "--stop-after", "10")) == 0
    assert checkpoint.latest(out).name == checkpoint.checkpoint_name(10)
    assert main(args(data["pretrain"], out, *RESUME, "--save-every", "10", "--resume")) == 0
    ref, got = losses(reference), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == ref  # exactly equal floats, every step
    a, b = loading.load(reference), loading.load(out)
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert all(torch.equal(x, y) for x, y in zip(a.training.optimizer["state"][0].values(),
                                                 b.training.optimizer["state"][0].values(), strict=True))
    rows = 8 * STEPS
    assert (a.samples_seen, a.tokens_seen, a.supervised_seen) == (
        b.samples_seen, b.tokens_seen, b.supervised_seen) == (rows, rows * 64, rows * 64)


def test_kill_9_then_resume_matches(data, reference, tmp_path):
    """A checkpoint after every step (so the kill may land inside a save); kill -9 after >= 12 steps."""
    out = tmp_path / "killed"
    run = [*args(data["pretrain"], out, *RESUME, "--save-every", "1", "--keep-last", "2")]
    proc = subprocess.Popen([PY, str(ROOT / "train" / "run.py"), *run],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=ONE_THREAD)
    metrics, last = out / METRICS_FILE, 0
    while proc.poll() is None:  # until the kill (or the run ends on its own, which fails below)
        if metrics.is_file():
            lines = metrics.read_text().splitlines()
            last = len(lines)
            if last >= 12:
                os.kill(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"run was not killed mid-way (rc {proc.returncode}, {last} lines)"
    killed_at = checkpoint.latest(out)
    assert killed_at is not None and 10 <= loading.load(killed_at).step < STEPS
    assert main([*run, "--resume"]) == 0
    assert losses(out) == losses(reference)


def test_resume_refuses_another_model(data, reference, tmp_path, capsys):
    out = tmp_path / "other"
    assert main(args(data["pretrain"], out, *RESUME, "--stop-after", "1")) == 0
    assert main(args(data["pretrain"], out, *RESUME, "--resume", "--model", "tiny-moe")) == 1
    assert "--model was 'tiny', now 'tiny-moe'" in capsys.readouterr().err
    assert main(args(data["pretrain"], out, *RESUME)) == 1  # checkpoints there and no --resume
    assert "pass --resume" in capsys.readouterr().err


# ---- data parallel ------------------------------------------------------------------------------------------

def test_ddp_two_processes_match_one(data, tmp_path):
    common = ("--max-steps", "4", "--save-every", "0", "--batch-size", "2")
    single = tmp_path / "single"
    assert main(args(data["pretrain"], single, *common, "--grad-accum", "4")) == 0
    ddp = tmp_path / "ddp"
    proc = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train" / "run.py"), *args(data["pretrain"], ddp, *common, "--grad-accum", "2")],
                          cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = losses(single), losses(ddp)
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert abs(one[step] - two[step]) < 1e-5, (step, one[step], two[step])
    # and the same global batch as 1 micro-batch x 8 rows
    whole = tmp_path / "whole"
    assert main(args(data["pretrain"], whole, *common[:4], "--batch-size", "8", "--grad-accum", "1")) == 0
    for step, value in losses(whole).items():
        assert abs(one[step] - value) < 1e-5


# ---- learning --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "pretrain"
    assert main(args(data["pretrain"], out, "--max-steps", "40", "--batch-size", "8", "--grad-accum", "1",
                     "--eval-every", "20", "--val-rows", "32")) == 0
    return out


def test_loss_falls_on_sample(pretrained):
    records = read_metrics(pretrained)
    train = [r["loss"] for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert len(train) == 40 and all(math.isfinite(x) for x in train)
    assert np.mean(train[-5:]) < train[0] - 0.8, (train[0], train[-5:])
    assert [r["step"] for r in val] == [20, 40] and val[1]["val_loss"] < val[0]["val_loss"]
    assert 0 < val[1]["val_bpb"] < val[0]["val_bpb"]
    assert (pretrained / "tokenizer" / "tokenizer.json").is_file()


def test_sft_starts_from_pretrain(data, pretrained, tmp_path):
    out = tmp_path / "sft"
    assert main(args(data["sft"], out, "--max-steps", "3", "--init-from", str(pretrained), stage="sft")) == 0
    ckpt, base = loading.load(out), loading.load(pretrained)
    assert ckpt.stage == "sft" and ckpt.init_from.path == base.path
    assert ckpt.model_config == base.model_config
    first = read_metrics(out)[0]
    assert first["supervised_per_s"] < first["tokens_per_s"]  # only assistant tokens are supervised
    fresh = tmp_path / "fresh"
    assert main(args(data["sft"], fresh, "--max-steps", "3", stage="sft")) == 0
    assert first["loss"] < read_metrics(fresh)[0]["loss"] - 0.1  # the pretrained start is better
    # the checkpoint holds the trained weights: on SFT rows it beats a fresh model of the same config
    batch = PackedDataset(data["sft"]).collate(np.arange(16))
    torch.manual_seed(0)

    def val_loss(model: TinyLM) -> float:
        sums = SFTStage().eval_sums(model.eval(), batch)
        return (sums["nats"] / sums["tokens"]).item()

    assert val_loss(loading.dense_model(ckpt)) < val_loss(TinyLM(ckpt.model_config)) - 0.5


def test_moe_aux_loss_and_router_gradient(data, tmp_path):
    torch.manual_seed(0)
    model = TinyLM(ModelConfig.from_preset("tiny-moe"))
    stage = SFTStage()
    dataset = stage.open_dataset(str(data["sft"]))
    stage.setup(StageContext(dataset, torch.device("cpu"), say=lambda *a, **k: None, moe=model.config.is_moe))
    batch = dataset.collate(np.arange(4))
    norm = StepNorm(stage.count(batch).float().clamp(min=1), micro_batches=1)
    loss, parts = stage.loss(model, batch, norm)
    assert parts["aux"] > 0 and torch.isclose(loss, parts["ce"] + parts["aux"])
    loss.backward()
    for layer in model.model.layers:
        assert layer.mlp.gate.weight.grad is not None and layer.mlp.gate.weight.grad.abs().sum() > 0
    out = tmp_path / "moe"
    assert main(args(data["sft"], out, "--max-steps", "2", "--model", "tiny-moe", stage="sft")) == 0
    assert all(r["aux"] > 0 for r in read_metrics(out) if "loss" in r)


def test_all_masked_step_is_finite(data, tmp_path, monkeypatch):
    collate = PackedDataset.collate

    def no_supervision(self, rows):
        batch = collate(self, rows)
        batch.weights.zero_()
        return batch

    monkeypatch.setattr(PackedDataset, "collate", no_supervision)
    out = tmp_path / "masked"
    assert main(args(data["sft"], out, "--max-steps", "2", "--model", "tiny-moe", "--eval-every", "1",
                     stage="sft")) == 0
    records = [r for r in read_metrics(out) if "loss" in r]
    assert len(records) == 2
    for r in records:
        assert math.isfinite(r["loss"]) and r["ce"] == 0.0 and r["loss"] == pytest.approx(r["aux"])
    state = loading.load(out).model
    assert all(torch.isfinite(t).all() for t in state.values())


# ---- checkpoints of a run -------------------------------------------------------------------------------------

def test_refuses_tokenizer_fingerprint_mismatch(data, pretrained, tmp_path, capsys):
    payload = torch.load(loading.resolve(pretrained), weights_only=True)
    payload["tokenizer"]["fingerprint"] = "f" * 64
    payload["tokenizer"]["path"] = "/elsewhere/tokenizer.json"
    foreign = tmp_path / "foreign" / "ckpt_00000040.pt"
    foreign.parent.mkdir()
    torch.save(payload, foreign)
    assert main(args(data["sft"], tmp_path / "sft", "--max-steps", "1", "--init-from", str(foreign),
                     stage="sft")) == 1
    err = capsys.readouterr().err
    assert "tokenizer mismatch" in err and str(foreign) in err and str(data["sft"]) in err
    assert "/elsewhere/tokenizer.json" in err and "ffffffffffff" in err


# ---- pieces ------------------------------------------------------------------------------------------------------

def test_schedule_warmup_then_cosine():
    s = Schedule("cosine", warmup_steps=4, max_steps=20, min_ratio=0.1)  # multipliers of the peak LR
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(19) == pytest.approx(0.1) and s(100) == pytest.approx(0.1)
    assert all(s(i) >= s(i + 1) for i in range(4, 30))


def test_no_weight_decay_on_norms_and_embeddings():
    model = TinyLM(ModelConfig.from_preset("tiny"))
    decay, plain = param_groups(model.named_parameters(), 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 and "embed_tokens" not in names[id(p)] for p in decay["params"])
    plain_names = {names[id(p)] for p in plain["params"]}
    assert "model.embed_tokens.weight" in plain_names and "model.norm.weight" in plain_names
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(plain["params"]) == n_unique  # the tied head is counted once


def test_byte_table_counts_utf8_bytes():
    table = token_byte_lengths(TOKENIZER / "tokenizer.json", 6400)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    text = "Hello, 世界! naïve 🙂"
    assert table[tok.encode(text).ids].sum() == len(text.encode("utf-8"))
    assert table[tok.token_to_id("<|im_end|>")] == 0


def test_progress_line():
    line = format_line({"step": 5, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 12345.0, "supervised_per_s": 4000.0,
                        "eta_s": 80.0}, 100)
    assert line == "step   5/100 | loss 2.5000 | lr 1.00e-03 | 12.3k tok/s | 4.0k sup/s | eta 1m20s"


def test_fp16_autocast_with_grad_scaler(data, tmp_path):
    """The CUDA mixed-precision path (autocast + GradScaler) exercised on the CPU."""
    out = tmp_path / "fp16"
    assert main(args(data["sft"], out, "--max-steps", "2", "--dtype", "fp16", stage="sft")) == 0
    assert all(math.isfinite(r["loss"]) for r in read_metrics(out) if "loss" in r)
    scaler = loading.load(out).training.scaler
    assert scaler is not None and scaler["scale"] > 0


def test_a_diverging_loss_warns_once_and_can_stop_the_run(data, tmp_path, capsys):
    """A finite loss far above its start (lr 10) is said once on stderr and the run ends normally; with
    --stop-on-divergence it is one error line, exit 1, and the last checkpoint is the one before it."""
    common = ("--max-steps", "4", "--lr", "10", "--warmup-steps", "0")
    assert main(args(data["pretrain"], tmp_path / "healthy", "--max-steps", "4")) == 0
    assert "diverged" not in capsys.readouterr().err
    assert main(args(data["pretrain"], tmp_path / "warn", *common)) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "diverged" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: step "), warned
    logged = losses(tmp_path / "warn")
    assert logged[4] > 4 * logged[1] and all(math.isfinite(v) for v in logged.values())  # finite, yet diverged

    stop = tmp_path / "stop"
    assert main(args(data["pretrain"], stop, *common, "--save-every", "1", "--stop-on-divergence")) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("train/run.py: error: step "), err
    step = int(err.split("step ", 1)[1].split(":", 1)[0])
    assert "the loss diverged" in err and "at step 1" in err and "the update was not applied" in err
    assert [p.name for p in checkpoint.list_checkpoints(stop)] == [checkpoint.checkpoint_name(s)
                                                                    for s in range(max(1, step - 2), step)]
    assert f"the last good checkpoint is {stop / checkpoint.checkpoint_name(step - 1)}" in err


def test_throughput_window_leaves_out_pauses(monkeypatch):
    """Speeds over the window since the last report; time in ``paused()`` (eval, saving) counts for neither the
    window nor the ETA. A fake clock makes the numbers exact."""
    now = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    speed = Throughput(step=10, supervised_seen=500, flops_per_token=6.0, peak_flops=1200.0)
    assert speed.is_first_step(11) and not speed.is_first_step(12)
    for _ in range(2):
        now[0] += 1.0
        speed.advance(400)
    with speed.paused():
        now[0] += 30.0  # an evaluation
    got = speed.report(step=12, end=20, supervised_seen=700)
    assert got == {"tokens_per_s": 400.0, "supervised_per_s": 100.0, "step_time_s": 1.0, "mfu": 2.0, "eta_s": 8.0}
    now[0] += 4.0
    speed.advance(100)
    got = speed.report(step=13, end=20, supervised_seen=700)  # a new window
    assert (got["tokens_per_s"], got["supervised_per_s"], got["step_time_s"]) == (25.0, 0.0, 4.0)
    assert got["eta_s"] == pytest.approx(6.0 / 3 * 7)


def test_sample_every_logs_the_models_answers(data, pretrained, tmp_path):
    """--sample-every N: greedy answers to the fixed prompts at steps N, 2N, ... and the last, equal to what the
    saved model answers (same prompts, same renderer), in the shape bin/report reads."""
    from core.tokenizer import load_tokenizer
    from train.samples import PROMPTS, make_sampler

    out = tmp_path / "sft"
    assert main(args(data["sft"], out, "--max-steps", "3", "--init-from", str(pretrained), "--sample-every", "2",
                     stage="sft")) == 0
    logged = [r for r in read_metrics(out) if "samples" in r]
    assert [r["step"] for r in logged] == [2, 3]
    assert [s["prompt"] for s in logged[-1]["samples"]] == list(PROMPTS)
    model = loading.dense_model(loading.load(out))
    again = make_sampler(load_tokenizer(TOKENIZER), chat=True)(model)
    assert again == logged[-1]["samples"]
    assert main(args(data["sft"], tmp_path / "none", "--max-steps", "1", stage="sft")) == 0
    assert not [r for r in read_metrics(tmp_path / "none") if "samples" in r]
