"""Learning-rate schedules as pure functions of the optimizer step: the factor every param group's
own learning rate is multiplied by (``lr = base_lr · factor``).

One schedule is a warmup followed by a decay, over a *span* of ``total`` optimizer steps:

- warmup, steps ``k = 0 … W−1`` (0-based: the ``k+1``-th update): ``factor = (k + 1) / W``, so the
  first update already moves the weights and the last warmup step reaches the full rate;
- then, with ``p = (k − W) / (total − W)`` (0 at the first step after warmup, below 1 at the span's
  last step, 1 from ``total`` on): ``constant`` 1; ``linear`` ``m + (1 − m)(1 − p)``; ``cosine``
  ``m + (1 − m)(1 + cos πp) / 2``, where ``m`` is the minimum ratio the decay tends to.

A continual-learning run has one span per task (``scope="task"``: the schedule restarts at every
task over that task's steps) or one span of all tasks' steps together (``scope="sequence"``).
:class:`Schedule` maps the run's optimizer-step *position* (steps done so far, all tasks
together) to the factor; :mod:`.role_scheduler` writes it into the optimizer's groups.
``later_ratio`` multiplies the factor of every step after the first task's span (the first task
at the full rate, the later ones at a fraction of it, as O-LoRA's LLaMA recipe trains: 1e-3, then
1e-4); a schedule of one span (a method that mixes the tasks) has no later tasks.

Plain Python: no torch, no distributed imports.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

SCHEDULE_KINDS = ("constant", "linear", "cosine")
SCHEDULE_SCOPES = ("task", "sequence")
# The param-group roles a schedule may apply to: param_group.ROLES (that module imports the
# optimizer's config, which takes its choices from here; tests/unit/test_optim_schedule.py checks they agree).
SCHEDULE_ROLES = ("lora_a", "lora_b", "full", "plain")


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """The factor of the learning rate used by update ``step`` (0-based) of a span of ``total``
    steps with ``warmup`` warmup steps. A step at or past ``total`` gets the decay's end value."""
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(SCHEDULE_KINDS)}, got {kind!r}")
    if step < 0 or total < 1 or not 0 <= warmup <= total:
        raise ValueError(f"need 0 <= step, 1 <= total and 0 <= warmup <= total; got step {step}, total {total}, "
                         f"warmup {warmup}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total == warmup:  # nothing left to decay over
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    if kind == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(steps: int, ratio: float, total: int) -> int:
    """Warmup steps of a span of ``total`` steps: ``steps`` when given, else ``ratio`` of the span
    rounded to the nearest step (halves up)."""
    return steps if steps else math.floor(ratio * total + 0.5)


@dataclass(frozen=True)
class Schedule:
    """A run's schedule: ``spans`` are the optimizer steps of each task in training order (one span,
    all steps, for a method that trains the tasks mixed). ``factor(position)`` is the factor of
    the update after ``position`` updates of the whole run."""

    kind: str = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_ratio: float = 0.0
    scope: str = "task"
    spans: tuple[int, ...] = (1,)
    roles: tuple[str, ...] = SCHEDULE_ROLES  # the others keep their base rate
    later_ratio: float = 1.0  # the factor's multiplier from the second task's first step on


    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(SCHEDULE_KINDS)}, got {self.kind!r}")
        if self.scope not in SCHEDULE_SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCHEDULE_SCOPES)}, got {self.scope!r}")
        if not self.spans or any(s < 1 for s in self.spans):
            raise ValueError(f"spans must be positive step counts, got {self.spans}")
        if self.warmup_steps < 0 or not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup must be >= 0 steps or a ratio in [0, 1], got {self.warmup_steps}, "
                             f"{self.warmup_ratio}")
        if not 0.0 <= self.later_ratio <= 1.0:
            raise ValueError(f"later_ratio must be in [0, 1], got {self.later_ratio}")
        if not set(self.roles) <= set(SCHEDULE_ROLES):
            raise ValueError(f"roles must be among {', '.join(SCHEDULE_ROLES)}, got {self.roles}")

    @property
    def trivial(self) -> bool:
        """Every factor is 1 (the constant schedule without warmup: today's fixed learning rates)."""
        return (self.kind == "constant" and not self.warmup_steps and not self.warmup_ratio
                and (self.later_ratio == 1.0 or len(self.spans) == 1))

    def span_totals(self) -> tuple[int, ...]:
        """The spans the schedule runs over: each task's, or one of every task's steps."""
        return self.spans if self.scope == "task" else (sum(self.spans),)

    def warmup_of(self, total: int) -> int:
        """Warmup steps of a span of ``total`` steps. The run layer refuses a warmup longer than a
        span (``gorp_ds.cl.lr_schedule.check_schedule``); here it is cut to the span, for sessions
        that never train (an export or evaluation rebuilds one with no train split)."""
        return min(total, warmup_steps(self.warmup_steps, self.warmup_ratio, total))

    def locate(self, position: int) -> tuple[int, int]:
        """``(step within its span, the span's total)`` of run position ``position``; a position past
        the last span counts on in the last span (its decay's end value)."""
        start = 0
        totals = self.span_totals()
        for total in totals[:-1]:
            if position < start + total:
                return position - start, total
            start += total
        return position - start, totals[-1]

    def factor(self, position: int) -> float:
        """The factor of the update after ``position`` updates (for a role the schedule applies to)."""
        if self.trivial:
            return 1.0
        step, total = self.locate(position)
        factor = lr_factor(step, total, self.warmup_of(total), self.kind, self.min_ratio)
        # spans are the tasks' steps in both scopes: past the first one, a later task trains.
        return factor * self.later_ratio if len(self.spans) > 1 and position >= self.spans[0] else factor

    def factor_of(self, role: str) -> Callable[[int], float]:
        """``factor`` for a group of ``role``; a role the schedule leaves alone always gets 1."""
        return self.factor if role in self.roles else _one


def _one(position: int) -> float:
    return 1.0
