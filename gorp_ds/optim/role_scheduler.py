"""The run's learning-rate schedule driving GORP's param groups: torch's ``LambdaLR`` with the
factor of :class:`~.schedule.Schedule`, extended to GORP's detached groups.

Every group, whatever its role (``lora_a``, ``lora_b``, ``full``, ``plain``), is scaled from its own
base learning rate (``--lr-lora``, ``--lr-full``, ``--lr-plain``): ``lr = base · factor(position)``,
where ``position`` is the number of optimizer steps the run has taken. The step reads ``group["lr"]``
(``GORP.group_config`` rebuilds a group's typed config when it changed), and under DeepSpeed ZeRO the
wrapping optimizer steps GORP over these same group dicts, so writing them is all a schedule takes.

GORP's *detached* groups (``full`` targets trained from projected gradients, outside
``param_groups`` so that DeepSpeed never sees them) are written here too: torch's scheduler knows
only ``param_groups``.

State (``state_dict``) is the position and, for the record, the schedule and base rates. Loading it
takes the position only: the base rates are this run's (a resume may change ``--lr-*``; the new
value applies from the resumed step, as for every group setting), and so is the schedule.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from .schedule import Schedule

# torch warns when a scheduler steps before its optimizer: a continual run's first step may be
# skipped (a non-finite gradient, DeepSpeed's overflow check) and still counts as a step.
_ORDER_WARNING = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


class RoleScheduler(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` over ``optimizer``'s groups (detached ones included) with ``schedule.factor``
    (1 for a role outside ``schedule.roles``).
    Call :meth:`step` once per optimizer step, after it; :meth:`seek` sets the position directly."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule) -> None:
        self.schedule = schedule
        self.detached: list[dict[str, Any]] = list(getattr(optimizer, "detached_groups", []))
        self.detached_base_lrs = [float(g["lr"]) for g in self.detached]
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]  # this run's base rate (a loaded checkpoint's may differ)

        # One factor per group, by its role (bound methods and plain functions: LambdaLR's state
        # then holds none of them).
        super().__init__(optimizer, [schedule.factor_of(g["role"]) for g in optimizer.param_groups])

    @property
    def position(self) -> int:
        """Optimizer steps taken so far: the next update uses ``factor(position)``."""
        return int(self.last_epoch)

    def step(self, epoch: int | None = None) -> None:  # type: ignore[override]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_ORDER_WARNING)
            super().step(epoch)
        self._write_detached()

    def seek(self, position: int) -> None:
        """Every group's learning rate for the update after ``position`` steps (a resume)."""
        self.last_epoch = position
        lrs = [base * fn(position) for fn, base in zip(self.lr_lambdas, self.base_lrs, strict=True)]
        for group, base, lr in zip(self.optimizer.param_groups, self.base_lrs, lrs, strict=True):
            group["lr"], group["initial_lr"] = lr, base
        self._last_lr = lrs
        self._write_detached()

    def _write_detached(self) -> None:
        for group, base in zip(self.detached, self.detached_base_lrs, strict=True):
            group["lr"] = base * self.schedule.factor_of(group["role"])(self.last_epoch)

    def learning_rates(self) -> dict[str, float]:
        """``{role: lr}`` of every group now (groups of one role share their rate)."""
        return {g["role"]: float(g["lr"]) for g in [*self.optimizer.param_groups, *self.detached]}

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"position": self.position, "schedule": dataclasses.asdict(self.schedule),
                "base_lrs": [float(b) for b in self.base_lrs], "detached_base_lrs": list(self.detached_base_lrs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self.seek(int(state_dict["position"]))
