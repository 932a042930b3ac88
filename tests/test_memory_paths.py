"""The memory-saving training paths compute today's function exactly.

- Logits only where the loss is (``model/head.py``, ``train.stages.supervised_forward``): every stage's
  loss and every parameter gradient equal those computed from full [B, T, V] logits with the objective
  written out here (float64 tiny models, chunks of a few positions so there are many).
- Per-block activation checkpointing (``TinyLM.activation_checkpointing``): same loss and gradients for
  every stage, with dropout, MoE and LoRA, compiled, and under 2-process DDP.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, TinyLM, head
from model.lora import LoRAConfig, apply_lora
from train.data import Batch, PackedDataset
from train.metrics import read_metrics
from train.run import main
from train.stages import StepNorm, build_stage, forward, token_cross_entropy
from train.stages.distill import token_kl
from train.stages.dpo import DPODataset, dpo_terms, valid_pairs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(ModelConfig.from_preset("tiny", **overrides)).to(dtype)


def data_for(stage: str, packed: dict[str, Path]) -> tuple[PackedDataset, Batch]:
    folder = {"pretrain": "pretrain", "sft": "sft", "reason": "reason", "dpo": "dpo", "distill": "sft"}[stage]
    dataset = (DPODataset if stage == "dpo" else PackedDataset)(packed[folder])
    return dataset, dataset.collate(np.arange(4))


def ready_stage(name: str, dataset: PackedDataset, batch: Batch, online: bool = False):
    """The stage with what ``setup`` would give it: DPO reference values (stored, or an online model) and a
    smaller distillation teacher over 6000 of the 6400 ids (so the vocabulary cut is exercised)."""
    stage = build_stage(name)
    if name == "dpo":
        stage.width = dataset.width
        if online:
            stage.ref_model = tiny(seed=3).eval().requires_grad_(False)
        else:
            batch.ref_doc_logps = -torch.rand(batch.input_ids.shape[0], dataset.width, dtype=torch.float64) * 50
    if name == "distill":
        stage.teacher = tiny(seed=5, hidden_size=32).eval().requires_grad_(False)
        stage.vocab = 6000
    return stage


def full_logits_loss(stage, model: TinyLM, batch: Batch, n: torch.Tensor) -> torch.Tensor:
    """The reference objective, computed from the logits of every position."""
    logits = forward(model, batch).logits
    ce = token_cross_entropy(logits, batch.targets)
    if stage.name == "dpo":
        logp = -ce * (batch.weights > 0)
        idx = batch.doc_ids.long().clamp(min=0)
        policy = torch.zeros(logp.shape[0], stage.width, dtype=logp.dtype).scatter_add_(1, idx, logp)
        if stage.ref_model is not None:
            ref_ce = token_cross_entropy(forward(stage.ref_model, batch).logits, batch.targets)
            ref = torch.zeros_like(policy).scatter_add_(1, idx, -ref_ce * (batch.weights > 0))
        else:
            ref = batch.ref_doc_logps
        losses, _ = dpo_terms(policy, ref, stage.beta)
        return (losses * valid_pairs(batch, stage.width).float()).sum() / n
    if stage.name == "distill":
        kl = token_kl(forward(stage.teacher, batch).logits, logits, stage.temperature, stage.vocab)
        return (stage.alpha * (ce * batch.weights).sum() / n
                + (1 - stage.alpha) * stage.temperature ** 2 * (kl * batch.weights).sum() / n)
    return (ce * batch.weights).sum() / n


def loss_and_grads(fn, model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_same(a: tuple, b: tuple, tol: float) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert abs(loss_a.item() - loss_b.item()) < tol, (loss_a.item(), loss_b.item())
    assert sorted(grads_a) == sorted(grads_b) and grads_a
    for k in grads_a:
        diff = (grads_a[k] - grads_b[k]).abs().max().item()
        assert diff < tol, f"{k}: max abs gradient difference {diff}"


CASES = [("pretrain", False), ("sft", False), ("reason", False), ("dpo", False), ("dpo", True), ("distill", False)]


@pytest.mark.parametrize(("name", "online"), CASES)
def test_supervised_head_equals_full_logits(packed_sample, monkeypatch, name, online):
    monkeypatch.setattr(head, "CHUNK", 37)  # many chunks, the last one short
    dataset, batch = data_for(name, packed_sample)
    stage = ready_stage(name, dataset, batch, online)
    model = tiny()
    n = stage.count(batch).double().clamp(min=1.0)
    supervised = (batch.weights > 0).sum().item()
    assert 37 < supervised <= batch.weights.numel()  # several chunks
    assert (supervised == batch.weights.numel()) == (name == "pretrain")  # else positions the head skips
    new = loss_and_grads(lambda: stage.loss(model, batch, StepNorm(n, 1))[0], model)
    old = loss_and_grads(lambda: full_logits_loss(stage, model, batch, n), model)
    assert_same(new, old, 1e-6)
    assert new[0].item() > 0.1
    with torch.no_grad():  # evaluation runs the same head
        sums = stage.eval_sums(model, batch)
    key = "loss" if name == "dpo" else "nats"
    norm = sums["pairs"] if name == "dpo" else sums["tokens"]
    if name != "distill":
        assert abs((sums[key] / norm).item() - old[0].item() * n.item() / norm.item()) < 1e-6


def test_chunked_head_never_holds_all_logits(monkeypatch):
    """At most one chunk's logits exist at a time, in forward and in backward (the recomputation)."""
    seen: list[int] = []
    real = head.head_logits

    def spy(hidden, weight):
        seen.append(hidden.shape[0])
        return real(hidden, weight)

    monkeypatch.setattr(head, "head_logits", spy)
    h = torch.randn(100, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (100,))
    saved: list[int] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        ce = head.selected_cross_entropy(h, w, t, chunk=30)
    assert max(saved) <= h.numel() < 30 * 50  # kept for backward: inputs only, not even one chunk's logits
    ce.sum().backward()
    assert seen[:4] == [30, 30, 30, 10] and sorted(seen[4:]) == [10, 30, 30, 30]  # each chunk recomputed once
    ref_h, ref_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy((ref_h @ ref_w.T).float(), t, reduction="none")
    ref.sum().backward()
    assert torch.equal(ce, ref) and torch.allclose(h.grad, ref_h.grad, atol=1e-12)
    assert torch.allclose(w.grad, ref_w.grad, atol=1e-12)


# ---- activation checkpointing ------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "online"), CASES)
def test_activation_checkpointing_same_loss_and_grads(packed_sample, name, online):
    dataset, batch = data_for(name, packed_sample)
    stage = ready_stage(name, dataset, batch, online)
    model = tiny(dropout=0.1).train()  # dropout: the recomputation must replay the same random masks
    n = stage.count(batch).double().clamp(min=1.0)

    def run(ckpt: bool):
        model.activation_checkpointing = ckpt
        torch.manual_seed(7)
        return loss_and_grads(lambda: stage.loss(model, batch, StepNorm(n, 1))[0], model)

    assert_same(run(True), run(False), 1e-10)


@pytest.mark.parametrize("variant", ["moe", "lora"])
def test_activation_checkpointing_with_moe_and_lora(packed_sample, variant):
    dataset, batch = data_for("sft", packed_sample)
    stage = ready_stage("sft", dataset, batch)
    if variant == "moe":
        torch.manual_seed(0)
        model = TinyLM(ModelConfig.from_preset("tiny-moe")).double()
        stage.moe = True
    else:
        model = apply_lora(tiny(), LoRAConfig(4, 8.0))
        torch.nn.init.normal_(model.model.layers[0].self_attn.q_proj.lora_B, std=0.1)
    n = stage.count(batch).double()

    def run(ckpt: bool):
        model.activation_checkpointing = ckpt
        return loss_and_grads(lambda: stage.loss(model, batch, StepNorm(n, 1))[0], model)

    with_ckpt, plain = run(True), run(False)
    assert_same(with_ckpt, plain, 1e-10)
    if variant == "lora":
        assert all(k.endswith(("lora_A", "lora_B")) for k in plain[1])


def test_activation_checkpointing_compiled(packed_sample):
    """torch.compile over the checkpointed blocks gives the eager loss and gradients (float32). The
    ``aot_eager`` backend traces forward and backward as inductor would (dynamo + AOTAutograd, where the
    checkpointed blocks become recomputed subgraphs) without the slow C++ code generation."""
    dataset, batch = data_for("sft", packed_sample)
    stage = ready_stage("sft", dataset, batch)
    model = tiny(dtype=torch.float32, num_hidden_layers=1)
    n = stage.count(batch).float()
    eager = loss_and_grads(lambda: stage.loss(model, batch, StepNorm(n, 1))[0], model)
    model.activation_checkpointing = True
    compiled = torch.compile(model, backend="aot_eager")
    assert_same(loss_and_grads(lambda: stage.loss(compiled, batch, StepNorm(n, 1))[0], model), eager, 1e-5)


def test_activation_checkpointing_flag_under_ddp(packed_sample, tmp_path):
    """``--activation-checkpointing`` end to end: 2 DDP processes on packed SFT rows follow the loss curve
    of one process without it (global batch 4 = 2 x 1 x 2 = 4 x 1 x 1)."""
    common = ["--stage", "sft", "--data", str(packed_sample["sft"]), "--model", "tiny", "--max-steps", "3",
              "--save-every", "0", "--eval-every", "0", "--log-every", "1", "--lr", "3e-3", "--val-rows", "4",
              "--no-progress", "--grad-accum", "1"]
    single = tmp_path / "single"
    assert main([*common, "--out", str(single), "--batch-size", "4"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train" / "run.py"), *common, "--out", str(tmp_path / "ddp"),
                           "--batch-size", "2", "--activation-checkpointing"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "activation checkpointing" in proc.stdout
    one = {r["step"]: r["loss"] for r in read_metrics(single) if "loss" in r}
    two = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ddp") if "loss" in r}
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert abs(one[step] - two[step]) < 1e-5, (step, one[step], two[step])


@pytest.mark.parametrize("flag,calls", [((), 0), (("--release-memory",), 1), (("--activation-checkpointing",), 1),
                                        (("--activation-checkpointing", "--no-release-memory"), 0)])
def test_release_memory_is_opt_in(monkeypatch, flag, calls):
    """glibc's mmap policy costs page faults on every step: --release-memory applies it, and so does
    --activation-checkpointing (both trade time for memory) unless --no-release-memory."""
    from train import run as run_mod

    seen = []
    monkeypatch.setattr(run_mod, "return_freed_memory", lambda: seen.append(1) or True)
    monkeypatch.setattr(run_mod, "run", lambda args, info: 0)
    assert run_mod.main(["--stage", "pretrain", "--data", "x", "--out", "y", "--device", "cpu", *flag]) == 0
    assert len(seen) == calls
