"""RoPE scaling (linear, dynamic, YaRN): transformers configs read and written with their scaling, logits equal
to transformers' past the original context in the full forward and the cached decode, ``--rope-scaling`` for
any checkpoint, and every bad value one line naming its field or flag."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from core.tokenizer import load_tokenizer
from model import ModelConfig, TinyLM
from model.attention import inference_mask
from model.config import ConfigError, normalize_rope_scaling, parse_rope_scaling, with_rope_scaling
from model.decode import decode_step, decode_weights
from model.generate import generate
from model.hf_config import UnsupportedConfig, config_from_hf, hf_rope_fields
from model.kv_cache import KVCache
from serve.export import export
from train import loading
from train.checkpoint import Checkpoint, CheckpointError, DataRecord
from train.loading import SourceOptions, load_model

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizer"
VOCAB = load_tokenizer(TOKENIZER).vocab_size
ORIGINAL = 32  # the "trained" context of the test models; sequences run to 3-5x past it
LENGTH = 120
PREFIX = 70  # cached decode: prefill this many, then one token at a time

pytestmark = pytest.mark.usefixtures("one_thread")

SCALINGS = {
    # MiniMind-3's --inference_rope_scaling shape (beta 32/1, attention_factor 1), smaller factor and original
    "yarn-minimind": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                       "beta_fast": 32, "beta_slow": 1, "attention_factor": 1.0}, 256),
    "yarn-mscale": ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL,
                     "beta_fast": 16, "beta_slow": 2}, 256),  # attention_factor from factor: 0.1 ln 8 + 1
    "linear": ({"rope_type": "linear", "factor": 4.0}, 256),
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0}, ORIGINAL),  # transformers: original = max_positions
}


def hf_model(arch: str, scaling: dict, max_positions: int, seed: int = 0):
    """A random tiny transformers model with RoPE scaling (theta 10000: short wavelengths, so scaling matters)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                  tie_word_embeddings=False, rms_norm_eps=1e-6, initializer_range=0.15,
                  rope_parameters={**scaling, "rope_theta": 10000.0}, attn_implementation="eager")
    if arch == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=32))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("scaled")
    return {(arch, name): save(hf_model(arch, *SCALINGS[name], seed=i), root / f"{arch}-{name}")
            for i, (arch, name) in enumerate((a, n) for a in ("llama", "qwen3") for n in SCALINGS)}


def fresh_hf(folder: Path):
    """A newly loaded transformers model (its dynamic RoPE keeps state between calls)."""
    return getattr(transformers, json.loads((folder / "config.json").read_text())["architectures"][0]) \
        .from_pretrained(folder, attn_implementation="eager").eval()


def hf_cached_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits of ``ids``: prefill PREFIX, then one token per call through its KV cache."""
    out = hf(input_ids=ids[:, :PREFIX], use_cache=True)
    logits, past = [out.logits], out.past_key_values
    for t in range(PREFIX, ids.size(1)):
        out = hf(input_ids=ids[:, t:t + 1], past_key_values=past, use_cache=True)
        logits.append(out.logits)
        past = out.past_key_values
    return torch.cat(logits, 1).float()


def tinylm_cached_logits(model: TinyLM, ids: torch.Tensor) -> torch.Tensor:
    """tinylm's logits of ``ids`` the way generation computes them: prefill into a KVCache, then the fused
    one-token decode step."""
    cache = KVCache(model.config, 1, ids.size(1), torch.device("cpu"), torch.float32)
    logits = [model(ids[:, :PREFIX], cache=cache).logits]
    weights = decode_weights(model, 1)
    for t in range(PREFIX, ids.size(1)):
        mask = inference_mask(None, t, 1, ids.device)
        step = decode_step(model, weights, ids[:, t], torch.tensor([t]), cache, mask)
        logits.append(step[:, None])
    return torch.cat(logits, 1)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("name", list(SCALINGS))
def test_logits_equal_transformers_past_the_original_context(folders, arch, name):
    folder = folders[arch, name]
    lm = load_model(folder)
    scaling = lm.config.rope_scaling
    assert scaling is not None and scaling["rope_type"] == SCALINGS[name][0]["rope_type"]
    assert scaling["factor"] == SCALINGS[name][0]["factor"]
    ids = torch.randint(0, VOCAB, (1, LENGTH), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mine, theirs = lm.model(ids).logits, fresh_hf(folder)(input_ids=ids).logits.float()
        assert (mine - theirs).abs().max().item() < 1e-4
        cached_mine, cached_theirs = tinylm_cached_logits(lm.model, ids), hf_cached_logits(fresh_hf(folder), ids)
        assert (cached_mine - cached_theirs).abs().max().item() < 1e-4
        # the check can fail: the same weights without scaling are far from transformers' past ORIGINAL
        plain = load_model(folder, options=SourceOptions(rope_scaling="none"))
        assert plain.config.rope_scaling is None
        assert (plain.model(ids).logits - theirs)[:, ORIGINAL * 2:].abs().max().item() > 1e-2


def test_greedy_generation_past_the_original_context_matches_transformers(folders):
    folder = folders["qwen3", "yarn-minimind"]
    lm, hf = load_model(folder), fresh_hf(folder)
    prompt = torch.randint(0, VOCAB, (1, 60), generator=torch.Generator().manual_seed(5))[0].tolist()
    mine = generate(lm.model, prompt, max_new_tokens=20)
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert len(set(mine)) > 3, "degenerate model"
    assert mine == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", list(SCALINGS))
def test_export_writes_a_config_transformers_reads_with_the_same_scaling(folders, name, tmp_path):
    folder = folders["llama", name]
    lm = load_model(folder)
    export(lm, "hf", tmp_path / "out", "f32")
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["rope_parameters"]["rope_type"] == SCALINGS[name][0]["rope_type"]
    assert conf["rope_scaling"]["rope_type"] == SCALINGS[name][0]["rope_type"]  # transformers 4.x's spelling
    back = config_from_hf(conf).rope_scaling
    if name == "linear":  # its original length is no transformers field (and no part of the function)
        assert back.pop("original_max_position_embeddings") == conf["max_position_embeddings"]
        assert lm.config.rope_scaling.pop("original_max_position_embeddings") == 256
    assert back == lm.config.rope_scaling  # and back
    reread = fresh_hf(tmp_path / "out")
    theirs = {k: v for k, v in reread.config.rope_parameters.items() if k != "rope_theta"}
    assert theirs["rope_type"] == name.split("-")[0] and theirs["factor"] == lm.config.rope_scaling["factor"]
    ids = torch.randint(0, VOCAB, (1, LENGTH), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (lm.model(ids).logits - reread(input_ids=ids).logits.float()).abs().max().item() < 1e-4


def test_a_tinylm_model_scaled_at_inference_exports_what_transformers_computes(tmp_path):
    """A native checkpoint (no scaling, trained at seq 32), --rope-scaling yarn:4 -> export -> transformers."""
    cfg = ModelConfig.from_preset("tiny-qwen3", vocab_size=VOCAB, rope_theta=10000.0)
    torch.manual_seed(0)
    model = TinyLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    data = DataRecord(folder="d", stage="pretrain", seq_len=ORIGINAL, rows=1, val_rows=1, global_batch=1)
    path = Checkpoint.of(model, load_tokenizer(TOKENIZER), data=data).save(tmp_path / "run")
    lm = load_model(path, options=SourceOptions(rope_scaling="yarn:4"))
    assert lm.config.rope_scaling["original_max_position_embeddings"] == ORIGINAL  # the trained seq_len
    assert lm.config.rope_scaling["factor"] == 4.0
    export(lm, "hf", tmp_path / "hf", "f32")
    reread = fresh_hf(tmp_path / "hf")
    assert reread.config.rope_parameters["rope_type"] == "yarn"
    assert reread.config.rope_parameters["original_max_position_embeddings"] == ORIGINAL
    ids = torch.randint(0, VOCAB, (1, LENGTH), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (lm.model(ids).logits - reread(input_ids=ids).logits.float()).abs().max().item() < 1e-4


# ---- reading transformers configs ----------------------------------------------------------------------------

BASE_CONF = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 100, "hidden_size": 64,
             "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "max_position_embeddings": 4096}


def test_both_spellings_read_the_same():
    yarn = {"factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 32, "beta_slow": 1}
    v5 = config_from_hf({**BASE_CONF, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, **yarn}})
    v4 = config_from_hf({**BASE_CONF, "rope_theta": 1e6, "rope_scaling": {"type": "yarn", **yarn}})
    assert v5 == v4 and v5.rope_theta == 1e6
    assert v5.rope_scaling["attention_factor"] == pytest.approx(0.1 * math.log(4) + 1)
    # a missing original length is max_position_embeddings, transformers' rule; the context grows to it * factor
    implicit = config_from_hf({**BASE_CONF, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    assert implicit.rope_scaling["original_max_position_embeddings"] == 4096
    assert implicit.max_position_embeddings == 4 * 4096
    assert config_from_hf({**BASE_CONF, "rope_scaling": {"rope_type": "default"}}).rope_scaling is None
    assert hf_rope_fields(v5)["rope_parameters"] == {"rope_type": "yarn", "rope_theta": 1e6,
                                                     "attention_factor": v5.rope_scaling["attention_factor"],
                                                     **yarn}


@pytest.mark.parametrize(("scaling", "field"), [
    ({"rope_type": "llama3", "factor": 8.0}, "rope_parameters.rope_type"),
    ({"rope_type": "yarn", "factor": 0.5}, "rope_parameters.factor"),
    ({"rope_type": "yarn", "factor": 2.0, "beta_fast": 1, "beta_slow": 32}, "rope_parameters.beta_fast"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "rope_parameters.partial_rotary_factor"),
    ({"rope_type": "yarn", "factor": 2.0, "short_factor": [1.0]}, "rope_parameters.short_factor"),
])
def test_unsupported_transformers_scaling_names_the_field(scaling, field):
    with pytest.raises(UnsupportedConfig) as e:
        config_from_hf({**BASE_CONF, "rope_parameters": {**scaling, "rope_theta": 1e4}})
    assert e.value.field == field


# ---- the config field and the flag -------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "field"), [
    ({"rope_type": "ntk", "factor": 2.0, "original_max_position_embeddings": 64}, "rope_scaling.rope_type"),
    ({"factor": 2.0, "original_max_position_embeddings": 64}, "rope_scaling.rope_type"),
    ({"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 64}, "rope_scaling.factor"),
    ({"rope_type": "linear", "factor": 0.5, "original_max_position_embeddings": 64}, "rope_scaling.factor"),
    ({"rope_type": "yarn", "factor": 2.0}, "rope_scaling.original_max_position_embeddings"),
    ({"rope_type": "yarn", "factor": float("nan"), "original_max_position_embeddings": 64}, "rope_scaling.factor"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "attention_factor": float("inf")},
     "rope_scaling.attention_factor"),
    ({"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64, "beta_fast": 8},
     "rope_scaling.beta_fast"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0},
     "rope_scaling.original_max_position_embeddings"),
    ("yarn", "rope_scaling"),
])
def test_bad_rope_scaling_names_the_field(value, field):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_preset("tiny", rope_scaling=value)
    assert e.value.field == field


def test_normalized_scaling_is_stable_and_survives_overrides_and_checkpoints(tmp_path):
    cfg = ModelConfig.from_preset("tiny", rope_scaling={"type": "yarn", "factor": 16,
                                                        "original_max_position_embeddings": 2048,
                                                        "mscale": 0.707, "mscale_all_dim": 0.707})
    assert cfg.rope_scaling["attention_factor"] == 1.0 and cfg.rope_scaling["rope_type"] == "yarn"
    assert normalize_rope_scaling(cfg.rope_scaling) == cfg.rope_scaling
    assert cfg.override(["hidden_size=128"]).rope_scaling == cfg.rope_scaling
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    again = cfg.override(["rope_scaling=linear:2,original=512"])
    assert again.rope_scaling == {"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 512}
    assert cfg.override(["rope_scaling=none"]).rope_scaling is None
    # a checkpoint whose stored config holds a bad value: one line naming the field
    ckpt = Checkpoint(model=TinyLM(ModelConfig.from_preset("tiny")).state_dict(),
                      model_config=ModelConfig.from_preset("tiny"))
    path = ckpt.save(tmp_path)
    payload = torch.load(path, weights_only=False)
    payload["model_config"]["rope_scaling"] = {"rope_type": "yarn", "factor": -2.0,
                                               "original_max_position_embeddings": 64}
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="rope_scaling.factor"):
        loading.load(path)


def test_parse_rope_scaling():
    assert parse_rope_scaling("yarn:4") == {"rope_type": "yarn", "factor": 4}
    assert parse_rope_scaling("YaRN:16, original=2048, attention_factor=1.0, truncate=false") == {
        "rope_type": "yarn", "factor": 16, "original_max_position_embeddings": 2048, "attention_factor": 1.0,
        "truncate": False}
    assert parse_rope_scaling("none") is None
    for bad, field in (("yarn", "rope_scaling"), ("yarn:four", "rope_scaling.factor"),
                       ("yarn:4,original", "rope_scaling")):
        with pytest.raises(ConfigError) as e:
            parse_rope_scaling(bad)
        assert e.value.field == field


def test_with_rope_scaling_defaults_to_the_trained_context():
    cfg = ModelConfig.from_preset("tiny")  # max_position_embeddings 1024
    scaled = with_rope_scaling(cfg, {"rope_type": "yarn", "factor": 4}, trained_context=512)
    assert scaled.rope_scaling["original_max_position_embeddings"] == 512 and scaled.max_position_embeddings == 2048
    assert with_rope_scaling(scaled, {"rope_type": "yarn", "factor": 8}, 999) \
        .rope_scaling["original_max_position_embeddings"] == 512  # the model's own original wins over a guess
    linear = {"rope_type": "linear", "factor": 2, "original_max_position_embeddings": 64}
    explicit = with_rope_scaling(cfg, linear, 512)
    assert explicit.rope_scaling["original_max_position_embeddings"] == 64 and explicit.max_position_embeddings == 1024
    assert with_rope_scaling(scaled, None, 512).rope_scaling is None


def test_minimind_pth_loads_with_its_inference_scaling(tmp_path):
    """A bare MiniMind-3 state dict (shape from --model) with MiniMind's --inference_rope_scaling."""
    cfg = ModelConfig.from_preset("minimind3", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=96, num_hidden_layers=1, head_dim=None, vocab_size=VOCAB)
    torch.save(TinyLM(cfg).state_dict(), tmp_path / "full_sft_64.pth")
    spec = "yarn:16,original=2048,beta_fast=32,beta_slow=1,attention_factor=1.0"
    lm = load_model(tmp_path / "full_sft_64.pth",
                    options=SourceOptions(cfg, TOKENIZER, rope_scaling=spec))
    assert lm.config.rope_scaling == {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 2048,
                                      "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.0, "truncate": True}
    assert lm.config.max_position_embeddings == 32768  # already >= 2048 * 16
    hf_conf = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=32768,
                                       rope_parameters={**hf_rope_fields(lm.config)["rope_parameters"]})
    rotary = transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding(hf_conf)
    assert torch.equal(lm.model.model.rotary_emb.inv_freq, rotary.inv_freq)
    assert rotary.attention_scaling == 1.0


def run_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bin" / tool), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.mark.parametrize(("tool", "spec", "named"), [("chat", "ntk:4", "rope_type"), ("serve", "yarn:1", "factor"),
                                                  ("eval", "yarn:nan", "factor")])
def test_bad_rope_scaling_flag_is_one_line(tool, spec, named, tmp_path):
    result = run_tool(tool, "--ckpt", str(tmp_path), "--rope-scaling", spec)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "--rope-scaling" in last and f"rope_scaling.{named}" in last


def test_serve_reports_the_scaling_it_runs(tmp_path):
    """bin/serve --rope-scaling yarn:4 on a checkpoint with no data record: original = its context (1024)."""
    from scripted import random_checkpoint

    ckpt = random_checkpoint(tmp_path / "run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "bin" / "serve"), "--ckpt", str(ckpt), "--port", str(port),
                             "--threads", "1", "--rope-scaling", "yarn:4,beta_fast=16"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline, health = time.time() + 90, None
        while health is None and time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
                    health = json.loads(r.read())
            except OSError:
                time.sleep(0.2)
        assert health is not None, "bin/serve did not answer /health"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
            model = json.loads(r.read())["data"][0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    expected = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 16.0,
                "beta_slow": 1.0, "attention_factor": pytest.approx(0.1 * math.log(4) + 1), "truncate": True}
    assert health["rope_scaling"] == expected and model["rope_scaling"] == expected
    assert health["context"] == model["max_model_len"] == 4096


def test_gguf_export_of_a_scaled_model_is_refused_in_one_line(folders, tmp_path):
    from model.export_hf import ExportError

    with pytest.raises(ExportError) as e:
        export(load_model(folders["qwen3", "yarn-minimind"]), "gguf", tmp_path / "m.gguf", "f32")
    text = str(e.value)
    assert "\n" not in text and "rope_scaling yarn:4" in text and "plain RoPE" in text
    assert not (tmp_path / "m.gguf").exists()
