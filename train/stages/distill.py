"""Knowledge distillation from a frozen teacher of any size that shares the student's tokenizer.

Per supervised target position with loss weight w (the mask byte, so reasoning tags keep their weight)::

    loss = sum(w * (alpha * CE(student) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T))) / N

with ``p^T = softmax(logits / T)`` over the tokenizer's vocabulary (models may pad theirs beyond it) and
N the supervised tokens of the step (the loss contract). ``T^2`` keeps the soft-target gradient scale
independent of T (Hinton et al. 2015). A student identical to its teacher has KL exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.head import chunked, head_logits
from train import loading
from train.checkpoint import SourceRecord
from train.data import Batch
from train.options import Options, option
from train.stages.base import CrossEntropyStage, StageContext, StageError, StepNorm, Supervised, supervised_forward


def token_kl(teacher_logits: Tensor, student_logits: Tensor, temperature: float, vocab: int) -> Tensor:
    """[B, T] float32: KL(softmax(teacher / T) || softmax(student / T)) over the first ``vocab`` ids."""
    t = F.log_softmax(teacher_logits[..., :vocab].float() / temperature, dim=-1)
    s = F.log_softmax(student_logits[..., :vocab].float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1)


@dataclass(frozen=True)
class DistillOptions(Options):
    title = "distillation (--stage distill)"

    teacher: Path | None = option(None, "frozen teacher checkpoint or run folder (any size, same tokenizer)",
                                  metavar="CKPT", type=Path)
    alpha: float = option(0.5, "loss = A * CE + (1 - A) * T^2 * KL(teacher || student) (default {default})",
                          metavar="A", kind=float, low=0, high=1)
    temperature: float = option(2.0, "softmax temperature of the KL term (default {default})", metavar="T",
                                kind=float, low=0, low_open=True)


class DistillStage(CrossEntropyStage):
    """SFT / reasoning data with a teacher's soft targets: alpha * CE + (1 - alpha) * T^2 * KL."""

    name = "distill"
    dataset_stages = ("sft", "reason")
    Options = DistillOptions

    def __init__(self, byte_lengths: Tensor | None = None, options: DistillOptions | None = None, **values: Any):
        super().__init__(byte_lengths, options, **values)
        self.teacher_path = self.options.teacher
        self.alpha = float(self.options.alpha)
        self.temperature = float(self.options.temperature)
        self.teacher: nn.Module | None = None
        self.teacher_record: SourceRecord | None = None
        self.vocab = 0

    def setup(self, ctx: StageContext) -> None:
        """Load the teacher (``--teacher``, or on resume the run's recorded one) and check its tokenizer."""
        super().setup(ctx)
        recorded = ctx.resume.teacher if ctx.resume is not None else None
        path = self.teacher_path or (recorded.path if recorded is not None else None)
        if path is None:
            raise StageError("--stage distill needs --teacher CKPT (a checkpoint file or run folder)")
        ckpt = loading.load(path)
        ckpt.check_tokenizer(ctx.dataset.meta["tokenizer"]["fingerprint"], str(ctx.dataset.folder), role="teacher",
                             required=True)
        self.teacher_record = ckpt.source_record()
        if recorded is not None and recorded.fingerprint != self.teacher_record.fingerprint:
            raise StageError(f"{ckpt.path}: not the teacher this run started with (weights "
                             f"{str(recorded.fingerprint)[:12]} expected)")
        self.vocab = int(ctx.dataset.meta["tokenizer"]["vocab_size"])
        if ckpt.model_config.vocab_size < self.vocab:
            raise StageError(f"teacher {ckpt.path}: vocab_size {ckpt.model_config.vocab_size} < the "
                             f"tokenizer's {self.vocab}")
        self.teacher = loading.frozen_model(ckpt)
        ctx.say(f"distill: teacher {ckpt.path} ({self.teacher.num_params() / 1e6:.2f}M params) | alpha "
                f"{self.alpha} | temperature {self.temperature}")

    def extra_models(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher} if self.teacher is not None else {}

    def checkpoint_fields(self) -> dict[str, Any]:
        return {"teacher": self.teacher_record, "stage_options": {"alpha": self.alpha, "temperature": self.temperature}}

    def _terms(self, sup: Supervised, batch: Batch) -> tuple[Tensor, Tensor]:
        """Per position: the student's cross-entropy and its KL to the teacher, [B, T] each (0 where the
        weight is 0); both heads run per chunk of supervised positions (``model/head.py``)."""
        with torch.no_grad():
            teacher = supervised_forward(self.teacher, batch).head
        values = chunked(self._ce_kl, (sup.head.hidden, teacher.hidden, sup.selected(batch.targets)),
                         (sup.head.weight, teacher.weight))
        ce, kl = sup.per_position(values).unbind(-1)
        return ce, kl

    def _ce_kl(self, hidden: Tensor, teacher_hidden: Tensor, targets: Tensor, weight: Tensor,
               teacher_weight: Tensor) -> Tensor:
        """[n, 2]: cross-entropy and KL of one chunk of positions, from both models' hidden states."""
        logits = head_logits(hidden, weight)
        ce = F.cross_entropy(logits, targets, reduction="none")
        kl = token_kl(head_logits(teacher_hidden, teacher_weight), logits, self.temperature, self.vocab)
        return torch.stack((ce, kl), dim=-1)

    def objective(self, sup: Supervised, batch: Batch, norm: StepNorm) -> tuple[Tensor, dict[str, Tensor]]:
        ce, kl = self._terms(sup, batch)
        ce_sum = (ce * batch.weights).sum() / norm.tokens
        kl_sum = (kl * batch.weights).sum() / norm.tokens
        loss = self.alpha * ce_sum + (1.0 - self.alpha) * self.temperature ** 2 * kl_sum
        return loss, {"ce": ce_sum.detach(), "kl": kl_sum.detach()}

    def sums(self, sup: Supervised, batch: Batch) -> dict[str, Tensor]:
        ce, kl = self._terms(sup, batch)
        return {**self.ce_sums(ce, batch), "kl": (kl * batch.weights).sum()}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {**super().eval_metrics(sums), "val_kl": sums["kl"] / max(sums["tokens"], 1.0)}
