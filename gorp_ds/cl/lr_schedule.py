"""The run's learning-rate schedule: built from the optimizer settings and the run's step budget
(each task's optimizer steps; the sequence's are their sum), checked against the loaded tasks before
training, positioned from where a run stands (:class:`~.progress.Progress`).

The schedule itself is :mod:`gorp_ds.optim.schedule` (pure functions) and
:mod:`gorp_ds.optim.role_scheduler` (torch's ``LambdaLR`` on GORP's groups).
"""

from __future__ import annotations

import math

from ..data.tasks import Task
from ..models import method_spec
from ..optim.schedule import Schedule
from .config import ConfigError, RunConfig
from .progress import Progress


def task_steps(cfg: RunConfig, task: Task) -> int:
    """Optimizer steps of one task (``MethodSession.steps_for`` of a task of the sequence)."""
    if cfg.runner.max_steps_per_task:
        return cfg.runner.max_steps_per_task
    return max(1, math.ceil(cfg.runner.epochs * len(task.train) / cfg.runner.global_batch_size))


def build_schedule(cfg: RunConfig, spans: list[int]) -> Schedule:
    """The schedule of one method whose tasks train ``spans`` optimizer steps each, in order. A
    session that never trains (``gorp-ds export`` of a checkpoint) has no tasks: one step stands in."""
    opt = cfg.optimizer
    spans = [span for span in spans if span > 0] or [1]
    return Schedule(kind=opt.lr_schedule, warmup_steps=opt.lr_warmup_steps, warmup_ratio=opt.lr_warmup_ratio,
                    min_ratio=opt.lr_min_ratio, scope=opt.lr_schedule_scope, spans=tuple(spans),
                    roles=tuple(opt.lr_schedule_roles), later_ratio=opt.lr_later_ratio)


def position(spans: list[int] | tuple[int, ...], progress: Progress) -> int:
    """Optimizer steps the run has taken at ``progress``: every finished task's and this task's."""
    return sum(spans[: progress.task]) + progress.step


def check_schedule(cfg: RunConfig, tasks: list[Task]) -> None:
    """Refuse a warmup longer than a schedule's steps (one line naming the settings as written)."""
    opt, flag = cfg.optimizer, cfg.written_as
    if not opt.lr_warmup_steps:
        return  # a ratio is at most 1: never longer than its span
    steps = [task_steps(cfg, t) for t in tasks]
    # A method that mixes the tasks trains one task of every task's steps.
    mixed = all(method_spec(m).mixed_tasks for m in cfg.runner.methods)
    if opt.lr_schedule_scope == "sequence" or mixed:
        spans, what = [sum(steps)], "the whole sequence"
    else:
        shortest = min(range(len(tasks)), key=lambda i: steps[i])
        spans, what = [steps[shortest]], f"task {tasks[shortest].name}"
    if opt.lr_warmup_steps <= spans[0]:
        return
    budget = (f"{flag('max_steps_per_task')} {cfg.runner.max_steps_per_task}" if cfg.runner.max_steps_per_task
              else f"{flag('epochs')} {cfg.runner.epochs:g}")
    raise ConfigError(f"{flag('lr_warmup_steps')} {opt.lr_warmup_steps} is longer than the {spans[0]} optimizer "
                      f"steps of {what} ({budget}, {flag('lr_schedule_scope')} {opt.lr_schedule_scope}); use at "
                      f"most {spans[0]}, or {flag('lr_warmup_ratio')} for a fraction of each schedule")
