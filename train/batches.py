"""What the training loop needs from its data: a source of batches (:class:`Batches`) and what a run reads
from the data it opened (:class:`TrainingData`).

Two sources implement :class:`Batches`, each on its own: packed rows (``train.data.BatchLoader``, micro-batches
``train.data.Batch``) and the RL stage's rollouts (``train.rollout.RolloutLoader``, micro-batches
``train.rollout.RolloutBatch``, evaluation chunks of prompts). The loop takes micro-batches from
:meth:`Batches.steps` on the CPU, hands each to the stage's ``count`` there, moves it with :meth:`MicroBatch.to`
and hands it to the stage's ``loss``; evaluation batches come ready for the device from
:meth:`Batches.val_batches` and go to the stage's ``eval_sums``. The loop never looks inside a batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

Micro_co = TypeVar("Micro_co", covariant=True)
Eval_co = TypeVar("Eval_co", covariant=True)


class MicroBatch(Protocol):
    """A training micro-batch: tensors the loop moves to the device before the stage's loss."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MicroBatch: ...


class Batches(Protocol[Micro_co, Eval_co]):
    """A source of the loop's batches for one rank. Sample positions are global (all ranks), so the whole
    data position of a run is one integer, ``samples_seen``."""

    shown: tuple[str, ...]
    """Keys of :meth:`step_metrics` printed on the progress line."""

    @property
    def seq_len(self) -> int:
        """Positions of the widest row a micro-batch can hold (``tokens_seen`` and FLOPs count these)."""
        ...

    @property
    def eval_rows(self) -> int:
        """Rows (or prompts) the loop's evaluation covers; 0: no evaluation."""
        ...

    def global_batch(self, accum: int) -> int:
        """Samples one optimizer step consumes over all ranks with ``accum`` micro-batches per rank."""
        ...

    def steps(self, start_sample: int, accum: int) -> Iterator[list[Micro_co]]:
        """Endless steps from global sample ``start_sample``: each this rank's ``accum`` micro-batches (CPU)."""
        ...

    def step_metrics(self, train_s: float) -> dict[str, float]:
        """Extra metrics of the step just taken (global over ranks); ``train_s`` is the step's time after its
        batches were ready."""
        ...

    def val_batches(self, device: torch.device | str) -> Iterator[Eval_co]:
        """This rank's share of the evaluation, ready for the stage's ``eval_sums`` on ``device``."""
        ...


class TrainingData(Protocol):
    """What a run reads from the data it opened, before any batch: a packed folder
    (``train.data.PackedDataset``) or the RL stage's prompts (``train.prompt_set.PromptSet``)."""

    folder: Path
    stage: str  # the stage the data was made for ("prompts": RL prompts)

    @property
    def n_rows(self) -> int:
        """Rows (packed data) or prompts."""
        ...

    @property
    def seq_len(self) -> int:
        """Positions of the widest row."""
        ...

    @property
    def meta(self) -> dict[str, Any]:
        """At least ``{"tokenizer": {fingerprint, path, vocab_size, special_ids}}`` once the tokenizer is known
        (RL prompts: after they are tokenized with the model's tokenizer; ``{}`` before)."""
        ...
