"""preprocess.textfilters.DigestSet (the duplicate index's storage) against a Python set, the reference."""

from __future__ import annotations

import random

import pytest

from preprocess.textfilters import DigestSet, DuplicateIndex, Fingerprint


@pytest.mark.parametrize("buffer", [1, 3, 64, 1 << 18])
def test_membership_equals_a_python_set(buffer):
    rng = random.Random(buffer)
    pool = [0, 1, 2**63, 2**64 - 1, *(rng.getrandbits(64) for _ in range(400))]
    digests, reference = DigestSet(buffer), set()
    for _ in range(600):
        batch = tuple(rng.choice(pool) for _ in range(rng.randrange(0, 10)))
        probe = tuple(rng.choice(pool) for _ in range(rng.randrange(0, 10)))
        assert digests.contains_any(probe) == any(v in reference for v in probe)
        assert all((v in digests) == (v in reference) for v in probe)
        digests.update(batch)
        reference.update(batch)
    assert len(digests.recent) < buffer and all(v in digests for v in reference)
    assert len(set(digests.sorted.tolist()) | digests.recent) == len(reference)  # every digest kept, none twice
    assert len(set(digests.sorted.tolist())) == len(digests.sorted)
    assert (digests.sorted[1:] > digests.sorted[:-1]).all()


def test_index_answers_exact_near_or_none_across_merges():
    index = DuplicateIndex()
    index.exact.buffer = index.bands.buffer = 2
    for i in range(10):
        index.add(Fingerprint(i, (100 + i, 200 + i)))
    assert [index.match(Fingerprint(3, ())), index.match(Fingerprint(99, (0, 205))),
            index.match(Fingerprint(99, (0, 1)))] == ["exact", "near", None]
    assert len(index) == 10 and len(index.exact.sorted) == 10 and not index.exact.recent
