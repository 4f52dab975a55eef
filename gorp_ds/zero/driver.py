"""GORP steps on ZeRO-1/2 flat partitions.

DeepSpeed hands the optimizer, per param group, one flat fp32 master partition with its averaged
(and clipped) gradient. This driver maps it back to per-tensor pieces (``layout.py``) and runs the
single batched update implementation (``GORP.update_batch``) on them:

- ``plain`` pieces are elementwise: each rank updates its slices (one list, ``torch._foreach_*``)
  with state for those slices only.
- ``lora_*``/``full`` tensors wholly inside the partition are grouped by shape; a group whose
  tensors sit at equally spaced offsets (consecutive same-shape tensors, or every other tensor of
  alternating shapes) is one zero-copy ``(B, m, n)`` strided view of the flat gradient and of the
  flat master weights, updated in place. Their low-rank state (projector, moments, S) exists only
  on this rank.
- tensors cut by a partition boundary (mid-row too) need their full gradient on every co-owner:
  the owners' slices are summed into one buffer per group with a single all-reduce, each co-owner
  computes the same update (randomized projectors are seeded by name and refresh index, so they
  agree) and applies its own slice.

The batches are derived from the layout once, at start-up; nothing of them is stored.

Under ZeRO-3 the layouts are per sub-group (:class:`~.layout.PartitionedLayout`: every tensor cut
across the ranks, so LoRA factors take the cut-tensor path above) and DeepSpeed steps one
sub-group at a time with only that group's flat partition in ``param_groups`` (the others empty):
``flats`` then names each layout's fp32 partition, and a group is found by its partition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..optim.gorp import GORP
from ..optim.param_group import UpdateConfig
from ..optim.update import BatchUpdate, apply_direction_
from .layout import GroupLayout, PartitionedLayout, Piece

AllReduce = Callable[[Tensor], None]


@dataclass(frozen=True)
class WholeBatch:
    """Same-shape pieces held whole, at local offsets ``start + i · period`` of the partition."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    start: int
    period: int

    def view(self, flat: Tensor) -> Tensor:
        """``(B, *shape)`` strided view of a flat partition (gradient or master weights)."""
        inner = [1] * len(self.shape)
        for axis in range(len(self.shape) - 2, -1, -1):
            inner[axis] = inner[axis + 1] * self.shape[axis + 1]
        return flat.as_strided((len(self.names), *self.shape), (self.period, *inner),
                               flat.storage_offset() + self.start)


def whole_batches(pieces: list[Piece]) -> list[WholeBatch]:
    """Group whole 2-D pieces by shape into runs of equally spaced offsets (flat-buffer order)."""
    by_shape: dict[tuple[int, ...], list[Piece]] = {}
    for piece in pieces:
        if piece.is_whole:
            by_shape.setdefault(piece.shape, []).append(piece)
    batches = []
    for shape, members in by_shape.items():
        run: list[Piece] = []
        for piece in members + [None]:  # type: ignore[list-item]
            if piece is not None and (len(run) < 2 or piece.local_start - run[-1].local_start == run[1].local_start - run[0].local_start):
                run.append(piece)
                continue
            if run:
                period = run[1].local_start - run[0].local_start if len(run) > 1 else run[0].local_end - run[0].local_start
                batches.append(WholeBatch(tuple(p.name for p in run), shape, run[0].local_start, period))
            run = [piece] if piece is not None else []
    return batches


class ZeroDriver:
    """Drives GORP on one rank's ZeRO partitions. ``all_reduce`` sums a tensor over the
    data-parallel group in place."""

    def __init__(self, layouts: list[GroupLayout] | list[PartitionedLayout], rank: int, all_reduce: AllReduce,
                 flats: list[Tensor] | None = None) -> None:
        self.layouts = layouts
        self.rank = rank
        self.all_reduce = all_reduce
        # ZeRO-3: the fp32 partition of each layout (sub-group), and layout index by partition.
        self.flats = flats
        self._by_flat = {id(flat): i for i, flat in enumerate(flats)} if flats is not None else {}
        self.pieces: list[list[Piece]] = [layout.pieces(rank) for layout in layouts]
        self.cut: list[list] = [layout.cut_tensors() for layout in layouts]
        self.whole: list[list[WholeBatch]] = [whole_batches(pieces) for pieces in self.pieces]

    def group_index(self, optimizer: GORP, group: dict[str, Any]) -> int:
        """The layout of ``group``: its param group (ZeRO-1/2) or the sub-group whose fp32
        partition it carries now (ZeRO-3)."""
        if self.flats is not None:
            return self._by_flat[id(group["params"][0])]
        return optimizer.tensor_meta[group["names"][0]][2]

    def step_group(self, optimizer: GORP, group: dict[str, Any], cfg: UpdateConfig) -> None:
        if not group["params"]:  # ZeRO-3 steps one sub-group at a time; the other groups are empty then
            return
        index = self.group_index(optimizer, group)
        flat_param: Tensor = group["params"][0]
        flat_grad = flat_param.grad
        if flat_grad is None:
            raise RuntimeError(f"GORP/ZeRO: no gradient partition for param group {index} at step time")
        pieces = self.pieces[index]

        def local(flat: Tensor, piece: Piece) -> Tensor:
            return flat.narrow(0, piece.local_start, piece.local_end - piece.local_start)

        if cfg.role == "plain":
            names = [p.name for p in pieces]
            for update in optimizer.update_batch(names, [local(flat_grad, p) for p in pieces], cfg):
                update.apply_([local(flat_param, pieces[i]) for i in update.index], cfg)
            return
        for batch in self.whole[index]:
            params = batch.view(flat_param)
            for update in optimizer.update_batch(list(batch.names), batch.view(flat_grad), cfg):
                targets = params if len(update.index) == len(batch.names) else [params[i] for i in update.index]
                update.apply_(targets, cfg)
        full_grads = self._full_gradients(index, flat_grad)
        for piece in pieces:
            if piece.name not in full_grads:
                continue
            for update in optimizer.update_batch([piece.name], full_grads[piece.name].unsqueeze(0), cfg):
                self._apply_slice(update, local(flat_param, piece), piece, cfg)

    @staticmethod
    def _apply_slice(update: BatchUpdate, target: Tensor, piece: Piece, cfg: UpdateConfig) -> None:
        """This rank's elements of a cut tensor's update."""
        step = update.step
        own = step.direction()[0].reshape(-1)[piece.elem_start : piece.elem_end]
        apply_direction_([target], [own], step.step_size, cfg)

    def _full_gradients(self, index: int, flat_grad: Tensor) -> dict[str, Tensor]:
        """Full gradients of the group's cut tensors: every rank writes the slices it holds into
        a zero buffer (all cut tensors back to back) and one all-reduce sums them."""
        cut = self.cut[index]
        if not cut:
            return {}
        offsets, total = {}, 0
        for tensor in cut:
            offsets[tensor.name] = total
            total += tensor.numel
        buffer = torch.zeros(total, dtype=torch.float32, device=flat_grad.device)
        for piece in self.pieces[index]:
            if piece.name in offsets:
                start = offsets[piece.name] + piece.elem_start
                buffer[start : start + piece.elem_end - piece.elem_start].copy_(
                    flat_grad[piece.local_start : piece.local_end]
                )
        self.all_reduce(buffer)
        return {t.name: buffer[offsets[t.name] : offsets[t.name] + t.numel].view(t.shape) for t in cut}

    # ------------------------------------------------------------------ master weights
    def master_pieces(self, optimizer: GORP) -> dict[str, tuple[Piece, Tensor]]:
        """``{name: (piece, fp32 master slice)}`` for every piece this rank holds (views, not copies)."""
        result = {}
        for index, pieces in enumerate(self.pieces):
            flat = self.flats[index] if self.flats is not None else optimizer.param_groups[index]["params"][0]
            for piece in pieces:
                result[piece.name] = (piece, flat.narrow(0, piece.local_start, piece.local_end - piece.local_start))
        return result
