"""The output head on selected positions, in chunks whose [n, V] logits are never kept for backward.

A training objective needs the logits only where the loss is. :meth:`TinyLM.forward` with ``select``
returns the final hidden states at those positions ([N, H], already normalised) and the head matrix
([V, H]); :func:`chunked` then maps a per-position function of the logits over chunks of
``chunk`` positions. With autograd on, every chunk runs under non-reentrant
``torch.utils.checkpoint``: its logits (and softmax intermediates) are freed as soon as the chunk's
per-position values are computed and recomputed chunk by chunk in backward, so memory holds at most
one chunk's [n, V] logits plus the [N] results, never [B, T, V]. The values and gradients are those of
the unchunked computation (the same operations per position; only the head-weight gradient is summed
chunk by chunk).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

CHUNK = 1024
"""Positions per chunk: 1024 x a 6400-token vocabulary = 26 MB of fp32 logits at a time."""


def head_logits(hidden: Tensor, weight: Tensor) -> Tensor:
    """Logits of normalised hidden states [n, H] under the head ``weight`` [V, H], in float32 [n, V]."""
    return F.linear(hidden, weight).float()


def chunked(fn: Callable[..., Tensor], per_position: tuple[Tensor, ...], shared: tuple[Tensor, ...] = (),
            chunk: int | None = None) -> Tensor:
    """``fn(*chunks of per_position, *shared)`` over chunks of the leading dim, results concatenated.

    Every tensor of ``per_position`` has the same leading size N; ``fn`` returns [n] or [n, k] per
    chunk. Under autograd each chunk is checkpointed (recomputed in backward), so nothing ``fn``
    allocates outlives its chunk in the forward pass. ``chunk`` defaults to :data:`CHUNK`.
    """
    chunk = chunk or CHUNK
    n = per_position[0].shape[0]
    if n == 0:
        return fn(*per_position, *shared)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*per_position, *shared))
    outs = []
    for lo in range(0, n, chunk):
        parts = tuple(t[lo:lo + chunk] for t in per_position)
        outs.append(checkpoint(fn, *parts, *shared, use_reentrant=False) if grad else fn(*parts, *shared))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _cross_entropy(hidden: Tensor, targets: Tensor, weight: Tensor) -> Tensor:
    return F.cross_entropy(head_logits(hidden, weight), targets, reduction="none")


def selected_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int | None = None) -> Tensor:
    """Per-position cross-entropy in nats, [N] float32, of hidden states [N, H] against targets [N]."""
    return chunked(_cross_entropy, (hidden, targets), (weight,), chunk)
