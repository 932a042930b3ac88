"""preprocess/packing.py: best-fit packing keeps units whole and rows full; the efficiency meta.json reports
is the real one."""

from __future__ import annotations

import numpy as np
import pytest

from preprocess import shards
from preprocess.packing import best_fit


def test_best_fit_packs_tightly_and_keeps_units_whole():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=2000)
    rows = best_fit(lengths, 256)
    assert sorted(u for r in rows for u in r) == list(range(len(lengths)))
    fill = [lengths[r].sum() for r in rows]
    assert max(fill) <= 256
    assert lengths.sum() / (len(rows) * 256) > 0.97


def test_packing_efficiency_reported(packed_sample):
    meta = shards.read_meta(packed_sample["sft"])
    f = shards.PackedFolder(packed_sample["sft"])
    real = sum(len(f.row(r)[0]) for r in range(f.n_rows))
    assert meta["packing"]["efficiency"] == pytest.approx(real / (f.n_rows * 256), abs=1e-6)
    assert meta["packing"]["efficiency"] > 0.9 > meta["packing"]["pad_to_max_efficiency"]
