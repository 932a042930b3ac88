"""train/checkpoint.py, the one checkpoint loader and writer: anything that is not a tinylm checkpoint, and any
checkpoint with nan/inf weights, is refused in one line naming the file (in-process and by every tool that
reads checkpoints); ``weights_only=True`` is never bypassed nor advised against; ``save`` writes neither
non-finite weights nor, on a full disk, a partial file."""

from __future__ import annotations

import argparse
import errno
import pathlib
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scripted import random_checkpoint

from core.files import FileWriteError, is_temp_file
from model import ModelConfig, TinyLM
from train import checkpoint
from train.checkpoint import CheckpointError
from train.inference import load_for_inference

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}

pytestmark = pytest.mark.usefixtures("one_thread")


def disk_full(monkeypatch: pytest.MonkeyPatch, name_part: str, after: int = 64) -> None:
    """Fault injection: binary writes to files whose name contains ``name_part`` fail with ENOSPC once
    ``after`` bytes went through (tests run as root, so a read-only folder cannot be staged with chmod)."""
    real_open = pathlib.Path.open

    class FullFile:
        def __init__(self, f):  # noqa: ANN001
            self.f, self.written = f, 0

        def write(self, data) -> int:  # noqa: ANN001
            self.written += len(data)
            if self.written > after:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(self.f, name)

        def __enter__(self):  # noqa: ANN204
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

    def fake_open(self, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        f = real_open(self, mode, *args, **kwargs)
        return FullFile(f) if "w" in mode and "b" in mode and name_part in self.name else f

    monkeypatch.setattr(pathlib.Path, "open", fake_open)


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if is_temp_file(p.name)]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("good") / "run")


def _torch_save(obj):  # noqa: ANN001, ANN202
    return lambda path, good: torch.save(obj, path)


NOT_CHECKPOINTS = {
    "random bytes": (lambda path, good: path.write_bytes(bytes(range(256)) * 16), "not a torch checkpoint file"),
    "a JSON file": (lambda path, good: path.write_text('{"model": {}, "format": "tinylm-checkpoint-1"}'),
                    "not a torch checkpoint file"),
    "an empty file": (lambda path, good: path.write_bytes(b""), "the file is truncated or corrupt (0 bytes)"),
    "a truncated checkpoint": (lambda path, good: path.write_bytes(good.read_bytes()[:20_000]),
                               "the file is truncated or corrupt (20000 bytes)"),
    "a pickle of other objects": (lambda path, good: path.write_bytes(pickle.dumps(argparse.Namespace(a=1))),
                                  "a pickle of other objects than tensors and plain values"),
    "a torch file of other objects": (_torch_save({"args": argparse.Namespace(a=1)}),
                                      "a torch file holding other objects than tensors and plain values"),
    "a bare state dict": (_torch_save(TinyLM(ModelConfig.from_preset("tiny")).state_dict()),
                          "not a tinylm checkpoint: a bare state dict"),
    "a list": (_torch_save([1, 2]), "not a tinylm checkpoint: a list"),
    "no model": (_torch_save({"format": checkpoint.FORMAT, "model_config": {}}),
                 "field 'model': is not a mapping of parameter names to tensors"),
    "a model of non-tensors": (_torch_save({"format": checkpoint.FORMAT, "model": {"w": [1.0]}, "model_config": {}}),
                               "field 'model': is not a mapping"),
    "a foreign model config": (_torch_save({"format": checkpoint.FORMAT, "model": {"w": torch.zeros(1)},
                                            "model_config": {"n_embd": 64}}), "field 'model_config':"),
    "a step that is not a number": (_torch_save({"format": checkpoint.FORMAT, "model": {"w": torch.zeros(1)},
                                                 "model_config": {}, "step": "5"}), "field 'step': expected int"),
}


@pytest.mark.parametrize("kind", sorted(NOT_CHECKPOINTS))
def test_what_is_not_a_checkpoint_is_one_line_naming_it(tmp_path, good, kind):
    write, expected = NOT_CHECKPOINTS[kind]
    path = tmp_path / "ckpt_00000001.pt"
    write(path, checkpoint.resolve(good))
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message, message
    assert "\n" not in message and "weights_only" not in message  # never advise the unsafe flag


def test_resume_needs_resume_state(tmp_path, good):
    with pytest.raises(CheckpointError, match=r"field 'samples_seen': missing .* cannot resume from this file"):
        checkpoint.load(good, resume=True)
    checkpoint.load(good)  # fine for inference or --init-from


def nan_checkpoint(source: Path, folder: Path) -> Path:
    payload = torch.load(checkpoint.resolve(source), weights_only=True)
    payload["model"]["model.norm.weight"][3] = float("nan")
    payload["model"]["lm_head.weight"][0, 0] = float("inf")
    folder.mkdir(parents=True)
    path = folder / "ckpt_00000001.pt"
    torch.save(payload, path)  # written past checkpoint.save, which refuses it
    (folder / "tokenizer").symlink_to(ROOT / "data" / "tokenizer")
    return path


def test_nonfinite_weights_are_refused_by_the_loader(tmp_path, good):
    bad = nan_checkpoint(good, tmp_path / "nan")
    for load in (checkpoint.load, load_for_inference):
        with pytest.raises(CheckpointError) as info:
            load(bad)
        assert str(info.value) == (f"{bad}: non-finite weights (nan/inf in model.embed_tokens.weight, "
                                   "model.norm.weight, lm_head.weight): this checkpoint is unusable; take an earlier "
                                   "one")  # the head is tied to the embedding: both names hold the inf


def test_every_tool_refuses_a_foreign_file_and_nonfinite_weights_in_one_line(tmp_path, good):
    """bin/chat, bin/serve, bin/export, bin/merge (and bin/eval, for the foreign file): exit 1, one line naming the
    file, nothing written."""
    junk = tmp_path / "junk" / "ckpt_00000001.pt"
    junk.parent.mkdir()
    junk.write_bytes(bytes(range(256)) * 8)
    nan = nan_checkpoint(good, tmp_path / "nan")
    out = tmp_path / "out"
    tools = {"chat": ["--prompt", "hi"], "serve": ["--port", "0"], "export": ["--format", "hf", "--out", str(out)],
             "merge": ["--out", str(out)], "eval": ["--prompts", str(tmp_path / "p.jsonl"), "--results",
                                                    str(out / "r.jsonl")]}
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    procs = {(tool, str(bad)): subprocess.Popen([PY, str(ROOT / "bin" / tool), "--ckpt", str(bad), *extra],
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for tool, extra in tools.items() for bad in (junk, nan) if (tool, bad) != ("eval", nan)}
    for (tool, bad), proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, (tool, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and f"{bad}: " in lines[0] and "Traceback" not in err, (tool, err)
        assert ("not a torch checkpoint file" if bad == str(junk) else "non-finite weights") in lines[0], (tool, err)
    assert not out.exists()


# ---- save ---------------------------------------------------------------------------------------------------

def test_save_refuses_nonfinite_weights(tmp_path):
    with pytest.raises(CheckpointError, match=r"ckpt_00000002.pt: refusing to write a checkpoint with non-finite "
                                              r"weights \(nan/inf in b\)"):
        checkpoint.save(tmp_path, 2, {"model": {"a": torch.ones(2), "b": torch.tensor([1.0, float("-inf")])}})
    assert list(tmp_path.iterdir()) == []


def test_save_on_a_full_disk_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    state = {"w": torch.arange(10_000, dtype=torch.float32)}
    first = checkpoint.save(tmp_path, 1, {"model": state})
    before = first.read_bytes()
    disk_full(monkeypatch, "ckpt_", after=4096)
    with pytest.raises(FileWriteError) as info:
        checkpoint.save(tmp_path, 2, {"model": state}, keep_last=1)
    assert str(info.value) == f"{tmp_path / 'ckpt_00000002.pt'}: cannot write (no space left on device)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000001.pt"] and first.read_bytes() == before
    monkeypatch.undo()
    with pytest.raises(FileWriteError, match="the run folder is a file, not a folder"):
        checkpoint.save(first, 3, {"model": state})
