"""bin/export: the transformers folder gives our logits, greedy tokens and chat rendering; the GGUF file
holds llama.cpp's metadata / vocabulary and weights whose llama.cpp-style forward pass (adjacent-pair
RoPE on the permuted q/k rows) gives our logits; an MoE no class computes, LoRA and bad input are refused in
one line."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.chat_template import SPECIAL_TOKENS, STRUCTURE_TAGS, render_text
from core.files import OutputClash
from core.tokenizer import load_tokenizer
from model import ModelConfig, TinyLM
from model.export_gguf import permute_rotary
from model.export_hf import ExportError
from model.generate import generate
from serve.export import ToolError, export
from train import loading
from train.checkpoint import Checkpoint
from train.loading import load_model

ROOT = Path(__file__).resolve().parents[1]


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative name -> digest)."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
TOKENIZER = ROOT / "data" / "tokenizer" / "tokenizer.json"
PY = sys.executable

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "你是一个有帮助的助手。"}, {"role": "user", "content": "你好，介绍一下北京。"},
     {"role": "assistant", "content": "北京是中国的首都。"}, {"role": "user", "content": "还有呢？ <think>"}],
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is faster, immune to busy cores


def make_checkpoint(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random tiny checkpoint whose weights (norms included) are far from their initial values."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("tiny", **overrides)
    model = TinyLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return Checkpoint.of(model, load_tokenizer(TOKENIZER), step=5, stage="sft").save(folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, kw in {"tied": {}, "untied": {"tie_word_embeddings": False, "num_key_value_heads": 1,
                                            "rope_theta": 1e4}}.items():
        make_checkpoint(root / name, seed=len(name), **kw)
        out[name] = root / name
    return out


# ---- transformers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_hf_export_matches_logits_generation_and_template(runs, kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open

    trained = load_model(runs[kind])
    out = tmp_path / "hf"
    export(trained, "hf", out, "f32")
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == trained.config.rope_theta and config["dtype"] == "float32"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in set(f.keys())) == (kind == "untied")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 0]

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = trained.model
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.tie_word_embeddings == (kind == "tied")
    ids = torch.randint(0, trained.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(input_ids=ids).logits.float() - ours(ids).logits).abs().max().item()
    assert diff < 1e-4, f"max abs logit diff {diff}"

    tok = transformers.AutoTokenizer.from_pretrained(out)
    for turns in CONVERSATIONS:
        for gen in (False, True):
            assert tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=gen) == render_text(turns, gen)
    prompt = trained.tokenizer.tokenizer.encode(render_text(CONVERSATIONS[1], True), add_special_tokens=False).ids
    assert tok(render_text(CONVERSATIONS[1], True), add_special_tokens=False)["input_ids"] == prompt

    mine = generate(ours, prompt, max_new_tokens=16, temperature=0.0, stop_ids=[2, 0])
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    if theirs and theirs[-1] in (2, 0):  # transformers returns the eos it stopped at; ours does not
        theirs = theirs[:-1]
    assert len(mine) > 0 and mine == theirs


def test_hf_export_replaces_an_earlier_export(runs, tmp_path):
    out = tmp_path / "hf"
    export(load_model(runs["tied"]), "hf", out, "f16")
    export(load_model(runs["untied"]), "hf", out, "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_hf_export_never_deletes_a_file_it_did_not_write(runs, tmp_path):
    """A folder holding anything but an earlier export's files is refused, and keeps every file."""
    out = tmp_path / "hf"
    export(load_model(runs["tied"]), "hf", out, "f16")
    (out / "stray.txt").write_text("mine")
    before = hashes(out)
    with pytest.raises(OutputClash, match=r"--out holds files bin/export did not write \(stray.txt\)"):
        export(load_model(runs["untied"]), "hf", out, "bf16")
    assert hashes(out) == before


# ---- GGUF -------------------------------------------------------------------------------------------------

def rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_adjacent(x: np.ndarray, theta: float) -> np.ndarray:
    """llama.cpp's ``llama`` RoPE (mode 0): rotate pairs (2i, 2i+1) by pos * theta^(-2i/d). x [heads, T, d]."""
    d, t = x.shape[-1], x.shape[-2]
    ang = np.arange(t)[:, None] * theta ** (-np.arange(0, d, 2) / d)[None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def rope_neox(x: np.ndarray, theta: float) -> np.ndarray:
    """llama.cpp's NEOX RoPE (qwen3): rotate dimension i with i + d/2. x [heads, T, d]."""
    d, t = x.shape[-1], x.shape[-2]
    ang = np.arange(t)[:, None] * theta ** (-np.arange(0, d, 2) / d)[None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    a, b = x[..., :d // 2], x[..., d // 2:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def gguf_forward(path: Path, ids: list[int]) -> np.ndarray:
    """An independent float64 numpy forward pass of the llama (or qwen3: q/k head norms, NEOX RoPE) graph read
    from the GGUF file alone."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    w = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type.name == "Q8_0" else np.array(t.data)
        w[t.name] = data.astype(np.float64).reshape([int(n) for n in reversed(t.shape)])
    arch = meta["general.architecture"]
    meta = {k.replace(f"{arch}.", "llama.", 1): v for k, v in meta.items()}
    heads, kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    eps, theta = meta["llama.attention.layer_norm_rms_epsilon"], meta["llama.rope.freq_base"]
    rope = rope_neox if arch == "qwen3" else rope_adjacent
    x = w["token_embd.weight"][ids]
    t = len(ids)
    causal = np.triu(np.full((t, t), -np.inf), 1)
    for layer in range(meta["llama.block_count"]):
        p = f"blk.{layer}."
        h = rms(x, w[p + "attn_norm.weight"], eps)
        q = (h @ w[p + "attn_q.weight"].T).reshape(t, heads, -1).transpose(1, 0, 2)
        k = (h @ w[p + "attn_k.weight"].T).reshape(t, kv, -1).transpose(1, 0, 2)
        v = (h @ w[p + "attn_v.weight"].T).reshape(t, kv, -1).transpose(1, 0, 2)
        if arch == "qwen3":
            q, k = rms(q, w[p + "attn_q_norm.weight"], eps), rms(k, w[p + "attn_k_norm.weight"], eps)
        q, k = rope(q, theta), rope(k, theta)
        k, v = np.repeat(k, heads // kv, axis=0), np.repeat(v, heads // kv, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1]) + causal
        s = np.exp(s - s.max(-1, keepdims=True))
        y = (s / s.sum(-1, keepdims=True)) @ v
        x = x + y.transpose(1, 0, 2).reshape(t, -1) @ w[p + "attn_output.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"], eps)
        gate = h @ w[p + "ffn_gate.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    head = w.get("output.weight", w["token_embd.weight"])
    return rms(x, w["output_norm.weight"], eps) @ head.T


def test_permute_rotary_turns_rotate_half_into_adjacent_pairs():
    d = 8
    w = np.arange(2 * d)[:, None].astype(float)  # two heads, row r holds r
    assert permute_rotary(w, 2)[:d, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert permute_rotary(w, 2)[d:, 0].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_gguf_metadata_vocab_and_llama_forward(runs, kind, tmp_path):
    gguf = pytest.importorskip("gguf")
    trained = load_model(runs[kind])
    cfg = trained.config
    out = tmp_path / "m.gguf"
    written = export(trained, "gguf", out, "f32")
    assert written == [out, tmp_path / "Modelfile"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "m.gguf"]
    reader = gguf.GGUFReader(out)
    f = {k: v.contents() for k, v in reader.fields.items()}
    assert f["general.architecture"] == "llama" and f["general.file_type"] == 0
    assert (f["llama.context_length"], f["llama.embedding_length"], f["llama.block_count"],
            f["llama.feed_forward_length"], f["llama.attention.head_count"], f["llama.attention.head_count_kv"],
            f["llama.rope.dimension_count"], f["llama.vocab_size"]) == (
        cfg.max_position_embeddings, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size,
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size)
    assert f["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.eot_token_id"],
            f["tokenizer.ggml.padding_token_id"]) == (1, 2, 2, 0)
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.ggml.add_eos_token"] is False
    tok = trained.tokenizer.tokenizer
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size and all(tokens[i] == tok.id_to_token(i) for i in range(len(tokens)))
    types = f["tokenizer.ggml.token_type"]
    n = len(SPECIAL_TOKENS)  # control, user-defined (the structure tags), normal
    assert types[:n] == [3, 3, 3] + [4] * len(STRUCTURE_TAGS) and set(types[n:]) == {1}
    spec = json.loads(TOKENIZER.read_text())
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in spec["model"]["merges"]]
    assert f["tokenizer.chat_template"] == trained.tokenizer.path.with_name("chat_template.jinja").read_text()
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (kind == "untied") and len(names) == 2 + 9 * cfg.num_hidden_layers + (
        kind == "untied")

    ids = torch.randint(0, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = trained.model(ids[None]).logits[0].double().numpy()
    diff = np.abs(gguf_forward(out, ids.tolist()) - ours).max()
    assert diff < 1e-4, f"llama-graph logits differ by {diff}"


@pytest.mark.parametrize("qk_norm", [True, False])
def test_stated_head_dim_and_qk_norm_in_gguf(tmp_path, qk_norm):
    """A qk_norm model is llama.cpp's qwen3; head_dim 32 != 64 / 4 heads is stated (key/value_length)."""
    gguf = pytest.importorskip("gguf")
    trained = load_model(make_checkpoint(tmp_path / "q", seed=3, qk_norm=qk_norm, head_dim=32))
    cfg = trained.config
    out = tmp_path / "q.gguf"
    export(trained, "gguf", out, "f32", write_modelfile=False)
    reader = gguf.GGUFReader(out)
    f = {k: v.contents() for k, v in reader.fields.items()}
    arch = "qwen3" if qk_norm else "llama"
    assert f["general.architecture"] == arch
    assert (f[f"{arch}.attention.key_length"], f[f"{arch}.attention.value_length"],
            f[f"{arch}.rope.dimension_count"], f[f"{arch}.embedding_length"]) == (32, 32, 32, 64)
    names = {t.name for t in reader.tensors}
    assert ({"blk.0.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= names) == qk_norm
    assert len(names) == 2 + (11 if qk_norm else 9) * cfg.num_hidden_layers
    ids = torch.randint(0, cfg.vocab_size, (30,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours = trained.model(ids[None]).logits[0].double().numpy()
    diff = np.abs(gguf_forward(out, ids.tolist()) - ours).max()
    assert diff < 1e-4, f"qwen3-graph logits differ by {diff}"


def test_gguf_f16_and_q8_0(runs, tmp_path):
    gguf = pytest.importorskip("gguf")
    trained = load_model(runs["tied"])
    ids = torch.randint(0, trained.config.vocab_size, (24,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        ours = trained.model(torch.tensor([ids])).logits[0].double().numpy()
    sizes = {}
    for dtype, want, tol in (("f16", "F16", 0.02), ("q8_0", "Q8_0", 0.1)):
        out = tmp_path / f"m-{dtype}.gguf"
        export(trained, "gguf", out, dtype, write_modelfile=False)
        sizes[dtype] = out.stat().st_size
        reader = gguf.GGUFReader(out)
        kinds = {t.name: t.tensor_type.name for t in reader.tensors}
        assert kinds["token_embd.weight"] == want and kinds["blk.1.ffn_down.weight"] == want
        assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["output_norm.weight"] == "F32"
        rel = np.abs(gguf_forward(out, ids) - ours).max() / np.abs(ours).max()
        assert rel < tol, f"{dtype}: relative logit error {rel}"
    assert sizes["q8_0"] < sizes["f16"]
    assert not (tmp_path / "Modelfile").exists()


# ---- refusals -----------------------------------------------------------------------------------------------

def test_moe_is_refused_where_the_format_has_no_matching_class(tmp_path):
    """A shared expert with q/k norms: no transformers class; a shared expert: no llama.cpp class (the
    exportable MoE shapes are tests/test_moe_interop.py's)."""
    make_checkpoint(tmp_path / "moe", num_experts=4, qk_norm=True, head_dim=32)
    for fmt, words in (("hf", "no transformers class has both"), ("gguf", "mixture-of-experts.*qwen2moe")):
        with pytest.raises(ExportError, match=words) as e:
            export(load_model(tmp_path / "moe"), fmt, tmp_path / f"moe.{fmt}", "f32")
        assert "field 'n_shared_experts'" in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / f"moe.{fmt}").exists()


def test_lora_checkpoint_exports_merged(runs, tmp_path):
    """An adapter-only checkpoint is merged into its recorded base: transformers gives the LoRA model's logits."""
    transformers = pytest.importorskip("transformers")
    from model.lora import LoRAConfig, apply_lora, lora_parameters, lora_state_dict

    base = loading.load(runs["tied"])
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    model = load_model(runs["tied"]).model
    apply_lora(model, lora)
    with torch.no_grad():
        for _, p in lora_parameters(model):
            p.normal_(0.0, 0.3)  # lora_B starts at 0: make the update real
    adapter = dataclasses.replace(base, model=lora_state_dict(model), lora=lora, base=base.source_record(), step=9)
    adapter.save(tmp_path / "lora")

    export(load_model(tmp_path / "lora"), "hf", tmp_path / "hf", "f32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 6400, (1, 32), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        adapted = model.eval()(ids).logits
        plain = load_model(runs["tied"]).model(ids).logits
        assert (hf(input_ids=ids).logits - adapted).abs().max().item() < 1e-4
    assert (adapted - plain).abs().max().item() > 1e-2  # the adapter changed the model


def test_errors_are_one_line_and_leave_nothing(runs, tmp_path):
    trained = load_model(runs["tied"])
    with pytest.raises(ToolError, match=r"--dtype bf16: gguf export takes f32, f16, q8_0"):
        export(trained, "gguf", tmp_path / "b.gguf", "bf16")
    with pytest.raises(ToolError, match=r"--dtype q8_0: hf export takes f32, f16, bf16"):
        export(trained, "hf", tmp_path / "b", "q8_0")
    with pytest.raises(ToolError, match="is a directory; give the .gguf file"):
        export(trained, "gguf", tmp_path, "f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    cli = [PY, str(ROOT / "bin" / "export"), "--quiet"]
    proc = subprocess.run([*cli, "--ckpt", str(tmp_path / "nope"), "--format", "hf", "--out", str(tmp_path / "a")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"bin/export: error: {tmp_path / 'nope'}: no such checkpoint file or run folder"
    ok = subprocess.run([*cli, "--ckpt", str(runs["tied"]), "--format", "gguf", "--out", str(tmp_path / "t.gguf")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "t.gguf"]
    assert "FROM ./t.gguf" in (tmp_path / "Modelfile").read_text()


def run_export(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(ROOT / "bin" / "export"), "--quiet", *map(str, args)], capture_output=True,
                          text=True)


@pytest.mark.parametrize("case", ["unrelated_folder", "run_folder", "gguf_is_checkpoint", "modelfile_is_input"])
def test_export_never_replaces_an_input_or_a_foreign_folder(runs, tmp_path, case):
    """bin/export onto a folder with an unrelated file, onto the run folder it exports, or a GGUF (or its
    Modelfile) onto the checkpoint: exit 1, one line naming the path, no file changed."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["tied"], run)
    ckpt = next(run.glob("ckpt_*.pt"))
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    fmt, out = {"unrelated_folder": ("hf", other), "run_folder": ("hf", run),
                "gguf_is_checkpoint": ("gguf", ckpt), "modelfile_is_input": ("gguf", run / "m.gguf")}[case]
    if case == "modelfile_is_input":
        (run / "Modelfile").unlink(missing_ok=True)
        (run / "Modelfile").hardlink_to(ckpt)  # the Modelfile beside --out is the checkpoint itself
    before = hashes(tmp_path)
    proc = run_export("--ckpt", ckpt if case == "modelfile_is_input" else run, "--format", fmt, "--out", out)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bin/export: error: ") and "Traceback" not in proc.stderr
    assert str(out if case != "modelfile_is_input" else run / "Modelfile") in lines[0]
    assert hashes(tmp_path) == before


def test_gguf_and_modelfile_are_published_together(runs, tmp_path, monkeypatch):
    """A failure while publishing the Modelfile leaves the earlier GGUF and Modelfile as they were."""
    import os

    import core.files

    trained = load_model(runs["tied"])
    out = tmp_path / "m.gguf"
    export(trained, "gguf", out, "f32")
    before = hashes(tmp_path)
    real = os.replace

    def failing(src, dst):
        if Path(dst).name == "Modelfile" and ".old." not in str(src):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(core.files.os, "replace", failing)
    with pytest.raises(core.files.FileWriteError, match="Modelfile: cannot write"):
        export(trained, "gguf", out, "f16")
    monkeypatch.undo()
    assert hashes(tmp_path) == before
