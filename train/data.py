"""Batches from packed shards: memory-mapped, vectorised, deterministic, resumable on any rank count.

Rows. A packed dataset (sft / reason / dpo) has rows of whole documents (<= seq_len tokens). Pretrain
has no packed rows: its rows are windows of ``seq_len + 1`` tokens over each shard's token stream.

Order. Rows are addressed by one global index r in [0, N). A fixed keyed permutation (seed-independent)
puts ``val_rows`` of them in the validation split and the rest in the training split; training
sample k (k = 0, 1, 2, ... over all ranks and epochs) is row ``split[perm_{seed, epoch}(k mod n_train)]``
with ``epoch = k // n_train``. The permutations are Feistel ciphers over the index space (cycle
walking), so they cost O(1) memory whatever N is, and the whole data position of a run is one
integer, the number of samples consumed. A step of global batch G consumes samples
``[s, s + G)``; micro-batch m of rank r takes ``s + (m * world + r) * B + [0, B)``. Resuming with
another world size or accumulation keeps the sample stream as long as G is unchanged.

Batch layout (all [B, T], T = seq_len). Packed rows: ``input_ids`` the row's tokens then padding;
``targets[i] = input_ids[i + 1]`` and ``weights[i]`` = the mask byte of token i + 1, except at the
last token of each document (its next token belongs to another document) and on padding, where the
weight is 0; ``doc_ids`` numbers the row's documents 0, 1, ... (padding -1) and ``position_ids``
restart at 0 in each document. Windows: inputs ``w[:-1]``, targets ``w[1:]``, weights ``mask[1:]``,
no doc_ids / position_ids (plain causal attention).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Generic, TypeVar

import numpy as np
import torch

from preprocess import shards
from train.batches import TrainingData

SPLIT_KEY = 0x7E57  # the train/validation split never depends on the training seed
_MASK64 = (1 << 64) - 1


def splitmix64(x: np.ndarray, key: int) -> np.ndarray:
    """A 64-bit integer hash (the splitmix64 finaliser) of ``x xor key``, vectorised over uint64 ``x``: the keyed
    mixing of the data order (:func:`permute`) and of the RL stage's sampling seeds."""
    with np.errstate(over="ignore"):
        z = (x ^ np.uint64(key & _MASK64)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def permute(index: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A keyed bijection of [0, n) applied to ``index``: a balanced Feistel network over the smallest
    even-bit power-of-two domain >= n, with cycle walking back into [0, n)."""
    if n <= 1:
        return np.zeros_like(np.asarray(index, dtype=np.int64))
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    low = np.uint64((1 << half) - 1)
    x = np.asarray(index, dtype=np.uint64).copy()
    todo = np.ones(x.shape, dtype=bool)
    while todo.any():
        left, right = x[todo] >> np.uint64(half), x[todo] & low
        for r in range(rounds):
            left, right = right, left ^ (splitmix64(right, key * 16 + r) & low)
        x[todo] = (left << np.uint64(half)) | right
        todo = x >= np.uint64(n)
    return x.astype(np.int64)


@dataclass
class Batch:
    """Rows the model reads (module docstring, "Batch layout"). Stages that need more per row extend it with
    their own tensor fields (DPO: the reference's per-document log-probs; RL: advantages and per-token
    log-probs); :meth:`to` and :meth:`pin_memory` carry every field."""

    input_ids: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64
    weights: torch.Tensor  # [B, T] float32 loss weights (0 = no loss)
    doc_ids: torch.Tensor | None = None  # [B, T] int32, packed rows only
    position_ids: torch.Tensor | None = None  # [B, T] int64, packed rows only

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """A batch of the same type with ``fn`` applied to every tensor field (None stays None)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return type(self)(**{name: None if t is None else fn(t) for name, t in values.items()})


class PackedDataset(shards.PackedFolder):
    """A packed folder that assembles torch batches from its rows."""

    def collate(self, rows: np.ndarray) -> Batch:
        """Assemble the batch for global row indices (a row index -1 gives an all-padding row)."""
        b, t = len(rows), self.seq_len
        inputs = np.zeros((b, t), dtype=np.int64)
        targets = np.zeros((b, t), dtype=np.int64)
        weights = np.zeros((b, t), dtype=np.float32)
        doc_ids = np.full((b, t), -1, dtype=np.int32) if self.packed else None
        positions = np.zeros((b, t), dtype=np.int64) if self.packed else None
        for i, r in enumerate(rows):
            if r < 0:
                continue
            tokens, mask, lens = self.row(int(r))
            if not self.packed:
                inputs[i], targets[i], weights[i] = tokens[:-1], tokens[1:], mask[1:]
                continue
            n = len(tokens)
            inputs[i, :n] = tokens
            targets[i, :n - 1] = tokens[1:]
            weights[i, :n - 1] = mask[1:]
            ends = np.cumsum(lens)
            weights[i, ends - 1] = 0.0
            starts = ends - lens
            doc_ids[i, :n] = np.repeat(np.arange(len(lens), dtype=np.int32), lens)
            positions[i, :n] = np.arange(n) - np.repeat(starts, lens)
        as_t = torch.from_numpy
        return Batch(as_t(inputs), as_t(targets), as_t(weights),
                     None if doc_ids is None else as_t(doc_ids), None if positions is None else as_t(positions))


D = TypeVar("D", bound=TrainingData)


class Split(Generic[D]):
    """The training and validation rows of a dataset (packed rows, or RL prompts), in a keyed order."""

    def __init__(self, dataset: D, val_rows: int):
        if not 0 <= val_rows < dataset.n_rows:
            raise ValueError(f"{dataset.folder}: {dataset.n_rows} rows cannot spare {val_rows} for validation "
                             "and keep any for training")
        self.dataset, self.val_rows = dataset, val_rows
        self.n_train = dataset.n_rows - val_rows

    def train_rows(self, samples: np.ndarray, seed: int) -> np.ndarray:
        """Global rows of training samples (sample k of epoch k // n_train, reshuffled every epoch)."""
        samples = np.asarray(samples, dtype=np.int64)
        epochs, within = np.divmod(samples, self.n_train)
        out = np.empty_like(samples)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = permute(within[sel], self.n_train, key=(seed << 20) + int(epoch) + 1)
        return permute(out + self.val_rows, self.dataset.n_rows, SPLIT_KEY)

    def val_rows_list(self) -> np.ndarray:
        return permute(np.arange(self.val_rows), self.dataset.n_rows, SPLIT_KEY)


class BatchLoader:
    """The loop's batches (``train.batches.Batches``) from packed rows: micro-batches of one rank, prefetched
    by a background thread (pinned memory when asked)."""

    shown: tuple[str, ...] = ()  # keys of :meth:`step_metrics` printed on the progress line

    def __init__(self, split: Split[PackedDataset], micro_batch: int, rank: int = 0, world: int = 1, seed: int = 0,
                 prefetch: int = 2, pin_memory: bool = False):
        self.split, self.micro_batch, self.rank, self.world = split, micro_batch, rank, world
        self.seed, self.prefetch, self.pin_memory = seed, prefetch, pin_memory

    @property
    def seq_len(self) -> int:
        return self.split.dataset.seq_len

    def global_batch(self, accum: int) -> int:
        return self.micro_batch * accum * self.world

    @property
    def eval_rows(self) -> int:
        """Rows the loop's evaluation covers (0: no evaluation)."""
        return self.split.val_rows

    def step_metrics(self, train_s: float) -> dict[str, float]:
        """None: packed data adds nothing to a step's metrics line."""
        return {}

    def micro_batch_at(self, step_start: int, micro: int) -> Batch:
        """Micro-batch ``micro`` of the step whose first global sample is ``step_start``."""
        first = step_start + (micro * self.world + self.rank) * self.micro_batch
        rows = self.split.train_rows(np.arange(first, first + self.micro_batch), self.seed)
        return self.split.dataset.collate(rows)

    def steps(self, start_sample: int, accum: int) -> Iterator[list[Batch]]:
        """Endless steps from ``start_sample``: each a list of ``accum`` micro-batches."""
        g = self.global_batch(accum)

        def produce(step: int) -> list[Batch]:
            batches = [self.micro_batch_at(start_sample + step * g, m) for m in range(accum)]
            return [b.pin_memory() for b in batches] if self.pin_memory else batches

        yield from _prefetched(produce, self.prefetch)

    def val_batches(self, device: torch.device | str = "cpu") -> Iterator[Batch]:
        """This rank's share of the validation rows (strided by rank), padded to whole micro-batches, on
        ``device``."""
        rows = self.split.val_rows_list()[self.rank::self.world]
        per_rank = -(-self.split.val_rows // self.world)
        rows = np.concatenate([rows, np.full(per_rank - len(rows), -1, dtype=np.int64)])
        for lo in range(0, per_rank, self.micro_batch):
            chunk = rows[lo:lo + self.micro_batch]
            chunk = np.concatenate([chunk, np.full(self.micro_batch - len(chunk), -1, dtype=np.int64)])
            yield self.split.dataset.collate(chunk).to(device)


def _prefetched(produce, depth: int) -> Iterator:
    """Yield produce(0), produce(1), ... computed ``depth`` ahead by a daemon thread; errors re-raise here.

    Closing the generator stops the thread and waits for it, so no batch is being built (torch ops in a
    background thread) while the interpreter or a process group shuts down."""
    if depth <= 0:
        step = 0
        while True:
            yield produce(step)
            step += 1
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        step = 0
        while not stop.is_set():
            try:
                item = (produce(step), None)
            except BaseException as e:  # handed to the consumer
                item = (None, e)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[1] is not None:
                return
            step += 1

    thread = threading.Thread(target=work, daemon=True, name="batch-prefetch")
    thread.start()
    try:
        while True:
            value, error = q.get()
            if error is not None:
                raise error
            yield value
    finally:
        stop.set()
        thread.join()
