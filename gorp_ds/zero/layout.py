"""Where each tensor lives in ZeRO's flat partitions: pure geometry, recomputed at start-up.

ZeRO-1/2 flatten each param group into one buffer (tensors at recorded offsets, padded for
alignment) and cut it into ``world_size`` equal partitions; rank ``r`` owns elements
``[r·P, (r+1)·P)``. A tensor may be cut anywhere, mid-row included. For every rank this module
lists the *pieces* it holds: which elements of which tensor, and where they sit in its fp32
partition. Nothing here is stored in checkpoints.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class GroupLayout:
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
