"""A decode batch whose rows come and go at token boundaries (continuous batching) on one KV cache.

Contract: :class:`DecodeBatch` holds up to ``capacity`` rows in one :class:`~model.kv_cache.KVCache` of
``slots`` slots (``INITIAL_SLOTS`` at first, doubled up to ``max_position_embeddings`` when the rows need
more, so memory follows what the rows use, not the context); rows 0..n-1 are live. All rows write
their next token at one shared slot (``column``); a row's real slots are marked in a key-padding ``mask``
and its RoPE positions count its own tokens only, so where a row's slots lie does not change what it
computes. :meth:`add` prefills a prompt alone (its own small cache, the model's forward: the same prefill as
:class:`~model.generate.Generation`) and copies its k/v to slots ``column - len .. column - 1`` of a new row
(when the prompt is longer than ``column``, every live row first moves right by the difference);
:meth:`step` feeds one token per live row through :func:`~model.decode.decode_step` (fused weights: dense
for one row, oneDNN-packed for more, as :func:`~model.decode.decode_weights` chooses, both kept) and returns
the logits [n, V]; when ``column`` reaches the end of the cache, the rows move left by the padding they all share
(when it is a quarter of the cache or more, or the cache already spans the context; a live row never fills
the context: its prompt plus budget fit it), else the cache doubles. :meth:`remove` retires row i by moving
the last row into it (callers mirror that order).

Batch-equality policy: a row's ids and positions never depend on the other rows, but the CPU GEMM of n rows
may round differently from that of one row, so a row's logits equal its alone-logits up to floating-point
effects: greedy tokens agree wherever the top two logits differ by more than that (tested exactly on a
model with clear margins), not bitwise everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.attention import inference_mask
from model.decode import DecodeWeights, _stamp, build_decode_weights, decode_step, onednn_usable
from model.kv_cache import KVCache
from model.transformer import TinyLM

INITIAL_SLOTS = 256  # cache slots at first; the cache doubles (up to the context) when rows need more


class DecodeBatch:
    """Live rows 0..n-1 of a continuously batched decode (see the module contract)."""

    def __init__(self, model: TinyLM, capacity: int, slots: int = INITIAL_SLOTS) -> None:
        self.model, self.capacity = model, capacity
        cfg = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_len = cfg.max_position_embeddings
        self.slots = min(slots, self.max_len)
        self.cache = KVCache(cfg, capacity, self.slots, self.device, self.dtype)
        self.mask = torch.zeros((capacity, self.slots), dtype=torch.bool, device=self.device)
        self.positions = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self.n = 0
        self.column = 0  # slots filled (the next token of every row is written here)
        self.weights: dict[bool, DecodeWeights] = {}

    def add(self, prompt: list[int]) -> Tensor:
        """Prefill ``prompt`` into a new last row; its logits [V] at the prompt's last position."""
        if self.n >= self.capacity:
            raise ValueError(f"the decode batch is full ({self.capacity} rows)")
        p = len(prompt)
        small = KVCache(self.model.config, 1, p, self.device, self.dtype)
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        logits = self.model(ids, cache=small, last_only=True).logits[0, -1]
        if p > self.slots:
            self._grow(p)
        if self.n == 0:
            self.column = p
        elif p > self.column:
            self._move(p - self.column)
        i, c = self.n, self.column
        for layer in range(len(self.cache.keys)):
            self.cache.keys[layer][i, :, c - p:c] = small.keys[layer][0, :, :p]
            self.cache.values[layer][i, :, c - p:c] = small.values[layer][0, :, :p]
        self.mask[i] = False
        self.mask[i, c - p:c] = True
        self.positions[i] = p
        self.n += 1
        return logits

    def step(self, tokens: list[int]) -> Tensor:
        """Feed one token per live row (in row order); the logits [n, V] of the next one."""
        n = self.n
        if self.column == self.slots:
            self._make_room()
        c = self.column
        self.mask[:n, c] = True
        view = KVCache.__new__(KVCache)
        view.keys = [k[:n] for k in self.cache.keys]
        view.values = [v[:n] for v in self.cache.values]
        view.max_len, view.length = self.slots, c
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        live = self.mask[:n, :c + 1]
        step_mask = inference_mask(None if bool(live.all()) else live, c, 1, self.device)
        logits = decode_step(self.model, self._weights(n), ids, self.positions[:n], view, step_mask)
        self.column += 1
        self.positions[:n] += 1
        return logits

    def _weights(self, n: int) -> DecodeWeights:
        """The fused weights for a step of ``n`` rows: dense for one row, packed for more (both built once
        per weight state, so the batch size changing from step to step rebuilds nothing)."""
        packed = onednn_usable(n, self.dtype, self.device)
        stamp = _stamp(self.model)
        if self.weights.get(packed) is None or self.weights[packed].stamp != stamp:
            self.weights[packed] = build_decode_weights(self.model, onednn=packed)
        return self.weights[packed]

    def remove(self, i: int) -> None:
        """Retire row i: the last live row takes its place."""
        last = self.n - 1
        if i != last:
            c = self.column
            for layer in range(len(self.cache.keys)):
                self.cache.keys[layer][i, :, :c] = self.cache.keys[layer][last, :, :c]
                self.cache.values[layer][i, :, :c] = self.cache.values[layer][last, :, :c]
            self.mask[i] = self.mask[last]
            self.positions[i] = self.positions[last]
        self.n = last

    def _make_room(self) -> None:
        """Free the next slot: move the rows left by their shared padding when it is a quarter of the cache
        or more (or the cache is already the context's size), else double the cache (up to the context)."""
        padding = self._shared_padding()
        if self.slots == self.max_len or padding >= self.slots // 4:
            self._move(-padding)
        else:
            self._grow(min(2 * self.slots, self.max_len))

    def _grow(self, slots: int) -> None:
        """Reallocate the cache and mask with ``slots`` slots (>= the current count), keeping the live rows."""
        slots = max(slots, self.slots)
        cache = KVCache(self.model.config, self.capacity, slots, self.device, self.dtype)
        n, c = self.n, self.column
        for new, old in ((cache.keys, self.cache.keys), (cache.values, self.cache.values)):
            for dst, src in zip(new, old, strict=True):
                dst[:n, :, :c] = src[:n, :, :c]
        mask = torch.zeros((self.capacity, slots), dtype=torch.bool, device=self.device)
        mask[:n, :c] = self.mask[:n, :c]
        self.cache, self.mask, self.slots = cache, mask, slots

    def _shared_padding(self) -> int:
        """Leading slots that no live row uses."""
        used = self.mask[:self.n, :self.column].any(dim=0)
        first = int(used.nonzero()[0]) if bool(used.any()) else self.column
        if first == 0 and self.slots == self.max_len:
            raise RuntimeError("a decode row filled the whole context")
        return first

    def _move(self, shift: int) -> None:
        """Move every live row's slots by ``shift`` (right when positive, left when negative)."""
        n, c = self.n, self.column
        src, dst = (slice(0, c), slice(shift, shift + c)) if shift > 0 else (slice(-shift, c), slice(0, c + shift))
        for buffers in (self.cache.keys, self.cache.values):
            for buf in buffers:
                buf[:n, :, dst] = buf[:n, :, src].clone()
        moved = self.mask[:n, src].clone()
        self.mask[:n] = False
        self.mask[:n, dst] = moved
        self.column = c + shift
