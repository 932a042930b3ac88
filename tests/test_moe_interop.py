"""MoE in and out: tinylm MoE models export to transformers' Qwen3-MoE (routed experts only, q/k norms) and
Qwen2-MoE (a shared expert) with transformers' logits, those folders and transformers' own (fused or per-expert
experts) load back, MiniMind-3-MoE ``.pth`` state dicts load with MiniMind's top-1 routing; what no class
expresses is one line naming the field or tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.tokenizer import load_tokenizer
from model import ModelConfig
from model.config import ConfigError
from model.export_hf import ExportError
from model.transformer import MoE, TinyLM
from serve.export import export
from train import loading
from train.checkpoint import Checkpoint, CheckpointError
from train.loading import SourceOptions, load_model

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizer"
VOCAB = load_tokenizer(TOKENIZER).vocab_size
IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))

pytestmark = pytest.mark.usefixtures("one_thread")

# MiniMind-3-MoE's routing at test size: 4 experts, top-1 renormalised, no shared expert, q/k norms
MINIMIND_MOE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=96, max_position_embeddings=256, vocab_size=VOCAB, rope_theta=1e6)


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights far from their init (norms too), so a wrong mapping cannot hide."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.2)
    return model.eval()


def tinylm_run(folder: Path, seed: int = 0, **fields) -> tuple[Path, TinyLM]:
    model = randomised(TinyLM(ModelConfig.from_preset("tiny-moe", **fields)), seed)
    Checkpoint.of(model, load_tokenizer(TOKENIZER), step=1, stage="sft").save(folder)
    return folder, model


def logits_diff(ours: torch.nn.Module, theirs: torch.nn.Module) -> float:
    with torch.no_grad():
        return (ours(IDS).logits - theirs(input_ids=IDS).logits.float()).abs().max().item()


def hf_moe(arch: str, seed: int = 0, **extra):
    """A random transformers MoE model over the shipped tokenizer's vocabulary, fp32, eager attention."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  num_experts=4, num_experts_per_tok=2, tie_word_embeddings=True, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attn_implementation="eager")
    common.update(extra)
    if arch == "qwen2_moe":
        conf = transformers.Qwen2MoeConfig(**{"qkv_bias": False, "shared_expert_intermediate_size": 96, **common})
        return randomised(transformers.Qwen2MoeForCausalLM(conf), seed)
    return randomised(transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**{"head_dim": 32, **common})), seed)


def save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    shutil.copy(TOKENIZER / "tokenizer.json", folder / "tokenizer.json")
    return folder


# ---- routing semantics ------------------------------------------------------------------------------------

def minimind_moe_forward(block: MoE, x: torch.Tensor, top_k: int, norm_topk_prob: bool) -> torch.Tensor:
    """MiniMind's ``MOEFeedForward.forward`` (model/model_minimind.py), with this block's weights."""
    flat = x.reshape(-1, x.shape[-1])
    scores = torch.softmax(block.gate(flat), dim=-1)
    weight, idx = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    if norm_topk_prob:
        weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
    y = torch.zeros_like(flat)
    for i, expert in enumerate(block.experts):
        mask = idx == i
        if mask.any():
            token = mask.any(dim=-1).nonzero().flatten()
            y.index_add_(0, token, expert(flat[token]) * weight[mask].view(-1, 1))
    return y.view(x.shape)


def test_top1_renormalisation_is_a_config_field_matching_minimind():
    cfg = ModelConfig.from_preset("minimind3-moe", **MINIMIND_MOE)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.n_shared_experts) == (4, 1, 0)
    assert cfg.norm_topk_prob and cfg.norm_top1_prob
    block = randomised(MoE(cfg), 1)
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        ours = block(x)[0]
        assert (ours - minimind_moe_forward(block, x, 1, True)).abs().max() < 1e-5
        # tinylm's default keeps a top-1 weight at the router probability: a different function
        legacy = randomised(MoE(cfg.override({"norm_top1_prob": False})), 1)
        assert (legacy(x)[0] - ours).abs().max() > 1e-3
        assert (legacy(x)[0] - minimind_moe_forward(block, x, 1, False)).abs().max() < 1e-5


def test_existing_checkpoints_keep_their_routing():
    saved = ModelConfig.from_preset("tiny-moe", num_experts_per_tok=1).to_dict()
    del saved["norm_top1_prob"]  # a config written before the field existed
    assert ModelConfig.from_dict(saved).norm_top1_prob is False
    assert ModelConfig().norm_top1_prob is False


def test_norm_top1_without_norm_topk_is_refused_naming_the_field():
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_preset("tiny-moe", norm_topk_prob=False, norm_top1_prob=True)
    assert e.value.field == "norm_top1_prob"


# ---- export: tinylm -> transformers -> tinylm ------------------------------------------------------------

EXPORTS = {  # name: (tinylm fields, transformers class)
    "qwen3_moe-top2": (dict(qk_norm=True, head_dim=32, n_shared_experts=0), "Qwen3MoeForCausalLM"),
    "qwen3_moe-top1-renorm": (dict(qk_norm=True, head_dim=32, n_shared_experts=0, num_experts_per_tok=1,
                                   norm_top1_prob=True), "Qwen3MoeForCausalLM"),
    "qwen3_moe-top1-raw": (dict(qk_norm=True, head_dim=32, n_shared_experts=0, num_experts_per_tok=1),
                           "Qwen3MoeForCausalLM"),
    "qwen2_moe-shared": (dict(tie_word_embeddings=False), "Qwen2MoeForCausalLM"),  # the tiny-moe preset
    "qwen2_moe-2shared": (dict(n_shared_experts=2, num_experts_per_tok=1), "Qwen2MoeForCausalLM"),
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_matches_transformers_and_imports_back(name, tmp_path):
    fields, arch = EXPORTS[name]
    run, model = tinylm_run(tmp_path / "run", **fields)
    cfg = model.config
    out = tmp_path / "hf"
    export(load_model(run), "hf", out, "f32")
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == [arch]
    assert conf["norm_topk_prob"] == (cfg.norm_topk_prob and (cfg.num_experts_per_tok > 1 or cfg.norm_top1_prob))
    tensors = safetensors_torch.load_file(str(out / "model.safetensors"))
    e, i, h = cfg.num_experts, cfg.intermediate_size, cfg.hidden_size
    assert tensors["model.layers.1.mlp.gate.weight"].shape == (e, h)
    assert tensors["model.layers.1.mlp.experts.gate_up_proj"].shape == (e, 2 * i, h)
    assert tensors["model.layers.1.mlp.experts.down_proj"].shape == (e, h, i)
    sd = model.state_dict()
    assert torch.equal(tensors["model.layers.1.mlp.experts.gate_up_proj"][2, i:],
                       sd["model.layers.1.mlp.experts.2.up_proj.weight"])
    assert not any(".experts.0." in k or "shared_experts" in k for k in tensors)
    if arch == "Qwen2MoeForCausalLM":
        assert torch.equal(tensors["model.layers.0.mlp.shared_expert_gate.weight"], torch.zeros(1, h))
        assert tensors["model.layers.0.mlp.shared_expert.up_proj.weight"].shape == (cfg.n_shared_experts * i, h)
    hf = getattr(transformers, arch).from_pretrained(out, attn_implementation="eager").eval()
    assert logits_diff(model, hf) < 1e-4
    back = loading.load(out)
    # top-1 without norm_top1_prob is not renormalised: it comes back as norm_topk_prob false, the same function
    same = cfg.override({"norm_topk_prob": False}) if name in ("qwen3_moe-top1-raw", "qwen2_moe-2shared") else cfg
    assert back.model_config == same
    assert set(back.model) == set(sd) and all(torch.equal(back.model[k], sd[k]) for k in sd)


def test_bf16_export_round_trips_the_tensors(tmp_path):
    run, model = tinylm_run(tmp_path / "run")
    export(load_model(run), "hf", tmp_path / "hf", "bf16")
    back = loading.load(tmp_path / "hf").model
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v.to(torch.bfloat16)), k


# ---- import: transformers' own folders and MiniMind-3-MoE state dicts ---------------------------------------

@pytest.mark.parametrize(("arch", "extra"), [
    ("qwen3_moe", {}), ("qwen3_moe", {"norm_topk_prob": True}),
    ("qwen3_moe", {"num_experts_per_tok": 1, "norm_topk_prob": True}), ("qwen2_moe", {"tie_word_embeddings": False}),
])
def test_transformers_moe_folder_gives_transformers_logits(arch, extra, tmp_path):
    hf = hf_moe(arch, **extra)
    if arch == "qwen2_moe":
        with torch.no_grad():
            for layer in hf.model.layers:
                layer.mlp.shared_expert_gate.weight.zero_()
    folder = save(hf, tmp_path / "hf")
    ckpt = loading.load(folder)
    assert ckpt.model_config.is_moe and ckpt.model_config.intermediate_size == 48
    assert ckpt.model_config.n_shared_experts == (2 if arch == "qwen2_moe" else 0)
    assert logits_diff(load_model(folder).model, hf) < 1e-4


def per_expert(state: dict[str, torch.Tensor], layers: int, experts: int) -> dict[str, torch.Tensor]:
    """transformers 5's fused experts split into per-expert tensors (MiniMind's and transformers 4's layout)."""
    out = dict(state)
    for n in range(layers):
        p = f"model.layers.{n}.mlp.experts"
        gate_up, down = out.pop(f"{p}.gate_up_proj"), out.pop(f"{p}.down_proj")
        width = gate_up.shape[1] // 2
        for e in range(experts):
            out[f"{p}.{e}.gate_proj.weight"] = gate_up[e, :width].clone()
            out[f"{p}.{e}.up_proj.weight"] = gate_up[e, width:].clone()
            out[f"{p}.{e}.down_proj.weight"] = down[e].clone()
    return out


def test_per_expert_folder_loads_like_the_fused_one(tmp_path):
    """transformers 5 saves per-expert tensors and holds fused ones in memory: both layouts on disk load alike."""
    hf = hf_moe("qwen3_moe", norm_topk_prob=True)
    split = save(hf, tmp_path / "split")
    on_disk = safetensors_torch.load_file(str(split / "model.safetensors"))
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in on_disk
    fused = tmp_path / "fused"
    shutil.copytree(split, fused)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert state["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 96, 64)
    safetensors_torch.save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    a, b = loading.load(fused).model, loading.load(split).model
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_minimind3_moe_state_dict_gives_transformers_logits(layout, tmp_path):
    """MiniMind-3-MoE's .pth: its names (per expert, as MOEFeedForward stores them; or fused, saved from
    transformers 5) with the minimind3-moe preset; its convert script loads the same tensors into Qwen3-MoE."""
    cfg = ModelConfig.from_preset("minimind3-moe", **MINIMIND_MOE)
    hf = hf_moe("qwen3_moe", seed=4, num_experts_per_tok=1, norm_topk_prob=True, moe_intermediate_size=96, head_dim=16,
                rms_norm_eps=cfg.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    state = {k: v.clone() for k, v in hf.state_dict().items()}  # MiniMind's tied state dict keeps lm_head
    if layout == "per-expert":
        state = per_expert(state, 2, 4)
        assert "model.layers.0.mlp.experts.3.down_proj.weight" in state
    torch.save(state, tmp_path / "moe.pth")
    options = SourceOptions(config=cfg, tokenizer=TOKENIZER)
    lm = load_model(tmp_path / "moe.pth", options=options)
    assert logits_diff(lm.model, hf) < 1e-4
    # without MiniMind's top-1 renormalisation the same weights give other logits
    other = SourceOptions(config=cfg.override({"norm_top1_prob": False}), tokenizer=TOKENIZER)
    assert logits_diff(load_model(tmp_path / "moe.pth", options=other).model, hf) > 1e-3


# ---- refusals: one line naming the field or tensor ----------------------------------------------------------

@pytest.mark.parametrize(("fields", "words"), [
    (dict(qk_norm=True, head_dim=32), "no transformers class has both"),
    (dict(n_shared_experts=0), "no transformers class has neither"),
])
def test_inexpressible_moe_export_is_one_line_naming_the_field(fields, words, tmp_path):
    run, _ = tinylm_run(tmp_path / "run", **fields)
    with pytest.raises(ExportError) as e:
        export(load_model(run), "hf", tmp_path / "hf", "f32")
    text = str(e.value)
    assert "\n" not in text and "field 'n_shared_experts'" in text and words in text
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(("arch", "changes", "field"), [
    ("qwen3_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
    ("qwen3_moe", {"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ("qwen3_moe", {"norm_topk_prob": "yes"}, "norm_topk_prob"),
    ("qwen2_moe", {"qkv_bias": True}, "qkv_bias"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 100}, "shared_expert_intermediate_size"),
])
def test_inexpressible_moe_config_is_one_line_naming_the_field(arch, changes, field, tmp_path):
    hf = hf_moe(arch)
    folder = save(hf, tmp_path / "hf")
    conf = json.loads((folder / "config.json").read_text())
    conf.update(changes)
    (folder / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError) as e:
        loading.load(folder)
    assert "\n" not in str(e.value) and f"field '{field}'" in str(e.value)
    assert str(folder / "config.json") in str(e.value)


def test_gated_shared_expert_is_refused_naming_the_tensor(tmp_path):
    folder = save(hf_moe("qwen2_moe"), tmp_path / "hf")  # a random (token-dependent) shared_expert_gate
    with pytest.raises(CheckpointError) as e:
        loading.load(folder)
    assert "\n" not in str(e.value) and "model.layers.0.mlp.shared_expert_gate.weight" in str(e.value)


def test_wrong_fused_shape_is_refused_naming_the_tensor(tmp_path):
    cfg = ModelConfig.from_preset("minimind3-moe", **MINIMIND_MOE)
    state = {k: v.clone() for k, v in hf_moe("qwen3_moe", num_experts_per_tok=1, moe_intermediate_size=96,
                                              norm_topk_prob=True, head_dim=16).state_dict().items()}
    state["model.layers.1.mlp.experts.down_proj"] = state["model.layers.1.mlp.experts.down_proj"][:3]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        loading.load(tmp_path / "bad.pth", options=SourceOptions(config=cfg))
    assert "model.layers.1.mlp.experts.down_proj" in str(e.value) and "[3, 64, 96]" in str(e.value)


# ---- GGUF: llama.cpp's qwen3moe ------------------------------------------------------------------------------

def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope_neox(x, theta):
    d = x.shape[-1]
    angles = np.arange(x.shape[-2])[:, None] * theta ** (-np.arange(0, d, 2) / d)[None]
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))
    return x * cos + np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1) * sin


def qwen3moe_forward(path: Path, ids: list[int]) -> np.ndarray:
    """A float64 numpy forward of llama.cpp's qwen3moe graph read from the GGUF file alone: softmax router,
    top-k, weights always renormalised, stacked SwiGLU experts."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    assert meta["general.architecture"] == "qwen3moe"
    w = {t.name: np.array(t.data).astype(np.float64).reshape([int(n) for n in reversed(t.shape)])
         for t in reader.tensors}
    heads, kv = meta["qwen3moe.attention.head_count"], meta["qwen3moe.attention.head_count_kv"]
    eps, theta, k = (meta["qwen3moe.attention.layer_norm_rms_epsilon"], meta["qwen3moe.rope.freq_base"],
                     meta["qwen3moe.expert_used_count"])
    x = w["token_embd.weight"][ids]
    t = len(ids)
    for layer in range(meta["qwen3moe.block_count"]):
        p = f"blk.{layer}."
        h = _rms(x, w[p + "attn_norm.weight"], eps)
        q = (h @ w[p + "attn_q.weight"].T).reshape(t, heads, -1).transpose(1, 0, 2)
        kk = (h @ w[p + "attn_k.weight"].T).reshape(t, kv, -1).transpose(1, 0, 2)
        q, kk = _rms(q, w[p + "attn_q_norm.weight"], eps), _rms(kk, w[p + "attn_k_norm.weight"], eps)
        v = (h @ w[p + "attn_v.weight"].T).reshape(t, kv, -1).transpose(1, 0, 2)
        q, kk = _rope_neox(q, theta), _rope_neox(kk, theta)
        kk, v = np.repeat(kk, heads // kv, axis=0), np.repeat(v, heads // kv, axis=0)
        s = q @ kk.transpose(0, 2, 1) / np.sqrt(q.shape[-1]) + np.triu(np.full((t, t), -np.inf), 1)
        s = np.exp(s - s.max(-1, keepdims=True))
        x = x + ((s / s.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(t, -1) @ w[p + "attn_output.weight"].T
        h = _rms(x, w[p + "ffn_norm.weight"], eps)
        logits = h @ w[p + "ffn_gate_inp.weight"].T
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        for row in range(t):
            top = np.argsort(-probs[row])[:k]
            weights = probs[row, top] / probs[row, top].sum()
            for e, weight in zip(top, weights, strict=True):
                gate, up = w[p + "ffn_gate_exps.weight"][e] @ h[row], w[p + "ffn_up_exps.weight"][e] @ h[row]
                x[row] += weight * (w[p + "ffn_down_exps.weight"][e] @ (gate / (1 + np.exp(-gate)) * up))
    head = w.get("output.weight", w["token_embd.weight"])
    return _rms(x, w["output_norm.weight"], eps) @ head.T


@pytest.mark.parametrize("top_k", [1, 2])
def test_gguf_qwen3moe_export_matches_the_llama_cpp_graph(top_k, tmp_path):
    pytest.importorskip("gguf")
    import gguf

    run, model = tinylm_run(tmp_path / "run", qk_norm=True, head_dim=32, n_shared_experts=0,
                            num_experts_per_tok=top_k, norm_top1_prob=top_k == 1)
    out = tmp_path / "m.gguf"
    export(load_model(run), "gguf", out, "f32", write_modelfile=False)
    reader = gguf.GGUFReader(out)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    assert (meta["qwen3moe.expert_count"], meta["qwen3moe.expert_used_count"],
            meta["qwen3moe.expert_feed_forward_length"]) == (4, top_k, model.config.intermediate_size)
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    h, i = model.config.hidden_size, model.config.intermediate_size
    assert shapes["blk.1.ffn_gate_inp.weight"] == [h, 4] and shapes["blk.1.ffn_up_exps.weight"] == [h, i, 4]
    assert shapes["blk.1.ffn_down_exps.weight"] == [i, h, 4]
    ids = IDS[0].tolist()
    with torch.no_grad():
        ours = model(IDS[:1]).logits[0].double().numpy()
    assert np.abs(qwen3moe_forward(out, ids) - ours).max() < 1e-4


@pytest.mark.parametrize(("fields", "field"), [
    ({}, "n_shared_experts"),  # tiny-moe: a shared expert
    (dict(n_shared_experts=0), "qk_norm"),
    (dict(qk_norm=True, head_dim=32, n_shared_experts=0, num_experts_per_tok=1), "norm_top1_prob"),
    (dict(qk_norm=True, head_dim=32, n_shared_experts=0, norm_topk_prob=False), "norm_topk_prob"),
])
def test_gguf_moe_llama_cpp_cannot_compute_is_one_line_naming_the_field(fields, field, tmp_path):
    run, _ = tinylm_run(tmp_path / "run", **fields)
    with pytest.raises(ExportError) as e:
        export(load_model(run), "gguf", tmp_path / "m.gguf", "f32")
    assert "\n" not in str(e.value) and f"field '{field}'" in str(e.value)
    assert not (tmp_path / "m.gguf").exists()
