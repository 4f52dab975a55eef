"""Deterministic, resumable batch order and rank slicing."""

from __future__ import annotations

import pytest

from gorp_ds.data import DataError, global_batch_order, rank_slice, split_micro_batches


def test_deterministic_and_task_dependent() -> None:
    a = global_batch_order(100, 16, 20, seed=3, task_index=0)
    assert a == global_batch_order(100, 16, 20, seed=3, task_index=0)
    assert a != global_batch_order(100, 16, 20, seed=4, task_index=0)
    assert a != global_batch_order(100, 16, 20, seed=3, task_index=1)
    assert len(a) == 20 and all(len(b) == 16 for b in a)


def test_epochs_are_reshuffled_permutations() -> None:
    order = global_batch_order(48, 16, 9, seed=0, task_index=2)  # exactly 3 epochs
    flat = [i for b in order for i in b]
    epochs = [flat[k * 48 : (k + 1) * 48] for k in range(3)]
    assert all(sorted(e) == list(range(48)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_resumable_prefix_and_straddling_batches() -> None:
    long = global_batch_order(10, 4, 30, seed=1, task_index=0)
    assert global_batch_order(10, 4, 7, seed=1, task_index=0) == long[:7]
    flat = [i for b in long for i in b]
    assert all(sorted(flat[k * 10 : (k + 1) * 10]) == list(range(10)) for k in range(12))
    assert global_batch_order(5, 16, 2, seed=0, task_index=0)[0].count(0) >= 3  # batch > dataset
    assert global_batch_order(5, 4, 0, seed=0, task_index=0) == []


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (2, 4), (4, 2), (8, 2)])
def test_rank_slices_cover_the_global_batch(world: int, accum: int) -> None:
    (batch,) = global_batch_order(1000, 16, 1, seed=7, task_index=0)
    slices = [rank_slice(batch, r, world, accumulation=accum) for r in range(world)]
    assert [i for s in slices for i in s] == batch
    assert all(len(s) == 16 // world for s in slices)
    micro = split_micro_batches(slices[0], accum)
    assert len(micro) == accum and [i for m in micro for i in m] == slices[0]


def test_rank_slice_errors() -> None:
    batch = list(range(12))
    with pytest.raises(DataError, match="not divisible"):
        rank_slice(batch, 0, 5)
    with pytest.raises(DataError, match=r"world_size\*accumulation = 4\*2"):
        rank_slice(batch, 0, 4, accumulation=2)
    with pytest.raises(DataError, match="rank"):
        rank_slice(batch, 4, 4)
    with pytest.raises(ValueError, match="global_batch"):
        global_batch_order(10, 0, 1, seed=0, task_index=0)
    with pytest.raises(ValueError, match="num_examples"):
        global_batch_order(0, 4, 1, seed=0, task_index=0)
