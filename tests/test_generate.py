"""model/generate.py: the KV cache gives the uncached tokens and logits; batches equal prompts run alone."""

from __future__ import annotations

import pytest
import torch

from model import ModelConfig, TinyLM
from model.generate import (
    FINISH_LENGTH,
    FINISH_STOP,
    Generation,
    apply_repetition_penalty,
    generate,
    generate_batch,
    sample_next,
)
from model.kv_cache import KVCache

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is faster, immune to busy cores


def model(preset: str = "tiny", **overrides) -> TinyLM:
    """A random tiny model; a wide init (std 0.3) makes greedy outputs vary with the context."""
    torch.manual_seed(0)
    return TinyLM(ModelConfig.from_preset(preset, **{"initializer_range": 0.3, **overrides})).eval()


def prompts(*lengths: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(sum(lengths))
    return [torch.randint(7, 6400, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "tiny-qwen3"])
def test_cached_equals_uncached_single_and_batched(preset: str) -> None:
    m = model(preset)
    batch = prompts(5, 17, 1, 9)
    alone = [generate(m, p, max_new_tokens=24) for p in batch]
    assert len({tuple(a) for a in alone}) == 4 and all(len(set(a)) > 5 for a in alone), "degenerate model"
    for p, want in zip(batch, alone, strict=True):
        assert generate(m, p, max_new_tokens=24, use_cache=False) == want
    assert generate_batch(m, batch, max_new_tokens=24) == alone
    assert generate_batch(m, batch, max_new_tokens=24, use_cache=False) == alone


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "tiny-qwen3"])
def test_cache_step_logits_equal_full_forward(preset: str) -> None:
    """Prefill + one-token steps into a preallocated cache reproduce the full forward's logits, in place."""
    m = model(preset)
    ids = torch.tensor(prompts(12))
    with torch.no_grad():
        full = m(ids).logits
        cache = KVCache(m.config, 1, 16)
        ptrs = [k.data_ptr() for k in cache.keys]
        steps = [m(ids[:, :7], cache=cache).logits]
        steps += [m(ids[:, t:t + 1], cache=cache).logits for t in range(7, 12)]
    assert cache.length == 12 and [k.data_ptr() for k in cache.keys] == ptrs
    assert cache.keys[0].shape == (1, m.config.num_key_value_heads, 16, m.config.head_dim)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_left_padded_logits_equal_alone() -> None:
    m = model()
    short, long = prompts(4, 10)
    ids = torch.tensor([[0] * 6 + short, long])
    mask = torch.tensor([[0] * 6 + [1] * 4, [1] * 10], dtype=torch.bool)
    with torch.no_grad():
        both = m(ids, attention_mask=mask).logits
        cache = KVCache(m.config, 2, 10)
        cached = m(ids, attention_mask=mask, cache=cache).logits
        alone = m(torch.tensor([short])).logits
    assert torch.isfinite(both).all()
    torch.testing.assert_close(both[0, 6:], alone[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached, both, rtol=1e-4, atol=1e-4)


def test_stop_ids_and_finish_reasons() -> None:
    m = model()
    batch = prompts(3, 8)
    free = [generate(m, p, max_new_tokens=10) for p in batch]
    stop = free[0][4]  # row 0 must stop before its 5th token; row 1 too if it produces that id
    gen = Generation(m, batch, max_new_tokens=10, stop_ids=[stop])
    steps = list(gen)
    assert gen.tokens[0] == free[0][:4] and gen.finish_reasons[0] == FINISH_STOP
    cut = free[1].index(stop) if stop in free[1] else 10
    assert gen.tokens[1] == free[1][:cut]
    assert gen.finish_reasons[1] == (FINISH_STOP if cut < 10 else FINISH_LENGTH)
    assert all(any(t is not None for t in s) for s in steps) and len(steps) == max(4, cut)
    assert [s[0] for s in steps[:4]] == free[0][:4] and all(s[0] is None for s in steps[4:])


def test_context_limit_ends_with_length() -> None:
    m = model(max_position_embeddings=16)
    gen = Generation(m, prompts(10), max_new_tokens=50)
    list(gen)
    assert len(gen.tokens[0]) == 6 and gen.finish_reasons == [FINISH_LENGTH]
    with pytest.raises(ValueError, match="exceeds the model's context of 16"):
        Generation(m, prompts(17))


def test_repetition_penalty() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]
    m = model(initializer_range=0.02)  # a narrow init: greedy repeats one token forever
    p = prompts(6)[0]
    plain = generate(m, p, max_new_tokens=12)
    assert len(set(plain)) < 12
    penalised = generate(m, p, max_new_tokens=12, repetition_penalty=1e6)
    assert len(set(penalised)) == 12 and not set(penalised) & set(p)


def test_sampling_is_seeded_and_top_k_1_is_greedy() -> None:
    m = model()
    p = prompts(5)[0]

    def sample(seed: int, **kw) -> list[int]:
        return generate(m, p, max_new_tokens=12, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert sample(3) == sample(3) != sample(4)
    assert sample(3, top_k=1) == generate(m, p, max_new_tokens=12)
    assert sample(3, top_p=1e-9) == generate(m, p, max_new_tokens=12)


def test_training_forward_refuses_mixed_inputs() -> None:
    m = model()
    ids = torch.tensor(prompts(4))
    with pytest.raises(ValueError, match="doc_ids"):
        m(ids, doc_ids=torch.zeros_like(ids), cache=KVCache(m.config, 1, 8))
    with pytest.raises(ValueError, match="attention_mask must be"):
        m(ids, attention_mask=torch.ones(1, 3, dtype=torch.bool))


def test_per_row_seeds_make_a_row_independent_of_its_batch() -> None:
    """A prompt sampled alone with seed s gives the tokens it gets in a batch of 8 (other prompts, seeds)."""
    m = model().double()
    batch = prompts(5, 17, 1, 9, 3, 12, 7, 5)
    seeds = [11, 12, 13, 14, 15, 16, 17, 18]
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9)
    together = generate_batch(m, batch, seeds=seeds, **kw)
    alone = [generate_batch(m, [p], seeds=[s], **kw)[0] for p, s in zip(batch, seeds, strict=True)]
    assert together == alone
    assert generate(m, batch[1], seeds=[seeds[1]], **kw) == alone[1]
    assert generate_batch(m, batch[:2], seeds=[99, seeds[1]], **kw)[1] == alone[1]  # neighbour's seed is irrelevant
    assert len({tuple(t) for t in together}) == 8
    # rows 0 and 7 share a prompt: different seeds sample differently, the same seed identically
    assert generate_batch(m, [batch[0], batch[0]], seeds=[1, 2], **kw) != generate_batch(m, [batch[0]] * 2,
                                                                                          seeds=[1, 1], **kw)
    same = generate_batch(m, [batch[0], batch[0]], seeds=[1, 1], **kw)
    assert same[0] == same[1]


def test_seeds_are_checked() -> None:
    m = model()
    with pytest.raises(ValueError, match="seeds has 1 entries for 2 prompts"):
        Generation(m, prompts(3, 4), seeds=[1])
    with pytest.raises(ValueError, match="either generator or seeds"):
        Generation(m, prompts(3), seeds=[1], generator=torch.Generator())


def test_inverse_cdf_sampling_never_picks_excluded_tokens_and_follows_probabilities() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.0, 0.25, 0.25]]))
    u = torch.tensor([1e-9, 0.5, 0.5 + 1e-6, 0.75, 0.75 + 1e-6, 1.0])
    picks = sample_next(logits.expand(6, 4), temperature=1.0, uniform=u).tolist()
    assert picks == [0, 0, 2, 2, 3, 3]
    assert sample_next(logits.expand(6, 4), temperature=1.0, top_k=1, uniform=u).tolist() == [0] * 6
