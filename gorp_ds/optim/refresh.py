"""Projector refreshes of ``full`` tensors (docs/algorithm.md §2): the one place the optimizer runs them.

Every ``update_gap`` steps a ``full`` tensor's projector is recomputed from its gradient ``G`` (or
from products of ``G`` when only those exist, ``gorp_ds.zero.lowrank_targets``), at the steps
:mod:`.refresh_schedule` gives it (all tensors together, or spread over the cycle). Whichever path asks
(``GORP.update_batch`` from full gradients, ``GORP.refresh_members`` from the ZeRO layer), the
refresh goes through :meth:`ProjectorRefresher.refresh`, which also keeps the run's refresh
statistics: how many member refreshes were attempted, how long they took (:mod:`.refresh_timer`),
and how many failed (counted on the device, read at logging intervals).

A member whose gradient or decomposition is not finite keeps its previous projector. On the first
refresh of a task there is none, so the host must know which members got one: one read of the
success flags per batch and task, the only host-device sync of the step path besides torch's own
``eigh``/``svd`` error checks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ..log import get_logger
from .param_group import UpdateConfig
from .projector import GradientProducts, projector_seed
from .refresh_schedule import refresh_index
from .refresh_timer import RefreshTimer
from .stacks import StateStack, select, store
from .update import refresh_projectors

log = get_logger(__name__)


class ProjectorRefresher:
    """Runs refreshes on stacked state and counts them. ``synchronize`` (profiling): time each
    refresh between device syncs instead of with CUDA events."""

    def __init__(self) -> None:
        self.synchronize = False
        self.count = 0  # member refreshes attempted (a host counter, free to read)
        self.timer = RefreshTimer()
        self._failures: dict[torch.device, Tensor] = {}  # failed member refreshes this run, per device (int64)
        self._failures_reported = 0

    def refresh(self, stack: StateStack, state: dict, source: Tensor | GradientProducts, step: int,
                index: list[int], cfg: UpdateConfig, task: int, phases: list[int]) -> list[int]:
        """New projectors for members ``index`` of ``stack`` (all at ``step``, a refresh step of task
        number ``task``; ``phases``: theirs, :mod:`.refresh_schedule`) from their gradients ``source``
        (``(len(index), m, n)`` fp32), or from products of them (randomized projector). Returns the
        members that have a projector now (all, except members whose first refresh of the task
        failed); ``state`` (the optimizer's per-name state) gains the views of members that got
        their first projector."""
        batch, buffers = len(stack.names), stack.buffers
        previous = select(buffers["projector"], index, batch) if step > 0 else None
        # Seeded by name and counters every co-owner of a tensor knows: co-owners agree on the projector.
        seeds = [projector_seed(stack.names[i], task, refresh_index(step, phase, cfg.update_gap))
                 for i, phase in zip(index, phases)]
        device = source.device
        with self.timer(device, self.synchronize):
            projector, ok = refresh_projectors(source, previous, cfg, seeds, stack.shape)
        self.count += len(index)
        failed = ok.logical_not()  # (len(index),) bool, on the device
        failures = select(buffers["projector_failures"], index, batch)
        failures.add_(failed)
        store(buffers["projector_failures"], index, failures)
        total = self._failures.get(device)
        if total is None:
            total = self._failures[device] = torch.zeros((), dtype=torch.int64, device=device)
        total.add_(failed.sum())
        if previous is None:
            # First refresh of the task: there is no projector to fall back on, so the host must
            # know which members have one at all (one read per batch and task).
            good = [j for j, flag in enumerate(ok.tolist()) if flag]
            if len(good) < len(index):
                projector = select(projector, good, len(index)) if good else projector
                index = [index[j] for j in good]
            if not index:
                return []
            stack.attach_low_rank(state, index)
        store(buffers["projector"], index, projector)
        return index

    def seconds(self) -> float:
        """Refresh time so far (reads the CUDA events: a device sync)."""
        return self.timer.seconds()

    def poll_failures(self, states: Iterable[tuple[str, dict[str, Tensor]]]) -> int:
        """Failed member refreshes of this run so far (a device read); logs a warning naming the
        tensors of ``states`` (``(name, per-tensor state)``) with failures when there are new ones
        since the last call."""
        total = sum(int(count) for count in self._failures.values())
        if total > self._failures_reported:
            failing = [name for name, state in states
                       if "projector_failures" in state and int(state["projector_failures"]) > 0]
            log.warning(f"{total - self._failures_reported} projector refresh(es) failed (non-finite gradient or "
                        f"decomposition); the previous projectors were kept. Tensors with failures this task: "
                        f"{', '.join(failing) or 'none held'}")
            self._failures_reported = total
        return total
