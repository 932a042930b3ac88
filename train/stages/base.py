"""The stage interface and the cross-entropy stages (pretrain, SFT, reasoning).

A :class:`Stage` chooses (1) the dataset view (which packed folders it accepts, how they are opened
and batched), (2) the loss of one micro-batch, (3) extra frozen models (DPO reference, distillation
teacher), plus its evaluation sums. Adding a stage = a subclass + an entry in ``train.stages.STAGES``.
What trains and what a checkpoint stores (all weights, or LoRA adapters) is not the stage's business:
``train/weights_policy.py``, chosen by ``train/run.py``. DDP, accumulation, compile, autocast, schedule,
clipping, logging and checkpoints live in ``train/loop.py`` and are written once.

Hooks: ``Options`` (a :class:`~train.options.Options` dataclass: the stage's own command-line flags
with their defaults and checks; any other stage's flag is a usage error), :meth:`Stage.setup` (after
the model is built: load a teacher, compute reference log-probs), :meth:`Stage.checkpoint_fields` (its
records in every checkpoint: reference, teacher, options), and the objective: :meth:`Stage.objective` /
:meth:`Stage.sums` on the :class:`Supervised` head input of :func:`supervised_forward`, the model call of
training and evaluation: the model returns hidden states at the supervised positions (weight > 0) only,
and the head and the loss run there, in chunks whose logits are recomputed in backward
(``model/head.py``), so no [B, T, V] logits exist. Positions of weight 0 contribute nothing to any
objective, so values and gradients equal those of full logits. :meth:`Stage.loss` adds the MoE
load-balance loss.

Loss contract. For a step the loop hands every micro-batch the same :class:`StepNorm`: the global
number ``tokens`` of supervised units (summed over all micro-batches of all ranks, clamped to >= 1) and
the global number of micro-batches ``micro_batches`` (accum x world). ``Stage.loss`` returns this
micro-batch's *contribution*: the step objective is the sum of the contributions of all micro-batches
of all ranks. For the cross-entropy stages (pretrain, SFT, reason)::

    contribution = sum(w * ce) / tokens + aux_loss / micro_batches

so the step loss is ``sum_all(w * ce) / N`` (N = supervised tokens of the whole step) plus the mean
MoE load-balance loss, independent of how the global batch is split into micro-batches and ranks. An
all-masked step has N clamped to 1 and a finite loss of 0 (+ aux). The metrics dict follows the same
rule (values are summed over micro-batches and ranks). Other stages define their own unit (DPO: pairs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import TinyLMError
from model.head import selected_cross_entropy
from model.transformer import HeadInput, ModelOutput
from preprocess import shards
from train.batches import Batches, TrainingData
from train.checkpoint import Checkpoint
from train.data import Batch, BatchLoader, PackedDataset, Split
from train.metrics import bits_per_byte
from train.options import Options

B = TypeVar("B", bound=Batch)  # a stage's training micro-batch
E = TypeVar("E")  # a stage's evaluation batch (rows for the supervised stages, prompt chunks for RL)


@dataclass(frozen=True)
class StepNorm:
    tokens: Tensor  # 0-dim float32 on the device: global supervised units of the step, >= 1
    micro_batches: int  # global micro-batches of the step: grad_accum * world


class StageError(TinyLMError):
    """A stage cannot run on these inputs (wrong data, missing reference, foreign teacher): one line."""


@dataclass
class StageContext:
    """What :meth:`Stage.setup` may use: the run's data, device, processes, model kind and source checkpoints."""

    dataset: TrainingData
    device: torch.device
    rank: int = 0
    world: int = 1
    batch_size: int = 8
    init: Checkpoint | None = None  # the loaded --init-from checkpoint
    resume: Checkpoint | None = None  # the loaded checkpoint being resumed
    say: Callable[..., None] = field(default=print)
    barrier: Callable[[], None] = field(default=lambda: None)
    moe: bool = False  # the trained model is a mixture of experts: its load-balance loss is added
    model: nn.Module | None = None  # the model being trained (unwrapped): the RL stage generates its rollouts


def forward(model: nn.Module, batch: Batch) -> ModelOutput:
    """Full logits [B, T, V] of a batch and the MoE aux loss (0 for dense models), for callers that need
    every position; the objectives use :func:`supervised_forward`."""
    return model(batch.input_ids, position_ids=batch.position_ids, doc_ids=batch.doc_ids)


@dataclass(frozen=True)
class Supervised:
    """The output head's input at a batch's supervised positions (weight > 0): what objectives read."""

    index: Tensor  # int64 [N]: flat positions into [B, T]
    head: HeadInput  # hidden [N, H], head weight [V, H], MoE aux loss
    shape: tuple[int, int]  # (B, T)

    def per_position(self, values: Tensor) -> Tensor:
        """Values [N] or [N, k] at the supervised positions -> [B, T] or [B, T, k], 0 elsewhere."""
        b, t = self.shape
        rest = tuple(values.shape[1:])
        return values.new_zeros((b * t, *rest)).index_put((self.index,), values).view(b, t, *rest)

    def selected(self, per_position: Tensor) -> Tensor:
        """A [B, T] tensor's entries at the supervised positions, [N]."""
        return per_position.reshape(-1)[self.index]

    def cross_entropy(self, targets: Tensor) -> Tensor:
        """[B, T] float32: cross-entropy in nats at the supervised positions, 0 elsewhere."""
        return self.per_position(selected_cross_entropy(self.head.hidden, self.head.weight, self.selected(targets)))


def supervised_forward(model: nn.Module, batch: Batch) -> Supervised:
    """The model call of every objective: hidden states at the positions of weight > 0 only."""
    index = (batch.weights.reshape(-1) > 0).nonzero().squeeze(1)
    head = model(batch.input_ids, position_ids=batch.position_ids, doc_ids=batch.doc_ids, select=index)
    return Supervised(index, head, (batch.weights.shape[0], batch.weights.shape[1]))


class Stage(Generic[B, E]):
    """Base stage over training micro-batches ``B`` and evaluation batches ``E`` (its loader's
    ``Batches[B, E]``): no extra model; the objective and its evaluation sums are left to subclasses."""

    name: ClassVar[str] = ""
    dataset_stages: ClassVar[tuple[str, ...]] = ()  # the ``meta.json`` stages this stage can read
    find_unused_parameters: ClassVar[bool] = False  # DDP flag for stages that skip parameters
    Options: ClassVar[type[Options]] = Options  # the stage's own flags (fields of an ``Options`` dataclass)
    rollouts: ClassVar[bool] = False  # reads --prompts and trains on the model's own rollouts (RL), not --data

    def __init__(self, byte_lengths: Tensor | None = None, options: Options | None = None, **values: Any):
        """``options``: the stage's options object; or its field ``values`` (the rest take their defaults)."""
        self.byte_lengths = byte_lengths  # int64 [vocab]: UTF-8 bytes per token id (for bits per byte)
        self.options = options if options is not None else self.Options(**values)
        self.moe = False

    # ---- data ---------------------------------------------------------------------------------------
    def open_dataset(self, folder: str, tokenizer_fingerprint: str | None = None,
                     verify: bool = True) -> TrainingData:
        """The packed folder, its stage checked first (from meta.json), then every shard checked against
        meta.json (``verify``: with sha256 checksums too); ShardError / StageError name the file."""
        self.check_dataset_stage(folder)
        return PackedDataset(folder, tokenizer_fingerprint, verify)

    def check_dataset_stage(self, folder: str) -> None:
        stage = shards.read_meta(Path(folder))["stage"]
        if stage not in self.dataset_stages:
            raise StageError(f"{folder}: packed for stage {stage!r}, but --stage {self.name} reads "
                             f"{' / '.join(self.dataset_stages)} data (python preprocess/pack.py --stage "
                             f"{self.dataset_stages[0]} ...)")

    def attach_source(self, dataset: Any, source: Checkpoint) -> None:
        """After the source checkpoint is resolved: prepare data that needs its tokenizer (RL prompts)."""

    def loader(self, split: Split, micro_batch: int, rank: int, world: int, seed: int,
               pin_memory: bool) -> Batches[B, E]:
        """The training/validation batches over ``split`` (DPO would keep chosen/rejected pairs together)."""
        return BatchLoader(split, micro_batch, rank, world, seed=seed, prefetch=2, pin_memory=pin_memory)

    # ---- extra models -------------------------------------------------------------------------------
    def setup(self, ctx: StageContext) -> None:
        """Runtime preparation after the model is built (subclasses: load a teacher, precompute reference
        data; they call this first)."""
        self.moe = ctx.moe

    def extra_models(self) -> dict[str, nn.Module]:
        """Frozen models the loss needs (moved to the device and set to eval by the loop)."""
        return {}

    def checkpoint_fields(self) -> dict[str, Any]:
        """:class:`~train.checkpoint.Checkpoint` fields this stage sets in every checkpoint of the run."""
        return {}

    # ---- objective --------------------------------------------------------------------------------------
    def count(self, batch: B) -> Tensor:
        """Supervised units of a micro-batch (the loss normaliser), computed on the CPU batch."""
        return (batch.weights > 0).sum()

    def loss(self, model: nn.Module, batch: B, norm: StepNorm) -> tuple[Tensor, dict[str, Tensor]]:
        """This micro-batch's contribution: the stage's objective, plus ``aux / micro_batches`` for MoE."""
        sup = supervised_forward(model, batch)
        loss, metrics = self.objective(sup, batch, norm)
        if not self.moe:
            return loss, metrics
        aux = sup.head.aux_loss.float() / norm.micro_batches
        return loss + aux, {**metrics, "aux": aux.detach()}

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: E) -> dict[str, Tensor]:
        """The validation sums of one batch (summed over batches and ranks, then :meth:`eval_metrics`); here
        for stages whose evaluation batches are rows (:meth:`sums` on the supervised forward)."""
        return self.sums(supervised_forward(model, batch), batch)

    def objective(self, sup: Supervised, batch: B, norm: StepNorm) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def sums(self, sup: Supervised, batch: E) -> dict[str, Tensor]:
        raise NotImplementedError

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError


def token_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-position cross-entropy in nats, [B, T] float32."""
    b, t, v = logits.shape
    return F.cross_entropy(logits.float().reshape(b * t, v), targets.reshape(b * t), reduction="none").view(b, t)


class CrossEntropyStage(Stage[Batch, Batch]):
    """Next-token prediction weighted by the mask: ``sum(w * ce) / N`` (+ MoE aux loss)."""

    def objective(self, sup: Supervised, batch: Batch, norm: StepNorm) -> tuple[Tensor, dict[str, Tensor]]:
        ce = (sup.cross_entropy(batch.targets) * batch.weights).sum() / norm.tokens
        return ce, ({"ce": ce.detach()} if self.moe else {})

    def sums(self, sup: Supervised, batch: Batch) -> dict[str, Tensor]:
        """Weighted nats and supervised tokens (val loss); unweighted nats and bytes of the supervised
        tokens that have bytes (special tokens have none) for bits per byte."""
        return self.ce_sums(sup.cross_entropy(batch.targets), batch)

    def ce_sums(self, ce: Tensor, batch: Batch) -> dict[str, Tensor]:
        """The evaluation sums of :meth:`sums` from per-position cross-entropy ``ce`` [B, T]."""
        sup = batch.weights > 0
        sums = {"nats": (ce * batch.weights).sum(), "tokens": sup.sum().float()}
        if self.byte_lengths is not None:
            table = self.byte_lengths.to(batch.targets.device)
            nbytes = table[batch.targets] * sup
            sums["bpb_nats"] = (ce * (nbytes > 0)).sum()
            sums["bytes"] = nbytes.sum().float()
        return sums

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        out = {"val_loss": sums["nats"] / max(sums["tokens"], 1.0), "val_tokens": int(sums["tokens"])}
        if "bytes" in sums:
            out["val_bpb"] = bits_per_byte(sums["bpb_nats"], sums["bytes"])
        return out


class PretrainStage(CrossEntropyStage):
    """Next-token loss on fixed windows of the document stream (plain causal attention)."""

    name = "pretrain"
    dataset_stages = ("pretrain",)


class SFTStage(CrossEntropyStage):
    """Loss on assistant tokens of packed conversations (per-document attention, positions restart)."""

    name = "sft"
    dataset_stages = ("sft",)


class ReasonStage(CrossEntropyStage):
    """SFT on ``<think>..</think><answer>..</answer>`` conversations: the mask's up-weighted tag bytes
    (``pack.py --stage reason --tag-weight``) multiply those tokens' cross-entropy, N counts tokens."""

    name = "reason"
    dataset_stages = ("reason",)
