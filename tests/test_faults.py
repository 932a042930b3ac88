"""Training that goes wrong, and outputs that cannot be written, end in one line and a non-zero exit with
nothing half-written: corrupt shards are refused before training; two runs cannot share a run folder (and a
killed run leaves no stale lock); a nan/inf loss, gradient norm or weights stop the run at once (or are
skipped, counted, with --skip-nonfinite) and never reach a checkpoint, on every DDP rank alike; a full disk,
a read-only target or a file in the way of checkpoints, bin/export, bin/eval --results and bin/merge."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from scripted import random_checkpoint
from test_checkpoint import disk_full, no_temp_files
from torch.optim.optimizer import register_optimizer_step_post_hook

from bench.bench_verify import build_dataset
from core.errors import TinyLMError
from core.files import LOCK_NAME, FileWriteError, append_line
from train import checkpoint, loading, weights
from train.metrics import METRICS_FILE, read_metrics
from train.run import main
from train.stages.base import CrossEntropyStage

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small synthetic sft dataset: rows of two 32-token conversations (seq_len 64), 3 shards."""
    folder = tmp_path_factory.mktemp("data") / "sft"
    build_dataset(folder, 20_000, stage="sft", seq_len=64, shard_tokens=8192)
    return folder


def args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--stage", "sft", "--data", str(data_dir), "--out", str(out), "--model", "tiny", "--batch-size", "4",
            "--grad-accum", "2", "--lr", "3e-3", "--log-every", "1", "--eval-every", "0", "--val-rows", "8",
            "--no-progress", *extra]


def fails(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run train/run.py in-process; assert exit 1 and one stderr line; return that line."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("train/run.py: error: "), err
    return err


# ---- inputs refused before training ------------------------------------------------------------------------------

def test_a_corrupt_shard_is_refused_before_training_and_no_verify_skips_the_checksums(data, tmp_path, capsys):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    victim = copy / "shard_00002.bin"
    raw = bytearray(victim.read_bytes())
    raw[300] ^= 1
    victim.write_bytes(bytes(raw))
    out = tmp_path / "run"
    err = fails(capsys, args(copy, out, "--max-steps", "1"))
    assert err == f"train/run.py: error: {victim}: checksum mismatch (the file was changed or corrupted)"
    assert not out.exists()  # refused before the run folder was made
    assert main(args(copy, out, "--max-steps", "1", "--no-verify")) == 0  # the escape hatch trains


def test_a_dataset_without_training_rows_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty"
    build_dataset(empty, 0, stage="sft", seq_len=64)
    err = fails(capsys, args(empty, tmp_path / "run", "--max-steps", "1"))
    assert f"{empty}: no training rows (seq_len 64, 0 tokens)" in err
    assert not (tmp_path / "run").exists()


def test_not_a_checkpoint_and_a_damaged_latest_checkpoint(data, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 1000)
    out = tmp_path / "run"
    err = fails(capsys, args(data, out, "--max-steps", "1", "--init-from", str(junk)))
    assert f"{junk}: not a readable checkpoint" in err or f"{junk}: not a tinylm checkpoint" in err
    assert not out.exists(), "a run that failed before writing anything leaves no folder behind"
    assert main(args(data, out, "--max-steps", "2", "--save-every", "1", "--keep-last", "0")) == 0
    latest = checkpoint.latest(out)
    latest.write_bytes(latest.read_bytes()[:5000])
    err = fails(capsys, args(data, out, "--max-steps", "3", "--resume"))
    assert f"{latest}: not a readable checkpoint: the file is truncated or corrupt" in err
    assert "move it away to resume from the one before" in err


def test_out_that_is_a_file_is_one_line(data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = fails(capsys, args(data, blocker, "--max-steps", "1"))
    assert err == f"train/run.py: error: {blocker}: the run folder is a file, not a folder"
    err = fails(capsys, args(data, blocker / "run", "--max-steps", "1"))
    assert f"{blocker / 'run'}: cannot create the run folder" in err


# ---- one run per folder -----------------------------------------------------------------------------------------

def test_a_second_run_into_the_same_folder_is_refused_and_a_killed_run_leaves_no_lock(data, tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen([PY, str(ROOT / "train" / "run.py"), *args(data, out, "--max-steps", "100000",
                                                                       "--save-every", "0")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not (out / METRICS_FILE).is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read().decode()
        err = fails(capsys, args(data, out, "--max-steps", "2"))
        assert err == (f"train/run.py: error: {out}: another training run (pid {first.pid}) is using this folder; "
                       "wait for it or choose another folder")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / LOCK_NAME).is_file() and checkpoint.latest(out) is None
    assert main(args(data, out, "--max-steps", "2")) == 0  # the kernel dropped the dead run's lock
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]


# ---- non-finite steps -----------------------------------------------------------------------------------------------

class InfGrad(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (a finite loss whose gradient norm is not)."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return grad * math.inf


def poison(monkeypatch: pytest.MonkeyPatch, steps: set[int], kind: str = "loss", accum: int = 2) -> None:
    """Make the loss (``kind`` "loss") or its gradient ("grad") non-finite in the given 1-based steps."""
    original = CrossEntropyStage.loss
    calls = [0]

    def loss(self, model, batch, norm):  # noqa: ANN001, ANN202
        value, parts = original(self, model, batch, norm)
        step = calls[0] // accum + 1
        calls[0] += 1
        if step in steps:
            value = value * math.nan if kind == "loss" else InfGrad.apply(value)
        return value, parts

    monkeypatch.setattr(CrossEntropyStage, "loss", loss)


BOTH = "loss (nan) and gradient norm (nan)"  # a nan loss gives nan gradients


def all_finite(out: Path) -> bool:
    return all(not weights.nonfinite_tensors(torch.load(p, weights_only=True)["model"])
               for p in checkpoint.list_checkpoints(out))


def test_a_nonfinite_loss_stops_at_once_naming_the_step_and_the_last_good_checkpoint(data, tmp_path, capsys,
                                                                                      monkeypatch):
    poison(monkeypatch, {3})
    out = tmp_path / "run"
    err = fails(capsys, args(data, out, "--max-steps", "6", "--save-every", "2", "--keep-last", "0"))
    assert err == (f"train/run.py: error: step 3: non-finite {BOTH}; the update was not applied; the last good "
                   f"checkpoint is {out / 'ckpt_00000002.pt'} (resume from it with --resume, e.g. with a lower --lr, "
                   "or let up to N such steps be skipped with --skip-nonfinite N)")
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["ckpt_00000002.pt"] and all_finite(out)
    assert read_metrics(out)[-1] == {"step": 3, "skipped_nonfinite": 1, "nonfinite": BOTH, "stopped": True}


def test_a_nonfinite_gradient_norm_with_a_finite_loss_stops_too(data, tmp_path, capsys, monkeypatch):
    poison(monkeypatch, {2}, kind="grad")
    out = tmp_path / "run"
    err = fails(capsys, args(data, out, "--max-steps", "4", "--save-every", "1"))
    assert "step 2: non-finite gradient norm (" in err and "loss (" not in err
    assert f"the last good checkpoint is {out / 'ckpt_00000001.pt'}" in err
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["ckpt_00000001.pt"] and all_finite(out)


def test_skip_nonfinite_skips_the_update_counts_and_resumes_with_the_count(data, tmp_path, capsys, monkeypatch):
    poison(monkeypatch, {3, 5})
    out = tmp_path / "run"
    assert main(args(data, out, "--max-steps", "5", "--save-every", "1", "--keep-last", "0",
                     "--skip-nonfinite", "2")) == 0
    records = read_metrics(out)
    assert [r for r in records if "skipped_nonfinite" in r] == [
        {"step": 3, "skipped_nonfinite": 1, "nonfinite": BOTH},
        {"step": 5, "skipped_nonfinite": 2, "nonfinite": BOTH}]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 4]
    two, three = (loading.load(out / checkpoint.checkpoint_name(s), resume=True) for s in (2, 3))
    assert all(torch.equal(two.model[k], three.model[k]) for k in two.model)  # no update at step 3
    assert three.training.optimizer["state"][0]["step"] == two.training.optimizer["state"][0]["step"]
    assert three.samples_seen == two.samples_seen + 8  # the bad batch was consumed, not retried
    assert loading.load(out).nonfinite_skipped == 2 and all_finite(out)
    # the count survives a resume: one more bad step is one too many
    monkeypatch.undo()
    poison(monkeypatch, {1})
    err = fails(capsys, args(data, out, "--max-steps", "7", "--resume", "--skip-nonfinite", "2"))
    assert f"step 6: non-finite {BOTH}; the update was not applied (2 skip(s) allowed, all used)" in err
    assert f"the last good checkpoint is {out / 'ckpt_00000005.pt'}" in err


def test_weights_that_become_nonfinite_are_never_checkpointed(data, tmp_path, capsys):
    calls = [0]

    def break_weights(optimizer, args, kwargs):  # noqa: ANN001, ANN202
        calls[0] += 1
        if calls[0] == 2:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(math.inf)

    handle = register_optimizer_step_post_hook(break_weights)
    try:
        out = tmp_path / "run"
        err = fails(capsys, args(data, out, "--max-steps", "4", "--save-every", "1"))
    finally:
        handle.remove()
    assert "step 2: non-finite weights after the update (nan/inf in " in err
    assert f"no checkpoint written, the last good checkpoint is {out / 'ckpt_00000001.pt'}" in err
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["ckpt_00000001.pt"] and all_finite(out)


def test_ddp_ranks_agree_on_a_nonfinite_step(data, tmp_path):
    """A huge learning rate: both ranks skip the same step, then both stop at the next one (no hang)."""
    out = tmp_path / "ddp"
    proc = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train" / "run.py"), *args(data, out, "--max-steps", "6", "--batch-size", "2",
                                                                 "--lr", "1e30", "--skip-nonfinite", "1")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "train/run.py: error:" in line]
    assert len(lines) == 2 and lines[0].split("error: ", 1)[1] == lines[1].split("error: ", 1)[1], proc.stderr[-3000:]
    assert "step 3: non-finite" in lines[0] and "1 skip(s) allowed, all used" in lines[0]
    assert [r["step"] for r in read_metrics(out) if "skipped_nonfinite" in r] == [2, 3] and all_finite(out)


# ---- checkpoints and outputs that cannot be written -------------------------------------------------------------

def test_a_full_disk_during_a_checkpoint_stops_in_one_line_and_keeps_the_previous_one(data, tmp_path, capsys,
                                                                                       monkeypatch):
    out = tmp_path / "run"
    disk_full(monkeypatch, "ckpt_00000002.pt", after=10_000)
    err = fails(capsys, args(data, out, "--max-steps", "3", "--save-every", "1"))
    assert err == f"train/run.py: error: {out / 'ckpt_00000002.pt'}: cannot write (no space left on device)"
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["ckpt_00000001.pt"] and no_temp_files(out)
    loading.load(out)  # the previous one is whole


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from train.loading import load_model

    return load_model(random_checkpoint(tmp_path_factory.mktemp("export") / "run"))


def failing_replace(monkeypatch: pytest.MonkeyPatch, code: int = errno.EROFS) -> None:
    def replace(src, dst):  # noqa: ANN001, ANN202
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "replace", replace)


def test_hf_export_that_cannot_be_written_leaves_the_previous_export(trained, tmp_path, monkeypatch):
    from serve.export import export

    out = tmp_path / "hf"
    export(trained, "hf", out, "f32")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    failing_replace(monkeypatch)
    with pytest.raises(FileWriteError) as info:
        export(trained, "hf", out, "f16")
    assert str(info.value) == f"{out}: cannot write the export (read-only file system)"
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder left beside it
    disk_full(monkeypatch, "model.safetensors", after=1000)
    with pytest.raises(FileWriteError) as info:
        export(trained, "hf", tmp_path / "other", "f32")
    assert str(info.value) == f"{tmp_path / 'other'}: cannot write the export (no space left on device)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_gguf_export_on_a_full_disk_leaves_the_previous_file(trained, tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from serve.export import export

    out = tmp_path / "m.gguf"
    export(trained, "gguf", out, "f32", write_modelfile=False)
    before = out.read_bytes()

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(FileWriteError) as info:
        export(trained, "gguf", out, "f16", write_modelfile=False)
    assert str(info.value) == f"{out}: cannot write (no space left on device)"
    monkeypatch.undo()
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_export_cli_out_problems_are_one_line(tmp_path):
    run = random_checkpoint(tmp_path / "run")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [("hf", blocker, f"{blocker}: exists and is not a directory"),
             ("hf", blocker / "hf", f"{blocker}: the folder of the export is a file, not a folder"),
             ("gguf", "/dev/full", "/dev/full: is not a regular file (a folder or a device); refusing to replace it")]
    procs = [(subprocess.Popen([PY, str(ROOT / "bin" / "export"), "--ckpt", str(run), "--format", fmt, "--out",
                                str(out), "--quiet", "--no-modelfile"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=ENV), expected) for fmt, out, expected in cases]
    for proc, expected in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and len(err.strip().splitlines()) == 1, err
        assert err.startswith("bin/export: error: ") and err.strip().endswith(expected), err
    assert Path("/dev/full").is_char_device()  # not replaced by a regular file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "run"]


def test_results_lines_are_appended_whole_or_not_at_all(tmp_path, monkeypatch):
    from serve.evaluate import append_result, run_eval

    results = tmp_path / "r.jsonl"
    append_result(results, {"a": 1})
    before = results.read_bytes()
    real_write = os.write

    def half_write(fd: int, data: bytes) -> int:
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_write)
    with pytest.raises(FileWriteError, match=r"r.jsonl: cannot append \(no space left on device\)"):
        append_result(results, {"b": "x" * 100})
    monkeypatch.undo()
    assert results.read_bytes() == before
    with pytest.raises(FileWriteError, match="/dev/full: cannot append \\(no space left on device\\)"):
        append_line("/dev/full", json.dumps({"c": 1}))
    with pytest.raises(FileWriteError, match="the results file is a folder, not a file"):
        run_eval(None, None, None, None, None, tmp_path, torch.device("cpu"))  # refused before any work


def test_merge_that_cannot_be_written_leaves_nothing(tmp_path, monkeypatch):
    from model.lora import LoRAConfig, apply_lora, lora_parameters, lora_state_dict
    from train.loading import load_model, merge_checkpoint

    base_path = random_checkpoint(tmp_path / "base")
    base = loading.load(base_path)
    model = load_model(base_path).model
    apply_lora(model, LoRAConfig(rank=2, alpha=2.0, targets=("q_proj",)))
    with torch.no_grad():
        for _, p in lora_parameters(model):
            p.normal_(0.0, 0.1)
    adapter = dataclasses.replace(base, model=lora_state_dict(model), lora=LoRAConfig(2, 2.0, ("q_proj",)),
                                  base=base.source_record())
    lora = adapter.save(tmp_path / "lora")
    (tmp_path / "lora" / "tokenizer").mkdir()
    (tmp_path / "lora" / "tokenizer" / "tokenizer.json").write_bytes((ROOT / "data" / "tokenizer" /
                                                                      "tokenizer.json").read_bytes())
    disk_full(monkeypatch, "ckpt_", after=4096)
    with pytest.raises(FileWriteError, match=r"merged/ckpt_00000001.pt: cannot write \(no space left on device\)"):
        merge_checkpoint(lora, tmp_path / "merged")
    monkeypatch.undo()
    assert not (tmp_path / "merged").exists()  # the folder it created is gone again
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = subprocess.run([PY, str(ROOT / "bin" / "merge"), "--ckpt", str(lora), "--out", str(blocker)],
                          capture_output=True, text=True, env=ENV)
    assert proc.returncode == 1 and proc.stderr == f"bin/merge: error: {blocker}: the output folder is a file, not a " \
                                                   "folder\n"
    assert merge_checkpoint(lora, tmp_path / "merged").name == "ckpt_00000001.pt"  # the base's step
    assert (tmp_path / "merged" / "tokenizer" / "tokenizer.json").is_file()


def test_metrics_reader_leaves_out_an_unfinished_last_line_and_names_a_corrupt_one(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed while writing line 2
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]
    path.write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(TinyLMError) as info:
        read_metrics(tmp_path)
    assert str(info.value) == f"{path}:2: not a JSON object (a corrupt metrics line)"
