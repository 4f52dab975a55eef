"""GORP steps on ZeRO-1/2 flat partitions.

DeepSpeed hands the optimizer, per param group, one flat fp32 master partition with its averaged
(and clipped) gradient. This driver maps it back to per-tensor pieces (``layout.py``) and runs the
single update implementation (``GORP.update_tensor``) on them:

- ``plain`` pieces are elementwise: each rank updates its slice with state for that slice only.
- ``lora_*``/``full`` tensors wholly inside the partition are viewed in their 2-D shape and updated
  in place; their low-rank state (projector, moments, S) exists only on this rank.
- tensors cut by a partition boundary (mid-row too) need their full gradient on every co-owner:
  the owners' slices are summed into one buffer per group with a single all-reduce, each co-owner
  computes the same update (randomized projectors are seeded by name and refresh index, so they
  agree) and applies its own slice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..optim.gorp import GORP
from ..optim.update import TensorUpdate, UpdateConfig, apply_update_
from .layout import GroupLayout, Piece

AllReduce = Callable[[Tensor], None]


class ZeroDriver:
    """Drives GORP on one rank's ZeRO partitions. ``all_reduce`` sums a tensor over the
    data-parallel group in place."""

    def __init__(self, layouts: list[GroupLayout], rank: int, all_reduce: AllReduce) -> None:
        self.layouts = layouts
        self.rank = rank
        self.all_reduce = all_reduce
        self.pieces: list[list[Piece]] = [layout.pieces(rank) for layout in layouts]
        self.cut: list[list] = [layout.cut_tensors() for layout in layouts]

    def group_index(self, optimizer: GORP, group: dict[str, Any]) -> int:
        return optimizer.tensor_meta[group["names"][0]][2]

    def step_group(self, optimizer: GORP, group: dict[str, Any]) -> None:
        index = self.group_index(optimizer, group)
        flat_param: Tensor = group["params"][0]
        flat_grad = flat_param.grad
        if flat_grad is None:
            raise RuntimeError(f"GORP/ZeRO: no gradient partition for param group {index} at step time")
        cfg = UpdateConfig.from_group(group)
        full_grads = self._full_gradients(index, flat_grad) if cfg.role != "plain" else {}
        for piece in self.pieces[index]:
            local_param = flat_param.narrow(0, piece.local_start, piece.local_end - piece.local_start)
            local_grad = flat_grad.narrow(0, piece.local_start, piece.local_end - piece.local_start)
            if cfg.role == "plain":
                update = optimizer.update_tensor(piece.name, local_grad, cfg)
                apply_update_(local_param, update, cfg)
                continue
            grad = full_grads[piece.name] if piece.name in full_grads else local_grad.view(piece.shape)
            update = optimizer.update_tensor(piece.name, grad, cfg)
            if update is None:
                continue
            if piece.is_whole:
                apply_update_(local_param.view(piece.shape), update, cfg)
            else:
                own = update.direction.reshape(-1)[piece.elem_start : piece.elem_end]
                apply_update_(local_param, TensorUpdate(own, update.step_size, update.refreshed), cfg)

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
            flat = optimizer.param_groups[index]["params"][0]
            for piece in pieces:
                result[piece.name] = (piece, flat.narrow(0, piece.local_start, piece.local_end - piece.local_start))
        return result
