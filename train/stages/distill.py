"""Knowledge distillation from a frozen teacher of any size that shares the student's tokenizer.

Per supervised target position with loss weight w (the mask byte, so reasoning tags keep their weight)::

    loss = sum(w * (alpha * CE(student) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T))) / N

with ``p^T = softmax(logits / T)`` over the tokenizer's vocabulary (models may pad theirs beyond it) and
N the supervised tokens of the step (the loss contract). ``T^2`` keeps the soft-target gradient scale
independent of T (Hinton et al. 2015). A student identical to its teacher has KL exactly 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train import checkpoint
from train.data import Batch
from train.stages.base import CrossEntropyStage, StageContext, StageError, StepNorm, frozen_model, token_cross_entropy


def token_kl(teacher_logits: Tensor, student_logits: Tensor, temperature: float, vocab: int) -> Tensor:
    """[B, T] float32: KL(softmax(teacher / T) || softmax(student / T)) over the first ``vocab`` ids."""
    t = F.log_softmax(teacher_logits[..., :vocab].float() / temperature, dim=-1)
    s = F.log_softmax(student_logits[..., :vocab].float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1)


class DistillStage(CrossEntropyStage):
    """SFT / reasoning data with a teacher's soft targets: alpha * CE + (1 - alpha) * T^2 * KL."""

    name = "distill"
    dataset_stages = ("sft", "reason")
    default_lr = 2e-4
    options = ("teacher", "alpha", "temperature")

    def __init__(self, byte_lengths: Tensor | None = None, lora: Any = None, teacher: str | Path | None = None,
                 alpha: float | None = None, temperature: float | None = None):
        super().__init__(byte_lengths, lora)
        self.teacher_path = teacher
        self.alpha = 0.5 if alpha is None else float(alpha)
        self.temperature = 2.0 if temperature is None else float(temperature)
        if not 0.0 <= self.alpha <= 1.0:
            raise StageError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise StageError(f"--temperature must be > 0, got {self.temperature}")
        self.teacher: nn.Module | None = None
        self.teacher_record: dict[str, Any] | None = None
        self.vocab = 0

    def setup(self, ctx: StageContext) -> None:
        """Load the teacher (``--teacher``, or on resume the run's recorded one) and check its tokenizer."""
        recorded = (ctx.resume or {}).get("teacher")
        path = self.teacher_path or (recorded or {}).get("path")
        if path is None:
            raise StageError("--stage distill needs --teacher CKPT (a checkpoint file or run folder)")
        ckpt = checkpoint.load(path)
        data_fp = ctx.dataset.meta["tokenizer"]["fingerprint"]
        tok = ckpt.get("tokenizer") or {}
        if tok.get("fingerprint") != data_fp:
            raise StageError(f"teacher {ckpt['path']} uses another tokenizer ({tok.get('path')}, fingerprint "
                             f"{str(tok.get('fingerprint'))[:12]}) than dataset {ctx.dataset.folder} "
                             f"(fingerprint {data_fp[:12]}); distillation needs the same tokenizer")
        self.teacher_record = checkpoint.source_record(ckpt)
        if recorded and recorded["fingerprint"] != self.teacher_record["fingerprint"]:
            raise StageError(f"{ckpt['path']}: not the teacher this run started with (weights "
                             f"{recorded['fingerprint'][:12]} expected)")
        self.vocab = int(ctx.dataset.meta["tokenizer"]["vocab_size"])
        if ckpt["model_config"]["vocab_size"] < self.vocab:
            raise StageError(f"teacher {ckpt['path']}: vocab_size {ckpt['model_config']['vocab_size']} < the "
                             f"tokenizer's {self.vocab}")
        self.teacher = frozen_model(ckpt)
        ctx.say(f"distill: teacher {ckpt['path']} ({self.teacher.num_params() / 1e6:.2f}M params) | alpha "
                f"{self.alpha} | temperature {self.temperature}")

    def extra_models(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher} if self.teacher is not None else {}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {**super().checkpoint_meta(), "teacher": self.teacher_record,
                "distill": {"alpha": self.alpha, "temperature": self.temperature}}

    def _terms(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        logits, aux = model(batch.input_ids, position_ids=batch.position_ids, doc_ids=batch.doc_ids)
        with torch.no_grad():
            teacher_logits, _ = self.teacher(batch.input_ids, position_ids=batch.position_ids, doc_ids=batch.doc_ids)
        ce = token_cross_entropy(logits, batch.targets)
        return ce, token_kl(teacher_logits, logits, self.temperature, self.vocab), aux

    def loss(self, model: nn.Module, batch: Batch, norm: StepNorm) -> tuple[Tensor, dict[str, Tensor]]:
        ce, kl, aux = self._terms(model, batch)
        ce_sum = (ce * batch.weights).sum() / norm.tokens
        kl_sum = (kl * batch.weights).sum() / norm.tokens
        loss = self.alpha * ce_sum + (1.0 - self.alpha) * self.temperature ** 2 * kl_sum
        metrics = {"ce": ce_sum.detach(), "kl": kl_sum.detach()}
        if self.with_aux:
            aux = aux.float() / norm.micro_batches
            metrics["aux"] = aux.detach()
            loss = loss + aux
        return loss, metrics

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        ce, kl, _ = self._terms(model, batch)
        sums = self.ce_sums(ce, batch)
        sums["kl"] = (kl * batch.weights).sum()
        return sums

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {**super().eval_metrics(sums), "val_kl": sums["kl"] / max(sums["tokens"], 1.0)}
