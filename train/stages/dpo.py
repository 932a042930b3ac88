"""DPO (Rafailov et al. 2023): the sigmoid preference loss on packed (chosen, rejected) pairs.

Data. ``pack.py --stage dpo`` stores each pair as two consecutive documents (chosen at an even index,
rejected right after) and never splits a pair across rows, so a row's documents 2p and 2p+1 are pair p
and both sides of a pair are always in the same micro-batch. The mask is 1 on the final assistant turn.

Sequence log-prob of a document = sum over its supervised target tokens of ``log p(token | prefix)``
(one forward pass per packed row gives every document's value; attention never crosses documents).
With ``d = beta * ((pi_c - ref_c) - (pi_r - ref_r))`` the loss of a pair is ``-log sigmoid(d)``; ``d`` is
the *reward margin*, ``d > 0`` a correctly ranked pair (*accuracy*). A pair counts (the loss unit N of
the loss contract) when both sides have at least one supervised token.

Reference. By default ``ref_*`` come from files computed once, in one pass over the whole dataset
(train and validation rows), and stored beside the shards in ``ref_<fingerprint16>/``
(``preprocess/shards.py``), so training holds no reference model; ``online_ref=True`` keeps the frozen
model instead and computes them per batch. Both give the same loss (up to float summation order).
The reference is the ``--init-from`` checkpoint unless ``--ref-from`` names another.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from core.files import FileWriteError
from preprocess import shards
from train import dist, loading
from train.checkpoint import Checkpoint, SourceRecord
from train.data import Batch, PackedDataset
from train.options import Options, option
from train.stages.base import Stage, StageContext, StageError, StepNorm, Supervised, supervised_forward
from train.weights import state_fingerprint


@dataclass(kw_only=True)
class DPOBatch(Batch):
    """Packed pair rows; ``ref_doc_logps`` [B, D] float32: the reference's log-prob of each row's documents
    once reference values are attached (D = the most documents any row holds; absent documents and padding
    rows get 0)."""

    ref_doc_logps: Tensor | None = None


class DPODataset(PackedDataset):
    """A dpo folder whose batches (:class:`DPOBatch`) carry the stored reference log-probs once attached."""

    def __init__(self, folder: str | Path, tokenizer_fingerprint: str | None = None, verify: bool = False):
        super().__init__(folder, tokenizer_fingerprint, verify)
        for record, shard in zip(self.meta["shards"], self.shards, strict=True):
            if (np.asarray(shard.row_docs) % 2).any():
                raise shards.ShardError("a dpo row starts inside a (chosen, rejected) pair: rows must hold whole "
                                        "pairs", path=self.folder / f"{record['name']}.idx")
        self.width = self.max_row_documents()
        self.ref: list[np.ndarray] | None = None

    def collate(self, rows: np.ndarray) -> DPOBatch:
        batch = DPOBatch(**vars(super().collate(rows)))
        if self.ref is not None:
            ref = np.zeros((len(rows), self.width), dtype=np.float32)
            for i, r in enumerate(rows):
                if r >= 0:
                    s, d0, d1 = self.row_documents(int(r))
                    ref[i, :d1 - d0] = self.ref[s][d0:d1]
            batch.ref_doc_logps = torch.from_numpy(ref)
        return batch


def document_logps(sup: Supervised, batch: Batch, width: int) -> Tensor:
    """[B, width] float32: per document of each row, the summed log-prob of its supervised targets."""
    logp = -sup.cross_entropy(batch.targets)  # 0 at unsupervised positions
    return torch.zeros(logp.shape[0], width, device=logp.device).scatter_add_(1, _doc_index(batch), logp)


def _doc_index(batch: Batch) -> Tensor:
    return batch.doc_ids.long().clamp(min=0)  # padding (-1) has weight 0, so any slot works


def valid_pairs(batch: Batch, width: int) -> Tensor:
    """[B, width // 2] bool: pair p of the row exists and both of its documents have supervised tokens."""
    sup = (batch.weights > 0).float()
    counts = torch.zeros(sup.shape[0], width, device=sup.device).scatter_add_(1, _doc_index(batch), sup)
    return (counts[:, 0::2] > 0) & (counts[:, 1::2] > 0)


def dpo_terms(policy: Tensor, reference: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Per pair (columns 2p, 2p+1 of [B, D] log-probs): the loss ``-log sigmoid(d)`` and the margin ``d``."""
    margin = beta * ((policy[:, 0::2] - reference[:, 0::2]) - (policy[:, 1::2] - reference[:, 1::2]))
    return -F.logsigmoid(margin), margin


@dataclass(frozen=True)
class DPOOptions(Options):
    title = "dpo (--stage dpo)"

    beta: float = option(0.1, "DPO temperature: loss -log sigmoid(B * ((pi_c - ref_c) - (pi_r - ref_r))) "
                         "(default {default})", metavar="B", kind=float, low=0, low_open=True)
    ref_from: Path | None = option(None, "reference model (default: the --init-from checkpoint); its log-probs are "
                                   "computed once into DATA/ref_<fingerprint>/ and reused by later runs",
                                   metavar="CKPT", type=Path)
    online_ref: bool = option(False, "score every batch with the frozen reference model kept in memory instead of "
                              "stored log-probs (same loss, more memory and compute)", action="store_true")


class DPOStage(Stage[DPOBatch, DPOBatch]):
    """Direct preference optimisation on packed (chosen, rejected) pairs against a frozen reference."""

    name = "dpo"
    dataset_stages = ("dpo",)
    Options = DPOOptions

    def __init__(self, byte_lengths: Tensor | None = None, options: DPOOptions | None = None, **values: Any):
        super().__init__(byte_lengths, options, **values)
        self.beta = float(self.options.beta)
        self.online_ref = self.options.online_ref
        self.ref_from = self.options.ref_from
        self.width = 0
        self.reference: SourceRecord | None = None
        self.ref_model: nn.Module | None = None

    # ---- data ------------------------------------------------------------------------------------------
    def open_dataset(self, folder: str, tokenizer_fingerprint: str | None = None, verify: bool = True) -> DPODataset:
        stage = shards.read_meta(Path(folder))["stage"]
        if stage != "dpo":
            raise StageError(f"{folder}: packed for stage {stage!r}, but --stage dpo reads (chosen, "
                             "rejected) pairs (python preprocess/pack.py --stage dpo ...)")
        dataset = DPODataset(folder, tokenizer_fingerprint, verify)
        self.width = dataset.width
        return dataset

    # ---- reference -------------------------------------------------------------------------------------------
    def extra_models(self) -> dict[str, nn.Module]:
        return {"reference": self.ref_model} if self.ref_model is not None else {}

    def checkpoint_fields(self) -> dict[str, Any]:
        return {"reference": self.reference, "stage_options": {"beta": self.beta}}

    def setup(self, ctx: StageContext) -> None:
        """Find the reference; load it (online) or attach its stored log-probs, computing them if absent."""
        super().setup(ctx)
        dataset: DPODataset = ctx.dataset  # type: ignore[assignment]
        ref_ckpt = None
        if ctx.resume is not None and ctx.resume.reference is not None:
            self.reference = ctx.resume.reference
        else:
            ref_ckpt = self._reference_checkpoint(ctx)
            ref_ckpt.check_tokenizer(dataset.meta["tokenizer"]["fingerprint"], str(dataset.folder), role="reference")
            self.reference = ref_ckpt.source_record()
        fingerprint = self.reference.fingerprint
        ref_dir = shards.ref_folder(dataset.folder, fingerprint)
        need_model = self.online_ref or not (ref_dir / "meta.json").is_file()
        if need_model and ref_ckpt is None:
            ref_ckpt = loading.load(self.reference.path, options=_policy_shape(ctx))
            if state_fingerprint(ref_ckpt.model) != fingerprint:
                raise StageError(f"{ref_ckpt.path}: the reference checkpoint of this run has changed since it "
                                 f"started (weights fingerprint {fingerprint[:12]} expected)")
        if self.online_ref:
            self.ref_model = loading.frozen_model(ref_ckpt)
            ctx.say(f"dpo: beta {self.beta} | online reference {self.reference.path} (kept in memory)")
            return
        if need_model:
            try:
                compute_reference(loading.frozen_model(ref_ckpt).to(ctx.device), dataset, ref_dir, ctx,
                                  dataclasses.asdict(self.reference))
            except FileWriteError as e:
                raise StageError(f"{e}: the reference log-probs are stored beside the dataset; make it writable "
                                 "or pass --online-ref") from None
        dataset.ref = shards.open_ref_logps(ref_dir, fingerprint, dataset.meta)
        ctx.say(f"dpo: beta {self.beta} | reference log-probs {ref_dir} (of {self.reference.path})")

    def _reference_checkpoint(self, ctx: StageContext) -> Checkpoint:
        """``--ref-from``, else the ``--init-from`` checkpoint."""
        if self.ref_from is not None:
            return loading.load(self.ref_from, options=_policy_shape(ctx))
        if ctx.init is None:
            raise StageError("--stage dpo needs a reference model: --init-from CKPT (the default reference, "
                             "usually the SFT run) or --ref-from CKPT")
        return ctx.init

    # ---- objective -----------------------------------------------------------------------------------------
    def count(self, batch: Batch) -> Tensor:
        """Pairs with supervised tokens on both sides."""
        return valid_pairs(batch, self.width).sum()

    def _reference_logps(self, batch: DPOBatch) -> Tensor:
        if self.ref_model is not None:
            with torch.no_grad():
                return document_logps(supervised_forward(self.ref_model, batch), batch, self.width)
        if batch.ref_doc_logps is None:
            raise StageError("DPO batch without reference log-probs (setup() was not run)")
        return batch.ref_doc_logps

    def _terms(self, sup: Supervised, batch: DPOBatch) -> tuple[Tensor, Tensor, Tensor]:
        losses, margin = dpo_terms(document_logps(sup, batch, self.width), self._reference_logps(batch), self.beta)
        return losses, margin, valid_pairs(batch, self.width).float()

    def objective(self, sup: Supervised, batch: DPOBatch, norm: StepNorm) -> tuple[Tensor, dict[str, Tensor]]:
        """``sum(-log sigmoid(d)) / N_pairs``; metrics margin = mean d, acc = share of d > 0."""
        losses, margin, valid = self._terms(sup, batch)
        metrics = {"margin": ((margin * valid).sum() / norm.tokens).detach(),
                   "acc": (((margin > 0).float() * valid).sum() / norm.tokens).detach()}
        return (losses * valid).sum() / norm.tokens, metrics

    def sums(self, sup: Supervised, batch: DPOBatch) -> dict[str, Tensor]:
        losses, margin, valid = self._terms(sup, batch)
        return {"loss": (losses * valid).sum(), "margin": (margin * valid).sum(),
                "correct": ((margin > 0).float() * valid).sum(), "pairs": valid.sum()}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["pairs"], 1.0)
        return {"val_loss": sums["loss"] / n, "val_margin": sums["margin"] / n, "val_acc": sums["correct"] / n,
                "val_pairs": int(sums["pairs"])}


@torch.no_grad()
def compute_reference(model: nn.Module, dataset: DPODataset, ref_dir: Path, ctx: StageContext,
                      reference: dict[str, Any]) -> None:
    """One forward pass of the reference over every row; rank r writes shards r, r + world, ...; the file
    records ``shards.write_ref_logps`` returns are gathered from every rank (so all have finished) and
    rank 0 writes ``meta.json`` with them (written last: its presence means complete)."""
    mine = range(ctx.rank, len(dataset.shards), ctx.world)
    written: list[dict[str, Any]] = []  # this rank's file records (shards.write_ref_logps)
    total = sum(int(dataset.row_start[s + 1] - dataset.row_start[s]) for s in mine)
    ctx.say(f"dpo: computing reference log-probs of {reference['path']} over {dataset.n_rows:,} rows -> {ref_dir}")
    model.eval()
    with tqdm(total=total, desc="reference", unit="row", disable=None if ctx.rank == 0 else True) as bar:
        for s in mine:
            values = np.zeros(dataset.shards[s].n_docs, dtype=np.float32)
            rows = np.arange(dataset.row_start[s], dataset.row_start[s + 1])
            for lo in range(0, len(rows), ctx.batch_size):
                chunk = rows[lo:lo + ctx.batch_size]
                batch = dataset.collate(chunk).to(ctx.device)
                sums = document_logps(supervised_forward(model, batch), batch, dataset.width).cpu().numpy()
                for i, r in enumerate(chunk):
                    _, d0, d1 = dataset.row_documents(int(r))
                    values[d0:d1] = sums[i, :d1 - d0]
                bar.update(len(chunk))
            written.append(shards.write_ref_logps(ref_dir, shards.shard_name(s), values, dataset.shards[s].n_rows))
    records = sorted((r for rank in dist.gather_objects(written) for r in rank), key=lambda r: r["name"])
    if ctx.rank == 0:
        shards.write_ref_meta(ref_dir, reference, dataset.meta, records)
    ctx.barrier()


def _policy_shape(ctx: StageContext) -> loading.SourceOptions:
    """A reference given as a bare state dict (a MiniMind ``.pth``) holds no config: it has the policy's shape
    (the checkpoint the run starts from or resumes), the one a DPO reference must have anyway."""
    known = ctx.resume or ctx.init
    return loading.SourceOptions(known.model_config if known is not None else None)
