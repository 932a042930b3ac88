"""Autoregressive generation with a preallocated KV cache, for one prompt or a batch of prompts.

Algorithm (:class:`Generation`):
1. prompts of different lengths are left-padded to the longest (L) with a key-padding mask; each row's
   positions count its real tokens only, so a padded row computes what it computes alone;
2. prefill: one forward over [B, L] fills slots 0..L-1 of a :class:`~model.kv_cache.KVCache` of
   L + budget slots (budget = min(max_new_tokens, max_position_embeddings - L)), logits of the last slot;
3. decode: per step one token per row is sampled (:func:`sample_next` after
   :func:`apply_repetition_penalty`) and fed back as one token per row that writes one slot: for a
   :class:`~model.transformer.TinyLM` through :func:`model.decode.decode_step` (fused weight copies, the
   fast path), for any other module through its ``forward(ids[:, None], cache=...)``. Stop ids are
   matched on the device. A row stops at its first id in ``stop_ids`` (not returned; finish reason
   "stop") or when the budget is spent ("length"); finished rows keep decoding a pad id (masked out of
   nothing that matters) until every row has finished.
4. consumers: iterating yields each step's ids as they come (one host read per step, for streaming);
   :meth:`Generation.run` (``generate_batch``, rollouts) keeps ids on the device and reads "all
   finished?" every ``check_every`` steps only.
``use_cache=False`` recomputes the whole sequence each step (O(n^2)): the reference the cache is tested
against.

Sampling: temperature 0 -> argmax (greedy, deterministic); otherwise softmax(logits / temperature),
optionally restricted to the ``top_k`` most likely tokens and/or the smallest set whose probability
reaches ``top_p``, drawn by inverse CDF from one uniform per row and step (:func:`row_uniforms`): from
``generator``, or with ``seeds`` from row i's own generator seeded ``seeds[i]``, so that a row's tokens
depend only on (model, prompt, seed), not on the other rows of its batch. Repetition penalty (CTRL):
the logit of every token already in the row (prompt or answer) is divided by ``penalty`` when positive,
multiplied when negative.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from model.attention import inference_mask
from model.decode import decode_step, decode_weights
from model.kv_cache import KVCache
from model.transformer import TinyLM

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None, uniform: Tensor | None = None) -> Tensor:
    """Next token ids [B] from last-position logits [B, V].

    Sampling is inverse-CDF: row b takes the first token whose cumulative probability reaches
    ``uniform[b] * total`` with ``uniform`` in (0, 1] (drawn from ``generator`` when not given), so a
    zero-probability token is never picked and a row's draw depends on its own uniform only.
    """
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
    if uniform is None:
        uniform = 1.0 - torch.rand(logits.size(0), device=logits.device, generator=generator)
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    target = (uniform.to(cdf.dtype) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target).squeeze(-1).clamp_(max=logits.size(-1) - 1)


def row_uniforms(batch: int, steps: int, device: torch.device, generator: torch.Generator | None = None,
                 seeds: Sequence[int] | None = None) -> Tensor:
    """Uniforms in (0, 1], [B, steps]: column t feeds :func:`sample_next` at step t.

    With ``seeds`` row b is drawn from its own ``torch.Generator`` seeded with ``seeds[b]`` (on CPU, so
    values do not depend on the device), hence a row's samples do not depend on the other rows of its batch;
    otherwise all rows come from ``generator`` (or the global RNG).
    """
    if seeds is None:
        return 1.0 - torch.rand(batch, steps, device=device, generator=generator)
    rows = [torch.rand(steps, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return 1.0 - torch.stack(rows).to(device)


def apply_repetition_penalty(logits: Tensor, seen: Tensor | None, penalty: float) -> Tensor:
    """CTRL penalty on logits [B, V] for tokens marked in ``seen`` [B, V] bool (no-op when penalty == 1)."""
    if seen is None or penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


class Generation:
    """Iterate to decode: each step yields one entry per prompt, the new token id or None (row finished).

    ``matmul_dtype`` (e.g. ``torch.bfloat16``: AMX / AVX512-BF16 kernels on CPUs that have them, much
    slower on CPUs that do not) runs the decode steps' weight products in that precision with inputs cast
    to it and outputs cast back (residual stream, norms, softmax and the KV cache stay in the model's
    dtype; the prefill runs in the model's dtype): faster, but the tokens are no longer those of the
    model's own precision.

    While iterating, ``step_logits`` holds the model's logits [B, V] (before repetition penalty and
    sampling) of the step just yielded.
    After the iteration ``tokens[i]`` holds row i's new ids and ``finish_reasons[i]`` is "stop" or "length".
    An all-None step is never yielded. The model is put in eval mode for the duration.
    """

    def __init__(self, model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int = 256,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float = 1.0, stop_ids: Iterable[int] = (),
                 generator: torch.Generator | None = None, use_cache: bool = True, pad_id: int = 0,
                 seeds: Sequence[int] | None = None, matmul_dtype: torch.dtype | None = None) -> None:
        self.prompts = [list(p) for p in prompts]
        if not self.prompts or any(len(p) == 0 for p in self.prompts):
            raise ValueError("generation needs at least one prompt, each with at least one token")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        if seeds is not None:
            seeds = [int(x) for x in seeds]
            if len(seeds) != len(self.prompts):
                raise ValueError(f"seeds has {len(seeds)} entries for {len(self.prompts)} prompts")
            if generator is not None:
                raise ValueError("pass either generator or seeds, not both")
        if matmul_dtype is not None and not (use_cache and isinstance(model, TinyLM)
                                             and matmul_dtype.is_floating_point):
            raise ValueError("matmul_dtype needs a floating dtype, a TinyLM and use_cache=True (the fused decode step)")
        limit = model.config.max_position_embeddings
        longest = max(len(p) for p in self.prompts)
        if longest > limit:
            raise ValueError(f"prompt of {longest} tokens exceeds the model's context of {limit}")
        self.model, self.use_cache, self.pad_id = model, use_cache, pad_id
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.repetition_penalty, self.generator, self.seeds = repetition_penalty, generator, seeds
        self.matmul_dtype = matmul_dtype
        self.stop_ids = frozenset(stop_ids)
        self.budget = min(max_new_tokens, limit - longest)
        self.tokens: list[list[int]] = [[] for _ in self.prompts]
        self.finish_reasons: list[str | None] = [None] * len(self.prompts)
        self.step_logits: Tensor | None = None  # [B, V] logits the latest yielded ids were sampled from

    def __iter__(self) -> Iterator[list[int | None]]:
        with self._decoding():
            for nxt, emitted, done in self._decode():
                toks, keep, finished = nxt.tolist(), emitted.tolist(), done.tolist()
                out: list[int | None] = []
                for i, tok in enumerate(toks):
                    if keep[i]:
                        self.tokens[i].append(tok)
                    elif finished[i] and self.finish_reasons[i] is None:
                        self.finish_reasons[i] = FINISH_STOP
                    out.append(tok if keep[i] else None)
                if any(keep):
                    yield out
                if all(finished):
                    return
            self.finish_reasons = [r or FINISH_LENGTH for r in self.finish_reasons]

    def run(self, check_every: int = 16) -> list[list[int]]:
        """Decode every row to its end without per-token host syncs; returns (and sets) ``tokens``.

        Sampled ids stay on the device; whether every row has finished is read every ``check_every``
        steps only (a finished batch decodes at most ``check_every - 1`` extra steps, whose ids are dropped).
        """
        with self._decoding():
            ids, keeps, done = [], [], None
            for step, (nxt, emitted, done) in enumerate(self._decode()):
                ids.append(nxt)
                keeps.append(emitted)
                if (step + 1) % check_every == 0 and bool(done.all()):
                    break
            if done is not None:
                rows, keep = torch.stack(ids, 1).tolist(), torch.stack(keeps, 1).tolist()
                self.tokens = [[t for t, k in zip(r, m, strict=True) if k] for r, m in zip(rows, keep, strict=True)]
                self.finish_reasons = [FINISH_STOP if d else FINISH_LENGTH for d in done.tolist()]
            self.finish_reasons = [r or FINISH_LENGTH for r in self.finish_reasons]
        return self.tokens

    @contextlib.contextmanager
    def _decoding(self) -> Iterator[None]:
        """Eval mode and inference mode for the duration; the model's mode is restored after."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.model.train(was_training)

    def _decode(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Per step, device tensors [B]: sampled ids, ``emitted`` (the id is a new token of its row) and
        ``done`` (the row has met a stop id, this step or earlier). No host sync; runs to the budget."""
        model, prompts, b = self.model, self.prompts, len(self.prompts)
        param = next(model.parameters())
        device = param.device
        longest = max(len(p) for p in prompts)
        total = longest + self.budget
        ids = torch.full((b, longest), self.pad_id, dtype=torch.long, device=device)
        full_mask = torch.ones((b, total), dtype=torch.bool, device=device)  # decode slots are all real
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
            full_mask[i, :longest - len(p)] = False
        padded = any(len(p) != longest for p in prompts)
        seen = None
        if self.repetition_penalty != 1.0:
            seen = torch.zeros((b, model.config.vocab_size), dtype=torch.bool, device=device)
            seen.scatter_(1, ids, full_mask[:, :longest])
        if self.budget == 0:
            return
        uniforms = (row_uniforms(b, self.budget, device, self.generator, self.seeds)
                    if self.temperature > 0 else None)
        stops = torch.tensor(sorted(self.stop_ids), dtype=torch.long, device=device) if self.stop_ids else None
        cache = KVCache(model.config, b, total, device, param.dtype) if self.use_cache else None
        fused = (decode_weights(model, b, self.matmul_dtype) if cache is not None and isinstance(model, TinyLM)
                 else None)
        positions = torch.tensor([len(p) for p in prompts], device=device)  # of the first fed-back token
        seq = ids
        logits = model(ids, attention_mask=full_mask[:, :longest] if padded else None, cache=cache,
                       last_only=True).logits[:, -1]
        done = torch.zeros(b, dtype=torch.bool, device=device)
        for step in range(self.budget):
            self.step_logits = logits
            logits = apply_repetition_penalty(logits, seen, self.repetition_penalty)
            nxt = sample_next(logits, self.temperature, self.top_k, self.top_p,
                              uniform=None if uniforms is None else uniforms[:, step])
            hit = torch.isin(nxt, stops) if stops is not None else torch.zeros_like(done)
            emitted = ~(done | hit)
            done = done | hit
            yield nxt, emitted, done
            if step == self.budget - 1:
                return
            fed = torch.where(done, self.pad_id, nxt)  # a finished row feeds the pad id
            if seen is not None:
                seen[torch.arange(b, device=device), fed] |= ~done
            width = longest + step + 1  # slots filled once ``fed`` is written
            mask = full_mask[:, :width] if padded else None
            if fused is not None and cache is not None:
                step_mask = inference_mask(mask, width - 1, 1, device)
                logits = decode_step(model, fused, fed, positions + step, cache, step_mask)
            elif cache is not None:
                logits = model(fed[:, None], attention_mask=mask, cache=cache, last_only=True).logits[:, -1]
            else:
                seq = torch.cat([seq, fed[:, None]], dim=1)
                logits = model(seq, attention_mask=mask, last_only=True).logits[:, -1]


def stream(model: nn.Module, prompt_ids: Iterable[int], **kwargs) -> Iterator[int]:
    """Yield the new token ids of one prompt as they are produced (arguments: :class:`Generation`)."""
    for step in Generation(model, [list(prompt_ids)], **kwargs):
        yield step[0]


def generate(model: nn.Module, prompt_ids: Iterable[int], **kwargs) -> list[int]:
    """All new token ids of one prompt (see :class:`Generation` for the arguments)."""
    return list(stream(model, prompt_ids, **kwargs))


def generate_batch(model: nn.Module, prompts: Sequence[Sequence[int]], **kwargs) -> list[list[int]]:
    """New token ids of each prompt, decoded together in one left-padded batch."""
    return Generation(model, prompts, **kwargs).run()
