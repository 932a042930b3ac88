"""model/generate.py: the KV cache gives the uncached tokens and logits; batches equal prompts run alone."""

from __future__ import annotations

import pytest
import torch

from model import ModelConfig, TinyLM
from model.attention import inference_mask
from model.decode import build_decode_weights, decode_step, decode_weights, onednn_usable
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
from model.lora import LoRAConfig, apply_lora

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


@pytest.mark.parametrize("onednn", [False, True])
@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "tiny-qwen3"])
def test_fused_decode_step_equals_model_forward(preset: str, onednn: bool) -> None:
    """decode_step over the fused copies gives the logits and cache of TinyLM.forward: dense copies in
    float64 (only the summation order differs), oneDNN-packed ones in float32 (its only dtype here)."""
    if onednn and not onednn_usable(2, torch.float32, torch.device("cpu")):
        pytest.skip("torch built without oneDNN")
    dtype = torch.float32 if onednn else torch.float64
    tol = 1e-4 if onednn else 1e-10
    m = model(preset).to(dtype)
    short, long = prompts(4, 9)
    ids = torch.tensor([[0] * 5 + short, long])
    mask = torch.tensor([[0] * 5 + [1] * 4 + [1], [1] * 10], dtype=torch.bool)
    nxt = torch.tensor([17, 2049])
    with torch.no_grad():
        ref_cache, cache = (KVCache(m.config, 2, 12, dtype=dtype) for _ in range(2))
        for c in (ref_cache, cache):
            m(ids[:, :9], attention_mask=mask[:, :9], cache=c)
        want = m(nxt[:, None], attention_mask=mask, cache=ref_cache).logits[:, -1]
        weights = build_decode_weights(m, onednn)
        assert weights.qkv[0].is_mkldnn == onednn
        got = decode_step(m, weights, nxt, torch.tensor([4, 9]), cache,
                          inference_mask(mask, 9, 1, torch.device("cpu")))
    assert cache.length == ref_cache.length == 10
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for a, b in zip(cache.keys + cache.values, ref_cache.keys + ref_cache.values, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_decode_weights_packing_follows_batch_size() -> None:
    m = model()
    assert not decode_weights(m, 1).onednn and not decode_weights(m.double(), 8).onednn
    assert decode_weights(m.float(), 8).onednn == onednn_usable(8, torch.float32, torch.device("cpu"))


def test_fused_weights_fold_lora_and_follow_weight_updates() -> None:
    m = apply_lora(model(), LoRAConfig(rank=4, alpha=8.0))
    for name, p in m.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.5)  # a non-zero adapter changes the function
    p = prompts(6)[0]
    first = decode_weights(m)
    assert decode_weights(m) is first  # unchanged weights: the copies are reused
    want = generate(m, p, max_new_tokens=12, use_cache=False)
    assert generate(m, p, max_new_tokens=12) == want
    opt = torch.optim.SGD([q for q in m.parameters() if q.requires_grad], lr=1.0)
    m.train()
    m(torch.tensor([p])).logits.square().mean().backward()
    opt.step()  # in-place update of the adapters
    rebuilt = decode_weights(m)
    assert rebuilt is not first
    moved = generate(m, p, max_new_tokens=12, use_cache=False)
    assert moved != want and generate(m, p, max_new_tokens=12) == moved


class Wrapped(torch.nn.Module):
    """Not a TinyLM (like a compile or DDP wrapper): Generation falls back to forward() with the cache."""

    def __init__(self, inner: TinyLM) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_generic_cached_path_equals_fused_path() -> None:
    m = model()
    batch = prompts(5, 17, 1, 9)
    assert generate_batch(Wrapped(m), batch, max_new_tokens=20) == generate_batch(m, batch, max_new_tokens=20)


@pytest.mark.parametrize("check_every", [1, 3, 16])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_run_equals_iteration_with_stops(check_every: int, temperature: float) -> None:
    """Generation.run (host check every N steps) gives the tokens and finish reasons of the iterator, and
    both are the free run cut before its first stop id."""
    m = model()
    batch = prompts(3, 8, 5)
    kw = dict(max_new_tokens=14, temperature=temperature, seeds=[1, 2, 3] if temperature else None)
    free = generate_batch(m, batch, **kw)
    stops = {free[0][3], free[1][6]}
    cut = [next((j for j, t in enumerate(f) if t in stops), len(f)) for f in free]
    it = Generation(m, batch, stop_ids=stops, **kw)
    list(it)
    assert it.tokens == [f[:c] for f, c in zip(free, cut, strict=True)]
    assert it.finish_reasons == [FINISH_STOP if c < 14 else FINISH_LENGTH for c in cut]
    ran = Generation(m, batch, stop_ids=stops, **kw)
    assert ran.run(check_every=check_every) == it.tokens and ran.finish_reasons == it.finish_reasons


def test_zero_budget_run() -> None:
    gen = Generation(model(), prompts(3, 4), max_new_tokens=0)
    assert gen.run() == [[], []] and gen.finish_reasons == [FINISH_LENGTH] * 2


def test_bfloat16_matmuls_approximate_the_float32_step() -> None:
    """matmul_dtype=bfloat16: each product's inputs are rounded to bf16 (rel. error ~2^-8), logits stay close."""
    m = model(initializer_range=0.02)
    batch = prompts(5, 9, 3)
    for b in (1, 3):  # dense bf16 for one row, oneDNN-packed for several
        ids = torch.tensor([p[:3] for p in batch[:b]])
        with torch.no_grad():
            caches = [KVCache(m.config, b, 4) for _ in range(2)]
            for c in caches:
                m(ids, cache=c)
            steps = [decode_step(m, decode_weights(m, b, dt), ids[:, -1], torch.full((b,), 3), c,
                                 inference_mask(None, 3, 1, torch.device("cpu")))
                     for dt, c in zip((torch.float32, torch.bfloat16), caches, strict=True)]
        assert decode_weights(m, b, torch.bfloat16).qkv[0].dtype == torch.bfloat16
        err = (steps[1] - steps[0]).abs().max() / steps[0].abs().max()
        assert 0 < err < 0.02
    out = generate_batch(m, batch, max_new_tokens=6, matmul_dtype=torch.bfloat16)
    assert [len(o) for o in out] == [6, 6, 6]
    with pytest.raises(ValueError, match="matmul_dtype needs"):
        Generation(m, batch, matmul_dtype=torch.bfloat16, use_cache=False)
    with pytest.raises(ValueError, match="matmul_dtype needs"):
        Generation(m, batch, matmul_dtype=torch.int8)
