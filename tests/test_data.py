"""train/data.py: batch layout, deterministic order, rank sharding, resumable position, prefetch; a dpo
dataset refuses a row that splits a pair. (Opening a folder checks it against meta.json: tests/test_shards.py,
since PackedDataset is a shards.PackedFolder.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_shards import small_dataset

from preprocess import shards
from train.data import BatchLoader, PackedDataset, Split, permute


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4099])
def test_permute_is_a_bijection_that_depends_on_the_key(n):
    a, b = permute(np.arange(n), n, key=1), permute(np.arange(n), n, key=2)
    assert sorted(a.tolist()) == list(range(n)) == sorted(b.tolist())
    if n > 16:
        assert (a != b).any() and (a != np.arange(n)).any()


def test_packed_batch_layout(packed_sample):
    ds = PackedDataset(packed_sample["sft"])
    batch = ds.collate(np.arange(8))
    for i in range(8):
        tokens, mask, lens = ds.row(i)
        n, tokens, mask = len(tokens), np.asarray(tokens), np.asarray(mask)
        ids, tgt, w = batch.input_ids[i].numpy(), batch.targets[i].numpy(), batch.weights[i].numpy()
        docs, pos = batch.doc_ids[i].numpy(), batch.position_ids[i].numpy()
        assert (ids[:n] == tokens).all() and (docs[n:] == -1).all() and (w[n:] == 0).all()
        starts = np.cumsum(lens) - lens
        for d, (s, length) in enumerate(zip(starts, lens, strict=True)):
            assert (docs[s:s + length] == d).all()
            assert (pos[s:s + length] == np.arange(length)).all()
            # inside a document, position j predicts token j+1 with that token's mask weight
            assert (tgt[s:s + length - 1] == tokens[s + 1:s + length]).all()
            assert (w[s:s + length - 1] == mask[s + 1:s + length]).all()
            assert w[s + length - 1] == 0, "no loss across a document boundary"


def test_pretrain_windows(packed_sample):
    ds = PackedDataset(packed_sample["pretrain"])
    assert ds.n_rows == sum((len(s.tokens) - 1) // 256 for s in ds.shards)
    batch = ds.collate(np.array([0, 1]))
    assert batch.doc_ids is None and batch.position_ids is None
    first = np.asarray(ds.shards[0].tokens[:513])
    assert (batch.input_ids[0].numpy() == first[:256]).all() and (batch.targets[0].numpy() == first[1:257]).all()
    assert (batch.input_ids[1].numpy() == first[256:512]).all() and (batch.targets[1].numpy() == first[257:513]).all()


def test_order_is_deterministic_covers_each_epoch_and_reshuffles(packed_sample):
    split = Split(PackedDataset(packed_sample["sft"]), val_rows=5)
    n = split.n_train
    epoch0, epoch1 = split.train_rows(np.arange(n), seed=3), split.train_rows(np.arange(n, 2 * n), seed=3)
    val = set(split.val_rows_list().tolist())
    assert len(val) == 5 and not val & set(epoch0.tolist())
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == sorted(set(range(split.dataset.n_rows)) - val)
    assert (epoch0 != epoch1).any()
    assert (split.train_rows(np.arange(n), seed=3) == epoch0).all()
    assert (split.train_rows(np.arange(n), seed=4) != epoch0).any()
    assert set(Split(split.dataset, 5).val_rows_list().tolist()) == val, "the split ignores the training seed"


def test_ranks_partition_the_global_batch_and_any_world_size_resumes(packed_sample):
    split = Split(PackedDataset(packed_sample["sft"]), val_rows=4)
    def step_inputs(world: int, accum: int, start: int) -> list[bytes]:
        rows = []
        for rank in range(world):
            loader = BatchLoader(split, micro_batch=2, rank=rank, world=world, seed=0)
            rows += [r.numpy().tobytes() for m in range(accum) for r in loader.micro_batch_at(start, m).input_ids]
        return sorted(rows)
    # the same global batch of 8 samples, cut as 1x4x2, 2x2x2, 4x1x2 (world x accum x micro)
    assert step_inputs(1, 4, 16) == step_inputs(2, 2, 16) == step_inputs(4, 1, 16)


def test_steps_resume_from_a_sample_count_and_prefetch_matches(packed_sample):
    split = Split(PackedDataset(packed_sample["sft"]), val_rows=4)
    loader = BatchLoader(split, micro_batch=3, seed=7, prefetch=2)
    eager = BatchLoader(split, micro_batch=3, seed=7, prefetch=0)
    it = loader.steps(0, accum=2)
    stream = [next(it) for _ in range(5)]
    resumed = eager.steps(3 * loader.global_batch(2), accum=2)
    for want in stream[3:]:
        got = next(resumed)
        for a, b in zip(want, got, strict=True):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.weights, b.weights)


def test_validation_batches_have_fixed_shapes_and_cover_the_split_once(packed_sample):
    split = Split(PackedDataset(packed_sample["sft"]), val_rows=7)
    seen = []
    for rank in range(2):
        for batch in BatchLoader(split, micro_batch=2, rank=rank, world=2).val_batches():
            assert batch.input_ids.shape == (2, 256)
            seen += [r.numpy().tobytes() for r, w in zip(batch.input_ids, batch.weights, strict=True) if r.any()]
    expected = split.dataset.collate(split.val_rows_list()).input_ids
    assert sorted(seen) == sorted(r.numpy().tobytes() for r in expected)


def test_split_refuses_to_leave_no_training_rows(packed_sample):
    ds = PackedDataset(packed_sample["sft"])
    with pytest.raises(ValueError, match="cannot spare"):
        Split(ds, ds.n_rows)


def test_prefetch_thread_reraises_errors(packed_sample):
    split = Split(PackedDataset(packed_sample["sft"]), val_rows=0)
    loader = BatchLoader(split, micro_batch=2)
    split.dataset.shards = []  # simulate a dataset that breaks under the loader
    with pytest.raises(IndexError):
        next(loader.steps(0, accum=1))


def test_a_dpo_row_that_splits_a_pair_is_refused(tmp_path):
    from train.stages.dpo import DPODataset

    folder = small_dataset(tmp_path / "dpo", stage="dpo")
    assert DPODataset(folder).n_rows > 0
    meta = json.loads((folder / "meta.json").read_text())
    shard = shards.open_shard(folder, "shard_00000", "uint16")
    row_docs = np.concatenate([[0, 1], np.asarray(shard.row_docs)[1:] + 1])
    row_docs[-1] = shard.n_docs
    row_docs = np.unique(row_docs)  # [0, 1, 3, 5, ...]: the first row holds half a pair
    arrays = shards.ShardArrays(np.array(shard.tokens), np.array(shard.weights), np.array(shard.doc_offsets), row_docs)
    meta["shards"][0] = shards.write_shard(folder, 0, arrays, "uint16", {})
    (folder / "meta.json").write_text(json.dumps(meta))
    assert PackedDataset(folder).n_rows > 0  # a sound sft-style folder ...
    with pytest.raises(shards.ShardError) as info:
        DPODataset(folder)  # ... but not a dpo one
    assert str(info.value) == (f"{folder / 'shard_00000.idx'}: a dpo row starts inside a (chosen, rejected) pair: "
                               "rows must hold whole pairs")


def test_packed_rows_and_rollouts_each_implement_the_loops_protocol():
    """The loop reads only ``train.batches.Batches``; both sources provide every member of it themselves."""
    from train.batches import Batches
    from train.rollout import RolloutLoader

    members = {name for name in vars(Batches) if not name.startswith("_")} | set(Batches.__annotations__)
    assert {"steps", "val_batches", "global_batch", "eval_rows", "step_metrics", "shown", "seq_len"} <= members
    for source in (BatchLoader, RolloutLoader):
        assert all(hasattr(source, name) for name in members), source
    assert not issubclass(RolloutLoader, BatchLoader)
