"""What the optimizer offers the ZeRO layer for ``full`` tensors trained from projected gradients.

Between projector refreshes a ``full`` tensor needs only its low-rank gradient ``R`` (``m × k`` or
``k × n``), and ``gorp_ds.zero.lowrank_targets`` computes it from the layer's activations, so that
no ``m × n`` gradient exists. Those tensors' groups are taken out of ``param_groups``
(``GORP.detach_groups``: neither ``step()`` nor DeepSpeed sees them); their owner drives them through
the methods below. Per step it asks which members refresh (:meth:`refresh_due`), hands their full
gradients (or products of them) to :meth:`refresh_members` on refresh steps only, and hands ``R`` to
:meth:`low_rank_batch`. The state is the optimizer's (keyed by module name, per-name views of
stacked buffers), and the refresh and the low-rank step are the ones of ``GORP.update_batch``'s
path from full gradients: checkpoints, ``end_task`` and statistics treat these tensors like the rest.

A mixin of :class:`~gorp_ds.optim.gorp.GORP`, so that its methods are the optimizer's (callers and
tests reach them as ``optimizer.refresh_members`` and so on).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .param_group import UpdateConfig
from .projector import GradientProducts
from .refresh_schedule import refresh_due
from .stacks import StateStack, partition_by_step, select
from .update import BatchUpdate

if TYPE_CHECKING:
    from .gorp import GORP


class ProjectedGradientService:
    """``full`` tensors stepped from a low-rank gradient ``R`` computed outside the optimizer."""

    def full_batch(self: GORP, names: tuple[str, ...], cfg: UpdateConfig, device: torch.device) -> StateStack:
        """The bound state stack of a batch of same-shape ``full`` tensors (built on first use)."""
        stack = self._stack(tuple(names), cfg)
        stack.bind(self.state, device)
        return stack

    def refresh_due(self: GORP, names: tuple[str, ...], cfg: UpdateConfig, device: torch.device) -> list[bool]:
        """Per member: does its next step refresh the projector (its step counter and phase,
        :func:`.refresh_schedule.refresh_due`)? Host-side (CPU step counters): no device sync."""
        steps = self.full_batch(names, cfg, device).steps()
        return [refresh_due(step, phase, cfg.update_gap) for step, phase in zip(steps, self.refresh_phases(names, cfg))]

    def refresh_members(self: GORP, names: tuple[str, ...], index: list[int], grads: Tensor | None,
                        cfg: UpdateConfig, products: GradientProducts | None = None) -> list[int]:
        """New projectors for members ``index`` of the batch ``names`` from their full gradients
        ``grads`` (``(len(index), m, n)``, fp32, already averaged over data-parallel ranks), or,
        with ``grads=None``, from ``products`` of those gradients (randomized projector; the
        members must share their step counter); the members' next step must be a refresh step.
        Returns the members that have a projector now."""
        stack = self.full_batch(names, cfg, grads.device if grads is not None else products.device)
        steps = stack.steps()
        updated: list[int] = []
        parts = partition_by_step([steps[i] for i in index])
        if products is not None and (len(parts) > 1 or cfg.projector != "randomized"):
            raise ValueError("GORP.refresh_members: products need one step counter and the randomized projector")
        phases = self.refresh_phases(names, cfg)
        for step, part in parts:
            members = [index[j] for j in part]
            assert all(refresh_due(step, phases[i], cfg.update_gap) for i in members), \
                "refresh_members called on a step without a refresh"
            source = select(grads, part, len(index)) if grads is not None else products
            updated += self._refresh_partition(stack, source, step, members, cfg)
        return updated

    def projector_stack(self: GORP, names: tuple[str, ...], cfg: UpdateConfig, device: torch.device) -> Tensor:
        """``(B, n, k)`` or ``(B, m, k)`` projectors of the batch (a view; garbage for members
        without one: see :meth:`has_projector`)."""
        return self.full_batch(names, cfg, device).buffers["projector"]

    def has_projector(self: GORP, name: str) -> bool:
        return "projector" in self.state.get(name, {})

    def low_rank_batch(self: GORP, names: tuple[str, ...], low_rank: Tensor, cfg: UpdateConfig) -> list[BatchUpdate]:
        """The low-rank step of the batch ``names`` from ``R`` (``(B, m, k)`` or ``(B, k, n)``, fp32,
        averaged and clipped); members without a projector are left out (their step is skipped)."""
        stack = self.full_batch(names, cfg, low_rank.device)
        shared_all = stack.shared_stack(self.shared)
        batch, updates = len(names), []
        for step, index in partition_by_step(stack.steps()):
            index = [i for i in index if self.has_projector(names[i])]
            if not index:
                continue
            shared = select(shared_all, index, batch) if shared_all is not None else None
            updates.append(self._low_rank_partition(stack, select(low_rank, index, batch), shared, step, index, cfg))
        return updates
