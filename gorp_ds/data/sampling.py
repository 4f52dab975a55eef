"""Deterministic, resumable batch order for distributed training (pure functions).

The order of examples is a function of (seed, task index, epoch) only, so any rank can compute
any step's batch without communication, and a run resumed at step ``s`` simply continues with
``global_batch_order(...)[s:]``.
"""

from __future__ import annotations

import numpy as np

from .config import MAX_DRAWN_PER_TASK
from .errors import DataError

__all__ = ["epoch_permutation", "global_batch_order", "rank_slice", "split_micro_batches"]


def _positive(name: str, value: int, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise DataError(
            f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}"
        )


def epoch_permutation(num_examples: int, seed: int, task_index: int, epoch: int) -> list[int]:
    """The shuffled example indices of one epoch of one task."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, task_index, epoch])
    return rng.permutation(num_examples).tolist()


def global_batch_order(
    num_examples: int, global_batch: int, num_steps: int, seed: int, task_index: int
) -> list[list[int]]:
    """Example indices of each optimizer step: ``num_steps`` lists of ``global_batch`` indices.

    Examples are drawn from a stream of per-epoch permutations (reshuffled every epoch), so each
    epoch visits every example once; a batch may straddle an epoch boundary.
    """
    _positive("num_examples", num_examples)
    _positive("global_batch", global_batch)
    _positive("num_steps", num_steps, allow_zero=True)
    needed = global_batch * num_steps
    if needed > MAX_DRAWN_PER_TASK:  # the run's checks refuse such budgets first; this guards other callers
        raise DataError(f"{num_steps} steps × global batch {global_batch} = {needed} example draws is more than "
                        f"a task's batch order may hold ({MAX_DRAWN_PER_TASK}); train fewer steps")
    stream: list[int] = []
    epoch = 0
    while len(stream) < needed:
        stream.extend(epoch_permutation(num_examples, seed, task_index, epoch))
        epoch += 1
    return [stream[s * global_batch : (s + 1) * global_batch] for s in range(num_steps)]


def rank_slice(indices: list[int], rank: int, world_size: int, accumulation: int = 1) -> list[int]:
    """The contiguous share of ``indices`` (one global batch) that rank ``rank`` processes.

    ``len(indices)`` must be divisible by ``world_size * accumulation``; the slices of ranks
    ``0..world_size-1`` concatenate back to ``indices``.
    """
    _positive("world_size", world_size)
    _positive("accumulation", accumulation)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, {world_size}), got {rank!r}")
    if len(indices) % (world_size * accumulation):
        raise DataError(
            f"global batch {len(indices)} is not divisible by world_size*accumulation = "
            f"{world_size}*{accumulation}; choose a global batch that is a multiple of {world_size * accumulation}"
        )
    share = len(indices) // world_size
    return list(indices[rank * share : (rank + 1) * share])


def split_micro_batches(indices: list[int], accumulation: int) -> list[list[int]]:
    """Split one rank's share into ``accumulation`` equal micro-batches (in order)."""
    _positive("accumulation", accumulation)
    if len(indices) % accumulation:
        raise DataError(f"{len(indices)} examples cannot be split into {accumulation} equal micro-batches")
    size = len(indices) // accumulation
    return [list(indices[i * size : (i + 1) * size]) for i in range(accumulation)]
