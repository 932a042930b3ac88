"""Bring your own weights: transformers LlamaForCausalLM / Qwen3ForCausalLM folders load through the one
checkpoint loader (and so through bin/chat, bin/export, ...) with transformers' logits and greedy tokens;
unsupported configs and mismatched tensors are one line each; export gives the input's tensors back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.tokenizer import load_tokenizer
from model import ModelConfig
from model.generate import generate
from serve.export import export
from train import loading, weights
from train.checkpoint import CheckpointError
from train.loading import load_model

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizer"
VOCAB = load_tokenizer(TOKENIZER).vocab_size
PROMPT = [5, 300, 1200, 77, 4000, 19]

pytestmark = pytest.mark.usefixtures("one_thread")


def hf_model(arch: str, tied: bool, seed: int = 0, **extra):
    """A random tiny transformers model over the shipped tokenizer's vocabulary (norm weights randomised too)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tied, rms_norm_eps=1e-6, initializer_range=0.3,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attn_implementation="eager")
    common.update(extra)
    if arch == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=32))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def save(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, folder / name)
    return folder


KINDS = [("llama", True), ("llama", False), ("qwen3", True), ("qwen3", False)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[tuple[str, bool], tuple[Path, object]]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (arch, tied) in enumerate(KINDS):
        model = hf_model(arch, tied, seed=i)
        out[arch, tied] = save(model, root / f"{arch}-{'tied' if tied else 'untied'}"), model
    return out


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize(("arch", "tied"), KINDS)
def test_transformers_folder_gives_transformers_logits_and_tokens(folders, arch, tied):
    folder, hf = folders[arch, tied]
    ckpt = loading.load(folder)
    assert ckpt.model_config.qk_norm == (arch == "qwen3") and ckpt.model_config.tie_word_embeddings == tied
    assert ckpt.model_config.head_dim == (32 if arch == "qwen3" else 16)
    lm = load_model(folder)  # what bin/chat, bin/serve, bin/eval, bin/export use
    assert lm.tokenizer.path == folder / "tokenizer.json"
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        diff = (lm.model(ids).logits - hf(input_ids=ids).logits.float()).abs().max().item()
    assert diff < 1e-4
    mine = generate(lm.model, PROMPT, max_new_tokens=12)
    assert len(set(mine)) > 3, "degenerate model"
    assert mine == hf_greedy(hf, PROMPT, 12)
    # the fingerprint is the mapped state dict's, the same on every read (LoRA bases, DPO references)
    record = ckpt.source_record()
    assert record.path == str(folder) and record.fingerprint == loading.load(folder).source_record().fingerprint
    assert record.fingerprint == weights.state_fingerprint(ckpt.model)


def test_sharded_folder_loads_like_one_file(folders, tmp_path):
    _, hf = folders["qwen3", False]
    folder = save(hf, tmp_path / "sharded", max_shard_size="300KB")
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    one = loading.load(folders["qwen3", False][0])
    assert loading.load(folder).source_record().fingerprint == one.source_record().fingerprint


@pytest.mark.parametrize(("arch", "tied"), KINDS)
def test_export_round_trip_gives_the_input_tensors(folders, arch, tied, tmp_path):
    folder, _ = folders[arch, tied]
    out = tmp_path / "again"
    export(load_model(folder), "hf", out, "f32")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM" if arch == "qwen3" else "LlamaForCausalLM"]
    assert config["model_type"] == arch
    theirs = safetensors_torch.load_file(str(folder / "model.safetensors"))
    again = safetensors_torch.load_file(str(out / "model.safetensors"))
    assert set(again) == set(theirs)
    assert all(torch.equal(again[k], theirs[k]) for k in theirs)
    reloaded = getattr(transformers, config["architectures"][0]).from_pretrained(out).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        diff = (load_model(folder).model(ids).logits - reloaded(input_ids=ids).logits.float()).abs().max().item()
    assert diff < 1e-4


def test_bf16_round_trip(folders, tmp_path):
    _, hf = folders["qwen3", True]
    folder = save(hf.to(torch.bfloat16), tmp_path / "bf16")
    hf.float()
    out = tmp_path / "again"
    export(load_model(folder), "hf", out, "bf16")
    theirs = safetensors_torch.load_file(str(folder / "model.safetensors"))
    again = safetensors_torch.load_file(str(out / "model.safetensors"))
    assert theirs[next(iter(theirs))].dtype == torch.bfloat16
    assert set(again) == set(theirs) and all(torch.equal(again[k], theirs[k]) for k in theirs)


# ---- refusals: one line naming the field or tensor -------------------------------------------------------------

def edit_config(folder: Path, dst: Path, **changes) -> Path:
    shutil.copytree(folder, dst)
    conf = json.loads((dst / "config.json").read_text())
    conf.update(changes)
    (dst / "config.json").write_text(json.dumps(conf))
    return dst


@pytest.mark.parametrize(("changes", "field", "words"), [
    # linear / dynamic / yarn are read (tests/test_rope_scaling.py); other RoPE types and bad values are not
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}}, "rope_parameters.rope_type",
     "llama3"),
    ({"rope_scaling": {"type": "yarn", "factor": 0.5}}, "rope_scaling.factor", "> 1"),
    ({"attention_bias": True}, "attention_bias", "biases"),
    ({"mlp_bias": True}, "mlp_bias", "biases"),
    ({"hidden_act": "gelu"}, "hidden_act", "gelu"),
    ({"use_sliding_window": True}, "use_sliding_window", "sliding"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types", "full_attention"),
    ({"num_experts": 8}, "num_experts", "mixture-of-experts"),
    ({"architectures": ["MistralForCausalLM"]}, "architectures", "MistralForCausalLM"),
    ({"head_dim": 7}, None, "head_dim 7"),
])
def test_unsupported_config_is_one_line_naming_the_field(folders, tmp_path, changes, field, words):
    folder = edit_config(folders["llama", True][0], tmp_path / "bad", **changes)
    with pytest.raises(CheckpointError) as e:
        loading.load(folder)
    text = str(e.value)
    assert "\n" not in text and str(folder / "config.json") in text and words in text
    if field:
        assert f"field '{field}'" in text


@pytest.mark.parametrize(("changes", "field", "words"), [
    ({"num_hidden_layers": 10**9}, "num_hidden_layers", "must be in [1, 1024], got 1000000000"),
    ({"max_position_embeddings": 10**12}, "max_position_embeddings", "must be in [1, 16777216]"),
    ({"rms_norm_eps": "abc"}, "rms_norm_eps", "expected a number, got 'abc'"),
    ({"rms_norm_eps": None}, "rms_norm_eps", "expected a number, got None"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps", "must be finite"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps", "must be finite and in (0, 1)"),
    ({"initializer_range": [1]}, "initializer_range", "expected a number, got [1]"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}}, "rope_theta", "must be finite"),
    ({"rope_parameters": None, "rope_theta": float("inf")}, "rope_theta", "must be finite"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings", "expected true or false"),
    ({"vocab_size": 1.5}, "vocab_size", "expected an integer, got 1.5"),
    ({"intermediate_size": None}, "intermediate_size", "expected a positive integer"),
    ({"intermediate_size": -96}, "intermediate_size", "expected a positive integer"),
    ({"head_dim": 0}, "head_dim", "must be in [2, 4096]"),
    ({"layer_types": 5}, "layer_types", "full_attention"),
    ({"architectures": [{}]}, "architectures", "tinylm loads exactly one of"),
])
def test_a_config_value_that_is_not_what_it_claims_is_one_line_naming_the_field(folders, tmp_path, changes, field,
                                                                                 words):
    """Type, finiteness and range of every field, checked before any tensor is read or any model built: a
    billion layers or a trillion positions are refused at once, not built."""
    folder = edit_config(folders["llama", True][0], tmp_path / "bad", **changes)
    with pytest.raises(CheckpointError) as e:
        loading.load(folder)
    text = str(e.value)
    assert text.startswith(f"{folder / 'config.json'}: field '{field}': ") and words in text, text
    assert "\n" not in text and len(text) < 400


def test_a_number_too_long_to_read_is_one_line(folders, tmp_path):
    folder = edit_config(folders["llama", True][0], tmp_path / "bad")
    (folder / "config.json").write_text((folder / "config.json").read_text().replace('"vocab_size": ',
                                                                                    '"vocab_size": ' + "9" * 5000))
    with pytest.raises(CheckpointError) as e:
        loading.load(folder)
    assert str(e.value).startswith(f"{folder / 'config.json'}: the transformers config is corrupt")
    assert "\n" not in str(e.value)


def rewrite_weights(folder: Path, dst: Path, edit) -> Path:
    shutil.copytree(folder, dst)
    state = safetensors_torch.load_file(str(dst / "model.safetensors"))
    edit(state)
    safetensors_torch.save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(("edit", "words"), [
    (lambda s: s.pop("model.layers.1.self_attn.k_norm.weight"), "missing keys model.layers.1.self_attn.k_norm.weight"),
    (lambda s: s.pop("lm_head.weight"), "missing keys lm_head.weight"),
    (lambda s: s.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(128)),
     "unexpected keys model.layers.0.self_attn.q_proj.bias"),
    (lambda s: s.__setitem__("model.norm.weight", torch.ones(65)), "model.norm.weight (65,) vs model (64,)"),
])
def test_mismatched_tensors_are_named(folders, tmp_path, edit, words):
    folder = rewrite_weights(folders["qwen3", False][0], tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as e:
        loading.load(folder)
    assert "\n" not in str(e.value) and words in str(e.value) and str(folder) in str(e.value)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int32, torch.complex64, torch.bool])
def test_a_tensor_of_a_dtype_that_is_no_weight_is_one_line_naming_it(folders, tmp_path, dtype):
    folder = rewrite_weights(folders["qwen3", False][0], tmp_path / "bad",
                             lambda s: s.__setitem__("model.norm.weight", s["model.norm.weight"].to(dtype)))
    with pytest.raises(CheckpointError) as e:
        loading.load(folder)
    name = str(dtype).removeprefix("torch.")
    assert str(e.value).startswith(f"{folder}: tensor model.norm.weight is {name}, not a weight dtype"), str(e.value)


def test_a_state_dict_that_claims_more_than_it_stores_is_refused(tmp_path):
    """A MiniMind-style .pth whose tensor is a stride-0 view of 10^12 elements (4 TB claimed, 4 bytes stored),
    and one of float8: one line each, nothing materialised."""
    state = minimind_state_dict(False)
    for name, tensor, words in [("expanded", torch.zeros(1).expand(10**12),
                                 "field 'model.norm.weight': claims 1000000000000 elements"),
                                ("float8", state["model.norm.weight"].to(torch.float8_e5m2),
                                 "tensor model.norm.weight is float8_e5m2")]:
        pth = tmp_path / f"{name}.pth"
        torch.save({**state, "model.norm.weight": tensor}, pth)
        shape = loading.SourceOptions(ModelConfig.from_preset("tiny").override(MINIMIND_ARGS[False]))
        with pytest.raises(CheckpointError) as e:
            loading.load(pth, options=shape)
        assert str(e.value).startswith(f"{pth}: ") and words in str(e.value), str(e.value)


def test_tied_config_with_another_head_is_refused(folders, tmp_path):
    folder = rewrite_weights(folders["llama", True][0], tmp_path / "bad",
                             lambda s: s.__setitem__("lm_head.weight", torch.zeros(VOCAB, 64)))
    with pytest.raises(CheckpointError, match="field 'tie_word_embeddings': lm_head.weight differs"):
        loading.load(folder)


def test_cli_tools_take_the_folder_and_refuse_in_one_line(folders, tmp_path):
    folder, _ = folders["qwen3", True]
    run = subprocess.run([sys.executable, str(ROOT / "bin" / "chat"), "--ckpt", str(folder), "--prompt", "hi",
                          "--temperature", "0", "--max-new-tokens", "4"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    bad = edit_config(folder, tmp_path / "bad", hidden_act="relu")
    run = subprocess.run([sys.executable, str(ROOT / "bin" / "export"), "--ckpt", str(bad), "--format", "hf",
                          "--out", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True)
    assert run.returncode == 1 and not (tmp_path / "out").exists()
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bin/export: error: ") and "field 'hidden_act'" in lines[0]
    with pytest.raises(CheckpointError, match="no training state to resume"):
        loading.load(folder, resume=True)


def test_lora_sft_on_an_imported_model_trains_merges_and_exports(packed_sample, tmp_path):
    from train.metrics import read_metrics
    from train.run import main

    folder = save(hf_model("qwen3", False, seed=5, initializer_range=0.02), tmp_path / "qwen3")
    out = tmp_path / "lora"
    assert main(["--stage", "sft", "--data", str(packed_sample["lora"]), "--out", str(out), "--init-from",
                 str(folder), "--lora-rank", "8", "--lora-alpha", "16", "--batch-size", "4", "--grad-accum", "1",
                 "--lr", "1e-2", "--max-steps", "16", "--log-every", "1", "--eval-every", "0", "--val-rows", "4",
                 "--no-progress", "--merge"]) == 0
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses
    ckpt = loading.load(out)
    assert ckpt.lora is not None and ckpt.base == loading.load(folder).source_record()
    assert ckpt.model_config.qk_norm
    lm = load_model(out / "merged")  # adapter folded into the imported base
    exported = tmp_path / "hf"
    export(lm, "hf", exported, "f32")
    hf = transformers.Qwen3ForCausalLM.from_pretrained(exported).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert (lm.model(ids).logits - hf(input_ids=ids).logits.float()).abs().max().item() < 1e-4
        base = load_model(folder).model(ids).logits
        assert (lm.model(ids).logits - base).abs().max().item() > 1e-3  # the adapter changed the model


# ---- MiniMind .pth state dicts -------------------------------------------------------------------------------

def minimind_state_dict(qk_norm: bool, layers: int = 2, hidden: int = 64, heads: int = 4, kv: int = 2,
                        head_dim: int = 16, ffn: int = 96, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict under MiniMind's own names (model/model_minimind.py: MiniMindForCausalLM, tied, saved in
    fp16 as its trainers do): MiniMind2 without, minimind-3 with the per-head q_norm / k_norm."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.2).half()

    def norm(n: int) -> torch.Tensor:
        return (1 + 0.3 * torch.randn(n, generator=g)).half()

    embed = w(VOCAB, hidden)
    state = {"model.embed_tokens.weight": embed, "model.norm.weight": norm(hidden), "lm_head.weight": embed}
    for i in range(layers):
        p = f"model.layers.{i}."
        state.update({p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
                      p + "self_attn.k_proj.weight": w(kv * head_dim, hidden),
                      p + "self_attn.v_proj.weight": w(kv * head_dim, hidden),
                      p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
                      p + "mlp.gate_proj.weight": w(ffn, hidden), p + "mlp.up_proj.weight": w(ffn, hidden),
                      p + "mlp.down_proj.weight": w(hidden, ffn),
                      p + "input_layernorm.weight": norm(hidden), p + "post_attention_layernorm.weight": norm(hidden)})
        if qk_norm:
            state.update({p + "self_attn.q_norm.weight": norm(head_dim), p + "self_attn.k_norm.weight": norm(head_dim)})
    return state


MINIMIND_ARGS = {False: ["num_key_value_heads=2", "intermediate_size=96", "rms_norm_eps=1e-6"],
                 True: ["num_key_value_heads=2", "intermediate_size=96", "rms_norm_eps=1e-6", "qk_norm=true",
                        "head_dim=32"]}


@pytest.mark.parametrize("qk_norm", [False, True], ids=["minimind2", "minimind3"])
def test_minimind_state_dict_loads_with_its_shape_and_tokenizer(tmp_path, qk_norm):
    from serve.source_args import add_source_arguments, source_options

    head_dim = 32 if qk_norm else 16
    state = minimind_state_dict(qk_norm, head_dim=head_dim)
    pth = tmp_path / "full_sft_64.pth"
    torch.save(state, pth)
    import argparse

    p = argparse.ArgumentParser()
    add_source_arguments(p)
    args = p.parse_args(["--model", "tiny", "--tokenizer", str(TOKENIZER),
                         *(f"--model-arg={a}" for a in MINIMIND_ARGS[qk_norm])])
    lm = load_model(pth, options=source_options(args.model, args.model_arg, args.tokenizer))
    assert lm.config.qk_norm == qk_norm and lm.config.head_dim == head_dim and lm.tokenizer.path.parent == TOKENIZER
    # the reference: transformers' Llama / Qwen3 with the same tensors (MiniMind uses their names and math)
    conf = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=head_dim, rms_norm_eps=1e-6, tie_word_embeddings=True,
                max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                attn_implementation="eager")
    ref = (transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**conf)) if qk_norm
           else transformers.LlamaForCausalLM(transformers.LlamaConfig(**conf))).eval()
    ref.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert (lm.model(ids).logits - ref(input_ids=ids).logits.float()).abs().max().item() < 1e-4
    assert generate(lm.model, PROMPT, max_new_tokens=8) == hf_greedy(ref, PROMPT, 8)
    # a LoRA base / DPO reference recorded from it is recognised by the fingerprint of the mapped weights
    ckpt = loading.load(pth, options=loading.SourceOptions(lm.config))
    assert ckpt.source_record().fingerprint == lm.checkpoint.source_record().fingerprint


def test_minimind_state_dict_without_shape_or_with_a_wrong_one(tmp_path):
    pth = tmp_path / "pretrain_64.pth"
    torch.save(minimind_state_dict(True, head_dim=32), pth)
    export_cmd = [sys.executable, str(ROOT / "bin" / "export"), "--ckpt", str(pth), "--format", "hf", "--out",
                  str(tmp_path / "out"), "--quiet", "--tokenizer", str(TOKENIZER)]

    def refusal(*extra: str) -> str:
        run = subprocess.run([*export_cmd, *extra], capture_output=True, text=True)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 1 and len(lines) == 1 and not (tmp_path / "out").exists(), run.stderr
        return lines[0]

    assert "which holds no config: give its shape with --model" in refusal()
    wrong = refusal("--model", "tiny", *(f"--model-arg={a}" for a in MINIMIND_ARGS[False]))  # minimind-3 as MiniMind2
    assert str(pth) in wrong and "unexpected keys model.layers.0.self_attn.k_norm.weight" in wrong
    assert "model.layers.0.self_attn.q_proj.weight (128, 64) vs model (64, 64)" in wrong
    assert "--model-arg" in refusal("--model", "tiny", "--model-arg", "hiden_size=3")
    ok = subprocess.run([*export_cmd, "--model", "tiny", *(f"--model-arg={a}" for a in MINIMIND_ARGS[True])],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]


def test_training_starts_from_a_minimind_state_dict(packed_sample, tmp_path, capsys):
    from train.run import main

    pth = tmp_path / "full_sft_64.pth"
    state = minimind_state_dict(False)
    torch.save(state, pth)
    common = ["--stage", "sft", "--data", str(packed_sample["lora"]), "--init-from", str(pth), "--batch-size", "2",
              "--grad-accum", "1", "--max-steps", "2", "--eval-every", "0", "--val-rows", "2", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "no-shape")]) == 1
    assert "which holds no config: give its shape with --model" in capsys.readouterr().err
    shape = ["--model", "tiny", *(f"--model-arg={a}" for a in MINIMIND_ARGS[False])]
    assert main([*common, "--out", str(tmp_path / "run"), *shape]) == 0
    assert "--model tiny ignored" not in capsys.readouterr().err
    ckpt = loading.load(tmp_path / "run")
    assert ckpt.init_from.path == str(pth) and ckpt.model_config.intermediate_size == 96


def test_dpo_reference_from_a_minimind_state_dict_takes_the_policy_shape(packed_sample, tmp_path):
    from train.run import main

    data = Path(shutil.copytree(packed_sample["dpo"], tmp_path / "dpo"))  # reference log-probs go beside it
    policy, ref = tmp_path / "sft.pth", tmp_path / "ref.pth"
    torch.save(minimind_state_dict(False, seed=1), policy)
    torch.save(minimind_state_dict(False, seed=2), ref)
    shape = ["--model", "tiny", *(f"--model-arg={a}" for a in MINIMIND_ARGS[False])]
    assert main(["--stage", "dpo", "--data", str(data), "--out", str(tmp_path / "run"), "--init-from", str(policy),
                 "--ref-from", str(ref), *shape, "--batch-size", "2", "--grad-accum", "1", "--max-steps", "1",
                 "--eval-every", "0", "--val-rows", "2", "--no-progress"]) == 0
    ckpt = loading.load(tmp_path / "run")
    want = loading.load(ref, options=loading.SourceOptions(ckpt.model_config)).source_record()
    assert ckpt.reference == want and ckpt.reference.path == str(ref)
    assert ckpt.init_from.path == str(policy)
