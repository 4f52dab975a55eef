"""Step drivers: who turns a param group's gradients into ``GORP.update_batch`` calls, and where
the updates land.

The optimizer computes updates per batch of same-shape tensors; *where* those tensors live is a
driver's business. :class:`LocalDriver` (the default, the reference path) updates whole parameters
in one process; the ZeRO layer installs its own driver (``gorp_ds.zero.driver.ZeroDriver``) that
updates the slices of DeepSpeed's flat partitions a rank owns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

from .param_group import UpdateConfig

if TYPE_CHECKING:
    from .gorp import GORP


class StepDriver(Protocol):
    """Runs one optimizer step for one param group (single process, ZeRO partition, …) with the
    group's hyperparameters ``cfg`` (parsed by the optimizer)."""

    def step_group(self, optimizer: GORP, group: dict[str, Any], cfg: UpdateConfig) -> None: ...


class LocalDriver:
    """Whole parameters in one process: the reference path. Protected tensors of one shape are
    stacked (one copy of their gradients) and updated as one batch; ``plain`` tensors as lists."""

    def __init__(self) -> None:
        self._batches: dict[int, list[list[int]]] = {}  # group index -> positions of same-shape tensors

    def _shape_batches(self, optimizer: GORP, index: int, group: dict[str, Any]) -> list[list[int]]:
        if index not in self._batches:
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for position, name in enumerate(group["names"]):
                by_shape.setdefault(optimizer.tensor_meta[name][1], []).append(position)
            self._batches[index] = list(by_shape.values())
        return self._batches[index]

    def step_group(self, optimizer: GORP, group: dict[str, Any], cfg: UpdateConfig) -> None:
        params, names = group["params"], group["names"]
        for param, name in zip(params, names):
            if param.grad is not None and param.grad.is_sparse:
                raise ValueError(f"GORP: sparse gradient for {name!r} is not supported")
        if cfg.role == "plain":
            held = [i for i, p in enumerate(params) if p.grad is not None]
            grads = [params[i].grad if params[i].grad.dtype == torch.float32 else params[i].grad.float() for i in held]
            for update in optimizer.update_batch([names[i] for i in held], grads, cfg):
                update.apply_([params[held[j]] for j in update.index], cfg)
            return
        index = optimizer.tensor_meta[names[0]][2]
        for positions in self._shape_batches(optimizer, index, group):
            held = [i for i in positions if params[i].grad is not None]
            if not held:
                continue
            grads = torch.stack([params[i].grad for i in held]).float()  # (B, m, n) fp32
            for update in optimizer.update_batch([names[i] for i in held], grads, cfg):
                update.apply_([params[held[j]] for j in update.index], cfg)
