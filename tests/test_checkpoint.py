"""train/checkpoint.py, the checkpoint type and its strict reader and writer (read through train/loading.py): anything
that is not a tinylm checkpoint, any checkpoint with nan/inf weights, a model config with a value of the wrong type,
non-finite or out of range, and tensors that are not what they claim (an expanded view, a dtype that is no weight,
shapes other than the config's) are refused in one line naming the file (in-process and by every tool that
reads checkpoints); ``weights_only=True`` is never bypassed nor advised against; ``save`` writes neither
non-finite weights nor, on a full disk, a partial file; unknown / missing fields and unknown versions are refused
naming the field; a checkpoint written in the version-1 layout (before the type) still loads and resumes."""

from __future__ import annotations

import argparse
import errno
import hashlib
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
from train import checkpoint, dist, loading, weights
from train.checkpoint import Checkpoint, CheckpointError, DataRecord, ResumeState, SourceRecord, TokenizerRecord
from train.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
TINY = ModelConfig.from_preset("tiny")

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
    write(path, loading.resolve(good))
    with pytest.raises(CheckpointError) as info:
        loading.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message, message
    assert "\n" not in message and "weights_only" not in message  # never advise the unsafe flag


def test_resume_needs_resume_state(tmp_path, good):
    with pytest.raises(CheckpointError, match=r"field 'training': missing.* cannot resume from this file"):
        loading.load(good, resume=True)
    loading.load(good)  # fine for inference or --init-from


def nan_checkpoint(source: Path, folder: Path) -> Path:
    payload = torch.load(loading.resolve(source), weights_only=True)
    payload["model"]["model.norm.weight"][3] = float("nan")
    payload["model"]["lm_head.weight"][0, 0] = float("inf")
    folder.mkdir(parents=True)
    path = folder / "ckpt_00000001.pt"
    torch.save(payload, path)  # written past checkpoint.save, which refuses it
    (folder / "tokenizer").symlink_to(ROOT / "data" / "tokenizer")
    return path


def test_nonfinite_weights_are_refused_by_the_loader(tmp_path, good):
    bad = nan_checkpoint(good, tmp_path / "nan")
    for load in (loading.load, load_model):
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
        Checkpoint({"a": torch.ones(2), "b": torch.tensor([1.0, float("-inf")])}, TINY, step=2).save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_save_on_a_full_disk_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    state = {"w": torch.arange(10_000, dtype=torch.float32)}
    first = Checkpoint(state, TINY, step=1).save(tmp_path)
    before = first.read_bytes()
    disk_full(monkeypatch, "ckpt_", after=4096)
    with pytest.raises(FileWriteError) as info:
        Checkpoint(state, TINY, step=2).save(tmp_path, keep_last=1)
    assert str(info.value) == f"{tmp_path / 'ckpt_00000002.pt'}: cannot write (no space left on device)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000001.pt"] and first.read_bytes() == before
    monkeypatch.undo()
    with pytest.raises(FileWriteError, match="the run folder is a file, not a folder"):
        Checkpoint(state, TINY, step=3).save(first)


# ---- loading into a model, names ----------------------------------------------------------------------------

def test_load_refuses_missing_unexpected_and_misshaped(good):
    ckpt = loading.load(good)
    model = TinyLM(ckpt.model_config)
    missing = {k: v for k, v in ckpt.model.items() if k != "model.norm.weight"}
    with pytest.raises(CheckpointError, match=r"missing keys model\.norm\.weight"):
        weights.load_model_state(model, missing, "ckpt")
    with pytest.raises(CheckpointError, match=r"unexpected keys extra\.weight"):
        weights.load_model_state(model, {**ckpt.model, "extra.weight": torch.zeros(1)}, "ckpt")
    narrow = TinyLM(ModelConfig.from_preset("tiny", hidden_size=32))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        weights.load_model_state(narrow, ckpt.model, "ckpt")
    weights.load_model_state(model, ckpt.model, "ckpt")  # the real thing loads


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own import
def test_saved_state_has_no_wrapper_prefixes(tmp_path):
    model = TinyLM(ModelConfig.from_preset("tiny"))
    compiled = torch.compile(model)  # wrapping only; nothing is compiled until it runs
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    state = weights.model_state(compiled)
    assert set(state) == set(model.state_dict())
    path = Checkpoint(state, model.config, step=3).save(tmp_path, keep_last=1)
    Checkpoint(state, model.config, step=5).save(tmp_path, keep_last=1)
    assert not path.exists() and checkpoint.latest(tmp_path).name == "ckpt_00000005.pt"
    assert not [p for p in tmp_path.iterdir() if is_temp_file(p.name)]


def test_missing_checkpoint_message(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file or run folder"):
        loading.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"no checkpoint \(ckpt_\*\.pt\) in this folder"):
        loading.load(tmp_path)


# ---- the type, its versions and its strictness ---------------------------------------------------------------

def save_v1(path: Path, model: TinyLM, tokenizer: Path) -> None:
    """A checkpoint in the flat layout train/loop.py wrote before the Checkpoint type (format version 1)."""
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    payload = {"format": "tinylm-checkpoint-1", "step": 7, "samples_seen": 56, "tokens_seen": 3584,
               "supervised_seen": 900, "nonfinite_skipped": 1, "model": weights.model_state(model),
               "optimizer": optimizer.state_dict(), "schedule": {"peak_lr": 1e-5}, "scaler": None, "stage_state": {},
               "rng": [dist.rng_state()], "world": 1, "model_config": model.config.to_dict(), "stage": "dpo",
               "tokenizer": {"fingerprint": hashlib.sha256(tokenizer.read_bytes()).hexdigest(), "path": str(tokenizer),
                             "vocab_size": 6400, "special_ids": {"<|im_end|>": 2}},
               "data": {"folder": "data/packed/dpo", "stage": "dpo", "seq_len": 64, "rows": 30, "val_rows": 4,
                        "global_batch": 8},
               "args": {"stage": "dpo", "lr": None}, "init_from": {"path": "out/sft/ckpt_00000010.pt", "step": 10,
                                                                   "stage": "sft"},
               "reference": {"path": "out/sft/ckpt_00000010.pt", "step": 10, "stage": "sft", "fingerprint": "ab" * 32},
               "dpo": {"beta": 0.5}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)


def test_a_version_1_checkpoint_loads_resumes_and_serves(tmp_path):
    torch.manual_seed(0)
    model = TinyLM(TINY)
    old = tmp_path / "old" / "ckpt_00000007.pt"
    save_v1(old, model, ROOT / "data" / "tokenizer" / "tokenizer.json")
    ckpt = loading.load(old, resume=True)
    assert (ckpt.step, ckpt.samples_seen, ckpt.tokens_seen, ckpt.supervised_seen, ckpt.nonfinite_skipped) == (
        7, 56, 3584, 900, 1)
    assert ckpt.model_config == TINY and ckpt.stage == "dpo" and ckpt.stage_options == {"beta": 0.5}
    assert ckpt.reference == SourceRecord("out/sft/ckpt_00000010.pt", 10, "sft", "ab" * 32)
    assert ckpt.init_from == SourceRecord("out/sft/ckpt_00000010.pt", 10, "sft")
    assert ckpt.data == DataRecord("data/packed/dpo", "dpo", 64, 30, 4, 8)
    assert ckpt.tokenizer.vocab_size == 6400 and ckpt.lora is None and ckpt.path == str(old)
    assert ckpt.training.world == 1 and ckpt.training.schedule == {"peak_lr": 1e-5}
    assert (ckpt.training.optimizer_name, ckpt.training.muon) == ("adamw", None)  # added later: defaults
    assert ckpt.training.optimizer["state"][0]["step"] == 1
    assert all(torch.equal(ckpt.model[k], v) for k, v in model.state_dict().items())
    loaded = load_model(old)  # chat / serve / export read it too
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7]])
        assert torch.equal(loaded.model(ids).logits, model.eval()(ids).logits)
    again = ckpt.save(tmp_path / "new")  # and it is rewritten in the current version, losing nothing
    assert torch.load(again, weights_only=True)["format"] == checkpoint.FORMAT
    new = loading.load(again, resume=True)
    assert (new.stage_options, new.reference, new.data, new.training.schedule) == (
        ckpt.stage_options, ckpt.reference, ckpt.data, ckpt.training.schedule)


def test_round_trip_keeps_every_record(tmp_path):
    torch.manual_seed(0)
    model = TinyLM(TINY)
    ckpt = Checkpoint(weights.model_state(model), TINY, stage="sft", step=3, samples_seen=24, tokens_seen=1536,
                      supervised_seen=700, tokenizer=TokenizerRecord("f" * 64, "tok.json", 6400, {"<|im_end|>": 2}),
                      data=DataRecord("d", "sft", 64, 10, 2, 8), args={"lr": 0.1},
                      training=ResumeState({"state": {}, "param_groups": []}, [{"torch": torch.get_rng_state()}]),
                      base=SourceRecord("b", 1, "sft", "0" * 64), teacher=SourceRecord("t", 2, "sft", "1" * 64),
                      stage_options={"alpha": 0.5})
    back = loading.load(ckpt.save(tmp_path), resume=True)
    for name in ("model_config", "stage", "step", "samples_seen", "tokens_seen", "supervised_seen", "tokenizer",
                 "data", "args", "base", "teacher", "stage_options", "lora", "reference", "init_from"):
        assert getattr(back, name) == getattr(ckpt, name), name
    assert back.path == str(tmp_path / "ckpt_00000003.pt") and set(back.model) == set(ckpt.model)


STRICT = {
    "an unknown version": (lambda p: {**p, "format": "tinylm-checkpoint-9"},
                           "field 'format': format 'tinylm-checkpoint-9' is not one this tinylm reads"),
    "an unknown field": (lambda p: {**p, "surprise": 1}, "field 'surprise': unknown field"),
    "an unknown nested field": (lambda p: {**p, "tokenizer": {**p["tokenizer"], "colour": "red"}},
                                "field 'tokenizer.colour': unknown field"),
    "a missing model config": (lambda p: {k: v for k, v in p.items() if k != "model_config"},
                               "field 'model_config': missing"),
    "a missing nested field": (lambda p: {**p, "base": {"step": 1}}, "field 'base.path': missing"),
    "a negative counter": (lambda p: {**p, "tokens_seen": -4}, "field 'tokens_seen': must be >= 0, got -4"),
    "a record of the wrong type": (lambda p: {**p, "teacher": "out/teacher"}, "field 'teacher': expected a record"),
    "a foreign LoRA config": (lambda p: {**p, "lora": {"rank": 0, "alpha": 1.0, "targets": ["q_proj"]}},
                              "field 'lora': LoRA rank must be >= 1"),
}


@pytest.mark.parametrize("kind", sorted(STRICT))
def test_strict_about_fields_and_versions(tmp_path, good, kind):
    change, expected = STRICT[kind]
    payload = change(torch.load(loading.resolve(good), weights_only=True))
    path = tmp_path / "ckpt_00000001.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as info:
        loading.load(path)
    assert str(info.value).startswith(f"{path}: ") and expected in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


# ---- values that are not what they claim: refused before anything is allocated -------------------------------

def edited(good: Path, folder: Path, edit) -> Path:  # noqa: ANN001
    """A copy of the checkpoint ``good`` with ``edit(payload)`` applied, written past ``save``'s checks."""
    payload = torch.load(loading.resolve(good), weights_only=True)
    edit(payload)
    folder.mkdir(parents=True)
    path = folder / "ckpt_00000001.pt"
    torch.save(payload, path)
    return path


HOSTILE_CONFIG = {
    "rope_theta nan": ("rope_theta", float("nan"), "must be finite"),
    "rope_theta inf": ("rope_theta", float("inf"), "must be finite"),
    "rms_norm_eps negative": ("rms_norm_eps", -1.0, "must be finite and in (0, 1)"),
    "rms_norm_eps nan": ("rms_norm_eps", float("nan"), "must be finite"),
    "rms_norm_eps text": ("rms_norm_eps", "abc", "expected a number, got 'abc'"),
    "rms_norm_eps null": ("rms_norm_eps", None, "expected a number, got None"),
    "initializer_range list": ("initializer_range", [1], "expected a number, got [1]"),
    "a billion layers": ("num_hidden_layers", 10**9, "must be in [1, 1024]"),
    "a trillion positions": ("max_position_embeddings", 10**12, "must be in [1, 16777216]"),
    "a 41-digit width": ("hidden_size", 10**40, "must be in [1, 65536]"),
    "a bool as text": ("qk_norm", "no", "expected true or false"),
    "heads as a bool": ("num_attention_heads", True, "expected an integer, got True"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_CONFIG))
def test_a_hostile_model_config_is_one_line_naming_the_field(tmp_path, good, kind):
    name, value, words = HOSTILE_CONFIG[kind]
    path = edited(good, tmp_path / "bad", lambda p: p["model_config"].__setitem__(name, value))
    with pytest.raises(CheckpointError) as info:
        loading.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: field 'model_config.{name}': ") and words in message, message
    assert "\n" not in message and len(message) < 300


NORM = "model.norm.weight"
HOSTILE_TENSORS = {
    "a stride-0 view of 10^12 elements": (lambda m: m.__setitem__(NORM, torch.zeros(1).expand(10**12)),
                                          f"field 'model.{NORM}': claims 1000000000000 elements over a storage of 4"),
    "float8": (lambda m: m.__setitem__(NORM, m[NORM].to(torch.float8_e4m3fn)), f"tensor {NORM} is float8_e4m3fn"),
    "complex": (lambda m: m.__setitem__(NORM, m[NORM].to(torch.complex64)), f"tensor {NORM} is complex64"),
    "integer": (lambda m: m.__setitem__(NORM, m[NORM].to(torch.int64)), f"tensor {NORM} is int64"),
    # a config that claims a 4 GB embedding over the file's small one: compared before any model is built
    "a config larger than its tensors": (lambda m: None, "the weights do not fit its model_config: shape mismatch "
                                                         "lm_head.weight (6400, 64) vs model (16777216, 64)"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_TENSORS))
def test_tensors_that_are_not_what_they_claim_are_refused_before_use(tmp_path, good, kind):
    edit, words = HOSTILE_TENSORS[kind]

    def change(payload: dict) -> None:
        edit(payload["model"])
        if kind == "a config larger than its tensors":
            payload["model_config"]["vocab_size"] = 2**24

    path = edited(good, tmp_path / "bad", change)
    (path.parent / "tokenizer").symlink_to(ROOT / "data" / "tokenizer")
    for load in (loading.load, load_model):
        with pytest.raises(CheckpointError) as info:
            load(path)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and words in message and "\n" not in message, message


def test_an_expanded_tensor_in_the_resume_state_is_refused(tmp_path, good):
    def change(payload: dict) -> None:
        payload["training"] = {"optimizer": {"state": {0: {"exp_avg": torch.zeros(1).expand(10**12)}},
                                             "param_groups": []}, "rng": [dist.rng_state()]}

    path = edited(good, tmp_path / "bad", change)
    with pytest.raises(CheckpointError, match=r"field 'training\.optimizer\.state\.0\.exp_avg': claims 10{12} "):
        loading.load(path, resume=True)


def test_a_lora_checkpoint_is_checked_against_its_config_before_the_adapter_is_built(tmp_path):
    from model.lora import LoRAConfig, apply_lora, lora_state_dict

    lora = LoRAConfig(2, 4.0, ("q_proj", "v_proj"))
    adapter = lora_state_dict(apply_lora(TinyLM(TINY), lora))
    base = SourceRecord("elsewhere", 1, "sft", "0" * 64)
    Checkpoint(model=adapter, model_config=TINY, lora=lora, base=base, step=1).save(tmp_path / "ok")
    loading.load(tmp_path / "ok")  # a well-formed adapter reads
    payload = torch.load(loading.resolve(tmp_path / "ok"), weights_only=True)
    cases = {
        "huge rank": ({**payload, "lora": {**payload["lora"], "rank": 10**12}},
                      "field 'lora': LoRA rank must be >= 1 and <= 65536"),
        "nan alpha": ({**payload, "lora": {**payload["lora"], "alpha": float("nan")}},
                      "field 'lora': LoRA alpha must be a finite number"),
        "rank not as stored": ({**payload, "lora": {**payload["lora"], "rank": 3}},
                               "the adapter does not fit its model_config and lora: shape mismatch"),
        "another target": ({**payload, "lora": {**payload["lora"], "targets": ["k_proj"]}},
                           "the adapter does not fit its model_config and lora: missing keys"),
    }
    for name, (bad, words) in cases.items():
        path = tmp_path / name.replace(" ", "_") / "ckpt_00000001.pt"
        path.parent.mkdir()
        torch.save(bad, path)
        with pytest.raises(CheckpointError) as info:
            loading.load(path)
        assert str(info.value).startswith(f"{path}: ") and words in str(info.value), (name, str(info.value))


def test_chat_refuses_an_expanded_tensor_without_allocating_it(tmp_path, good):
    """The CLI under a 6 GB address-space limit: 10^12 float32 elements (4 TB) would not fit, one line does."""
    import resource

    path = edited(good, tmp_path / "bad", lambda p: p["model"].__setitem__(NORM, torch.zeros(1).expand(10**12)))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    run = subprocess.run([PY, str(ROOT / "bin" / "chat"), "--ckpt", str(path), "--prompt", "hi"], env=ENV,
                         capture_output=True, text=True, preexec_fn=limit, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1 and str(path) in lines[0], run.stderr
    assert "claims 1000000000000 elements" in lines[0]


def test_a_resume_state_whose_rng_is_not_one_is_refused(tmp_path, good):
    cases = {"torch": {"torch": torch.zeros(3)}, "numpy": {**dist.rng_state(), "numpy": {"keys": torch.zeros(2)}},
             "python": {**dist.rng_state(), "python": (3, (1, 2), None)}}
    for part, entry in cases.items():
        def change(payload: dict, entry: dict = entry) -> None:
            payload["training"] = {"optimizer": {"state": {}, "param_groups": []}, "rng": [dist.rng_state(), entry]}

        path = edited(good, tmp_path / part, change)
        with pytest.raises(CheckpointError) as info:
            loading.load(path, resume=True)
        assert f"field 'training.rng.1': {part}: not a {part} generator state" in str(info.value), str(info.value)
    loading.load(edited(good, tmp_path / "ok", lambda p: p.__setitem__("training", {
        "optimizer": {"state": {}, "param_groups": []}, "rng": [dist.rng_state()]})), resume=True)
