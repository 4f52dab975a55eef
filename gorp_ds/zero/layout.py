"""Where each tensor lives in ZeRO's flat partitions: pure geometry, recomputed at start-up.

ZeRO-1/2 flatten each param group into one buffer (tensors at recorded offsets, padded for
alignment) and cut it into ``world_size`` equal partitions; rank ``r`` owns elements
``[r·P, (r+1)·P)``. A tensor may be cut anywhere, mid-row included (:class:`GroupLayout`).

ZeRO-3 partitions every tensor on its own: a tensor of ``N`` elements is padded to a multiple of
the world size and rank ``r`` owns its elements ``[r·p, (r+1)·p)``, ``p = ⌈N / W⌉``; each rank's
fp32 partition of a (sub-)group is its tensors' slices back to back (:class:`PartitionedLayout`).
So every tensor with at least ``W`` elements is cut across all ranks.

For every rank both list the *pieces* it holds: which elements of which tensor, and where they sit
in its fp32 partition. Nothing here is stored in checkpoints. The distributors
(``gorp_ds.zero.distributor``) read the numbers off DeepSpeed's optimizers and build the layouts
with :func:`flat_group_layout` and :func:`partitioned_layout`; this module never sees DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class FlatTensor:
    """A tensor of a param group as placed in the group's flat buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int  # start in the (padded) flat buffer

    @property
    def numel(self) -> int:
        total = 1
        for size in self.shape:
            total *= size
        return total


@dataclass(frozen=True)
class Piece:
    """Elements ``[elem_start, elem_end)`` of a flattened tensor, held at
    ``[local_start, local_end)`` of one rank's partition."""

    name: str
    shape: tuple[int, ...]
    elem_start: int
    elem_end: int
    local_start: int
    local_end: int

    @property
    def is_whole(self) -> bool:
        return self.elem_start == 0 and self.elem_end == FlatTensor(self.name, self.shape, 0).numel


class _Owners:
    """Owners and cut tensors from ``pieces`` (shared by both layouts)."""

    tensors: tuple[FlatTensor, ...]
    world_size: int

    pieces: Callable[[int], list[Piece]]  # each layout's own: rank -> its pieces

    def owners(self) -> dict[str, list[int]]:
        """Ranks holding part of each tensor (more than one for tensors cut by a boundary)."""
        result: dict[str, list[int]] = {t.name: [] for t in self.tensors}
        for rank in range(self.world_size):
            for piece in self.pieces(rank):
                result[piece.name].append(rank)
        return result

    def cut_tensors(self) -> list[FlatTensor]:
        """Tensors split across ranks, in flat-buffer order (the same list on every rank)."""
        owners = self.owners()
        return [t for t in self.tensors if len(owners[t.name]) > 1]


@dataclass(frozen=True)
class GroupLayout(_Owners):
    """All tensors of one param group and its partitioning across ``world_size`` ranks."""

    tensors: tuple[FlatTensor, ...]
    partition_size: int
    world_size: int

    def pieces(self, rank: int) -> list[Piece]:
        """The pieces rank ``rank`` holds, in flat-buffer order."""
        start = rank * self.partition_size
        end = start + self.partition_size
        held = []
        for t in self.tensors:
            lo, hi = max(t.offset, start), min(t.offset + t.numel, end)
            if lo < hi:
                held.append(Piece(t.name, t.shape, lo - t.offset, hi - t.offset, lo - start, hi - start))
        return held


def partition_numel(numel: int, world_size: int) -> int:
    """ZeRO-3's per-rank slice of a tensor: ``⌈numel / world_size⌉`` (the last ranks' tails are padding)."""
    return -(-numel // world_size)


def partition_range(numel: int, world_size: int, rank: int) -> tuple[int, int]:
    """Elements ``[start, end)`` of a flattened tensor that rank ``rank`` owns under ZeRO-3
    (``start == end`` when its slice is padding only)."""
    size = partition_numel(numel, world_size)
    start = min(rank * size, numel)
    return start, min(start + size, numel)


@dataclass(frozen=True)
class PartitionedLayout(_Owners):
    """A ZeRO-3 (sub-)group: ``tensors[i].offset`` is where tensor ``i``'s slice starts in every
    rank's fp32 partition (the sum of the previous tensors' :func:`partition_numel`)."""

    tensors: tuple[FlatTensor, ...]
    world_size: int

    def pieces(self, rank: int) -> list[Piece]:
        held = []
        for t in self.tensors:
            lo, hi = partition_range(t.numel, self.world_size, rank)
            if lo < hi:
                held.append(Piece(t.name, t.shape, lo, hi, t.offset, t.offset + hi - lo))
        return held


def flat_group_layout(tensors: list[tuple[str, tuple[int, ...], int]], partition_size: int,
                      world_size: int) -> GroupLayout:
    """A ZeRO-1/2 param group from ``(name, shape, offset in the flat buffer)`` of each tensor."""
    return GroupLayout(tuple(FlatTensor(name, tuple(shape), int(offset)) for name, shape, offset in tensors),
                       int(partition_size), world_size)


class PartitioningMismatch(ValueError):
    """DeepSpeed partitioned a ZeRO-3 tensor otherwise than :func:`partition_numel` says."""


def partitioned_layout(tensors: list[tuple[str, tuple[int, ...], int, int]], flat_numel: int,
                       world_size: int) -> PartitionedLayout:
    """A ZeRO-3 sub-group from ``(name, shape, numel, slice elements per rank)`` of each tensor, in
    the order of its fp32 partition of ``flat_numel`` elements: each slice must be
    ``⌈numel / W⌉`` and the slices must fill the partition exactly."""
    placed, offset = [], 0
    for name, shape, numel, size in tensors:
        if size != partition_numel(numel, world_size):
            raise PartitioningMismatch(f"ZeRO-3 partitions {name!r} into {size} elements per rank, not "
                                       f"ceil({numel}/{world_size}); unsupported partitioning")
        placed.append(FlatTensor(name, tuple(shape), offset))
        offset += size
    if offset != flat_numel:
        raise PartitioningMismatch(f"ZeRO-3 fp32 partition of {flat_numel} elements for {offset} in its tensors")
    return PartitionedLayout(tuple(placed), world_size)
