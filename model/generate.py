"""Autoregressive sampling without a KV cache (each new token re-runs the whole, cropped, sequence).

Per step: logits of the last position; temperature 0 -> argmax (greedy, deterministic); otherwise
softmax(logits / temperature), optionally restricted to the ``top_k`` most likely tokens and/or the
smallest set whose probability reaches ``top_p``, sampled with ``generator``. Generation stops after
``max_new_tokens`` or at the first id in ``stop_ids`` (which is not returned). The context is cropped
to the model's ``max_position_embeddings`` most recent tokens. Cost is O(n^2) in the sequence length:
fine for one-shot answers; a cached version replaces it for interactive chat.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Next token ids [B] from last-position logits [B, V]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix reaching top_p (>= 1 token)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def stream(model: nn.Module, prompt_ids: Iterable[int], max_new_tokens: int = 256, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, stop_ids: Iterable[int] = (),
           generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield new token ids one at a time (single sequence)."""
    device = next(model.parameters()).device
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    if ids.numel() == 0:
        raise ValueError("generation needs at least one prompt token")
    stops = set(stop_ids)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            context = ids[:, -limit:] if limit else ids
            logits = model(context)[0][:, -1, :]
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            token = int(nxt.item())
            if token in stops:
                return
            yield token
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    finally:
        model.train(was_training)


def generate(model: nn.Module, prompt_ids: Iterable[int], **kwargs) -> list[int]:
    """All new token ids (see :func:`stream` for the arguments)."""
    return list(stream(model, prompt_ids, **kwargs))
