"""Preallocated key/value cache for incremental decoding.

Per layer one key and one value tensor of shape [B, kv_heads, max_len, head_dim] is allocated once;
a forward pass over T new tokens writes slots ``length .. length+T-1`` in place and attends to slots
``0 .. length+T-1`` (no ``torch.cat`` growth per token). All rows share ``length``: prompts of
different lengths are *left*-padded, and a key-padding mask (``attention_mask`` [B, length]) marks
the slots that hold real tokens. ``length`` is advanced by :meth:`TinyLM.forward` after the last layer.

Invariant: slot s of every layer holds the k/v of the token fed at overall step s (pad slots included,
masked out for every query but their own).
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.config import ModelConfig


class KVCache:
    """k/v buffers [B, Hkv, max_len, D] per layer plus the number of filled slots (``length``)."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if max_len > config.max_position_embeddings:
            raise ValueError(f"cache length {max_len} exceeds max_position_embeddings "
                             f"{config.max_position_embeddings}")
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.keys[0].size(0)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v [B, Hkv, T, D] at slots length..length+T-1 of ``layer``; return views of all filled slots."""
        start, t = self.length, k.size(2)
        if start + t > self.max_len:
            raise ValueError(f"KV cache full: {start} + {t} tokens > max_len {self.max_len}")
        self.keys[layer][:, :, start:start + t] = k
        self.values[layer][:, :, start:start + t] = v
        return self.keys[layer][:, :, :start + t], self.values[layer][:, :, :start + t]
