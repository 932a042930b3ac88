"""Rotary position embedding: the inverse frequencies of plain and scaled RoPE, and cos/sin per forward.

Plain RoPE: ``inv_freq[i] = 1 / theta^(2i / d)`` for the ``d / 2`` rotating pairs (rotate-half layout). Scaled
(``ModelConfig.rope_scaling``, checked and completed by :func:`model.config.normalize_rope_scaling`), each
computed in fp32 with transformers' own operations so that the angles are the same floats:

- ``linear``: ``inv_freq / factor`` (positions interpolated).
- ``dynamic``: NTK-aware base ``theta * (factor * L / L0 - (factor - 1))^(d / (d - 2))`` with ``L`` the
  longest position of the forward + 1 (at least the original length ``L0``), so nothing changes up to ``L0``.
- ``yarn``: per pair, ``inv_freq * ((1 - r) + r / factor)`` where the ramp ``r`` goes from 0 (pairs that turn
  more than ``beta_fast`` times within ``L0``: kept) to 1 (fewer than ``beta_slow``: interpolated); cos and
  sin are multiplied by ``attention_factor``.

cos/sin are computed for the positions asked for (no table sized by ``max_position_embeddings``): each angle
is one fp32 product ``position * inv_freq``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


def default_inv_freq(head_dim: int, theta: float | Tensor) -> Tensor:
    """``1 / theta^(2i / head_dim)`` for i < head_dim / 2, fp32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def yarn_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any]) -> Tensor:
    """YaRN's blend of extrapolated and interpolated frequencies (module docstring), fp32."""
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:  # the pair index that turns ``rotations`` times within L0
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling["beta_fast"]), correction_dim(scaling["beta_slow"])
    if scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a one-pair ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).to(dtype=torch.float) / head_dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolated * (1 - keep) + extrapolated * keep


class RotaryEmbedding(nn.Module):
    """cos/sin [B or 1, 1, T, head_dim] of the positions asked for (frequencies repeated twice: rotate-half).

    ``inv_freq`` (head_dim / 2, fp32) is a non-persistent buffer: not in the state dict. ``scaling`` is a
    normalised ``rope_scaling`` dict or None; ``dynamic`` recomputes the frequencies from each forward's
    longest position."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        kind = scaling["rope_type"] if scaling else None
        inv_freq = default_inv_freq(head_dim, theta)
        self.attention_scaling = 1.0
        if kind == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif kind == "yarn":
            inv_freq = yarn_inv_freq(head_dim, theta, scaling)
            self.attention_scaling = float(scaling["attention_factor"])
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _dynamic_inv_freq(self, position_ids: Tensor) -> Tensor:
        """NTK-aware frequencies for the longest position of ``position_ids`` (module docstring)."""
        assert self.scaling is not None
        factor, original = self.scaling["factor"], self.scaling["original_max_position_embeddings"]
        length = torch.max(position_ids) + 1
        length = torch.maximum(length, torch.tensor(original, dtype=length.dtype, device=length.device))
        d = self.head_dim
        base = self.theta * ((factor * length / original) - (factor - 1)) ** (d / (d - 2))
        steps = torch.arange(0, d, 2, dtype=torch.int64, device=position_ids.device).float() / d
        return 1.0 / (base ** steps)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """position_ids [B or 1, T] -> cos, sin [B or 1, 1, T, head_dim] (broadcast over heads), fp32."""
        inv_freq = self.inv_freq
        if self.scaling is not None and self.scaling["rope_type"] == "dynamic":
            inv_freq = self._dynamic_inv_freq(position_ids)
        freqs = position_ids[..., None].float() * inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
        if self.attention_scaling == 1.0:
            return angles.cos(), angles.sin()
        return angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin
