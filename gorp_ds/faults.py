"""Fault injection for the crash, NaN and pre-emption tests: one object, configured once.

The training loop and the checkpoint writer ask the process's :class:`FaultPlan` at fixed points
(:func:`current`); they never read the environment. A test in the same process sets a plan with
:func:`install`; a test of a real launch describes the plan in environment variables, which
:meth:`FaultPlan.from_environment` reads once, when the runner starts (``install(FaultPlan.from_environment())``).
A run with none of them set has the empty plan, whose every answer is "no".

| variable | value | fault |
|---|---|---|
| ``GORP_DS_FAULT_AT`` | ``task,step`` | SIGKILL this process after that optimizer step |
| ``GORP_DS_SIGNAL_AT`` | ``task,step[,rank]`` | a real SIGTERM to this process (or only that rank) after that step |
| ``GORP_DS_NAN_AT`` | ``task,step`` | that step's gradient of the first trained tensor is NaN (the loss stays finite) |
| ``GORP_DS_DROP_AT`` | ``task,step`` | that step is left out (no forward, backward or optimizer call) |
| ``GORP_DS_CKPT_FAULT`` | ``point[@n]`` | SIGKILL at a checkpoint writer's point (files, manifest, renamed, latest_tmp) of its n-th save (default 1) |
| ``GORP_DS_PAUSE_AT`` | ``task,step,file`` | after that step, write ``<file>.rank<R>`` (the rank's pid) and wait until a pre-emption is requested (at most 300 s): a test then signals or kills the launcher at a known step |
| ``GORP_DS_WRITE_FAULT`` | ``site[@n]`` | the n-th write (default 1) at an output site (``WRITE_SITES``) of this process fails with ENOSPC, as on a full disk |

``task`` is the 0-based index of the task in the schedule and ``step`` the 1-based step within it.

A write site is one kind of output file (gorp_ds/safe_write.py asks before each write): config
(config.yaml), predictions, progress (progress.json), results (results.json, results.md, R.png),
summary, export (the steps of an export: its directory, each weight file, the rest),
tensorboard_open (the event file's creation), tensorboard_flush (each batch of events), adapters
(each file of a per-task export: the task-start values, the full delta, the adapter's config and
tensors, and every prompt record).

This module imports nothing from the project: the run layer, the output writer and the distribution
layer ask it.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

KILL_AT, SIGNAL_AT, NAN_AT, DROP_AT, CHECKPOINT_AT, PAUSE_AT = (
    "GORP_DS_FAULT_AT", "GORP_DS_SIGNAL_AT", "GORP_DS_NAN_AT", "GORP_DS_DROP_AT", "GORP_DS_CKPT_FAULT",
    "GORP_DS_PAUSE_AT")
PAUSE_LIMIT_S = 300.0
CHECKPOINT_POINTS = ("files", "manifest", "renamed", "latest_tmp")
WRITE_AT = "GORP_DS_WRITE_FAULT"
WRITE_SITES = ("config", "predictions", "progress", "results", "summary", "export", "tensorboard_open",
               "tensorboard_flush", "adapters")


@dataclass(frozen=True)
class FaultPlan:
    """Where this process fails on purpose; the default plan injects nothing."""

    kill_after: tuple[int, int] | None = None  # (task index, step)
    signal_after: tuple[int, int, int | None] | None = None  # (task index, step, rank or None: every rank)
    nan_at: tuple[int, int] | None = None
    drop_at: tuple[int, int] | None = None
    checkpoint_kill: tuple[str, int] | None = None  # (writer point, n-th save of this process)
    pause_after: tuple[int, int, str] | None = None  # (task index, step, marker file prefix)
    write_fault: tuple[str, int] | None = None  # (write site, n-th write there by this process): ENOSPC

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> FaultPlan:
        env = os.environ if env is None else env
        signal_at = _numbers(env, SIGNAL_AT, 2, 3)
        checkpoint = env.get(CHECKPOINT_AT)
        checkpoint_kill = None
        if checkpoint:
            point, _, count = checkpoint.partition("@")
            if point not in CHECKPOINT_POINTS:
                raise ValueError(f"{CHECKPOINT_AT}={checkpoint!r}: the point is one of {', '.join(CHECKPOINT_POINTS)}")
            checkpoint_kill = (point, int(count or 1))
        pause_after = None
        if env.get(PAUSE_AT):
            task, step, path = (env[PAUSE_AT].split(",", 2) + ["", ""])[:3]
            if not (task.isdigit() and step.isdigit() and path):
                raise ValueError(f"{PAUSE_AT}={env[PAUSE_AT]!r}: expected task,step,file")
            pause_after = (int(task), int(step), path)
        write = env.get(WRITE_AT)
        write_fault = None
        if write:
            site, _, count = write.partition("@")
            if site not in WRITE_SITES or not (count or "1").isdigit():
                raise ValueError(f"{WRITE_AT}={write!r}: expected site[@n], the site one of {', '.join(WRITE_SITES)}")
            write_fault = (site, int(count or 1))
        return cls(pause_after=pause_after, kill_after=_pair(env, KILL_AT), nan_at=_pair(env, NAN_AT), drop_at=_pair(env, DROP_AT),
                   signal_after=None if signal_at is None else (signal_at[0], signal_at[1],
                                                                signal_at[2] if len(signal_at) > 2 else None),
                   checkpoint_kill=checkpoint_kill, write_fault=write_fault)

    # -------------------------------------------------------------- the questions the loop asks
    def drops(self, task_index: int, step: int) -> bool:
        """Leave step ``step`` of the task out (the reference run without that batch)."""
        return self.drop_at == (task_index, step)

    def poisons(self, task_index: int, step: int) -> bool:
        """Make step ``step``'s gradient of the first trained tensor NaN."""
        return self.nan_at == (task_index, step)

    def kill_point(self, task_index: int, step: int) -> None:
        """Right after optimizer step ``step`` (before any checkpoint of it): SIGKILL where planned."""
        if self.kill_after == (task_index, step):
            os.kill(os.getpid(), signal.SIGKILL)

    def signal_point(self, task_index: int, step: int, rank: int) -> None:
        """After step ``step`` and its periodic checkpoint: a real SIGTERM where planned (the
        pre-emption handler then checkpoints and stops every rank after this same step)."""
        if self.signal_after is not None:
            at_task, at_step, at_rank = self.signal_after
            if (at_task, at_step) == (task_index, step) and at_rank in (None, rank):
                os.kill(os.getpid(), signal.SIGTERM)

    def pause_point(self, task_index: int, step: int, rank: int, until: Callable[[], bool]) -> None:
        """After step ``step`` (and its periodic checkpoint): where planned, say so in
        ``<file>.rank<rank>`` and wait until ``until()`` (a pre-emption was requested)."""
        if self.pause_after is None or self.pause_after[:2] != (task_index, step):
            return
        with open(f"{self.pause_after[2]}.rank{rank}", "w") as handle:
            handle.write(f"{os.getpid()}\n")
        deadline = time.monotonic() + PAUSE_LIMIT_S
        while not until() and time.monotonic() < deadline:
            time.sleep(0.05)

    def at_checkpoint_point(self, point: str, save_index: int) -> None:
        """SIGKILL at a checkpoint writer's ``point`` of its ``save_index``-th save, where planned."""
        if self.checkpoint_kill == (point, save_index):
            os.kill(os.getpid(), signal.SIGKILL)

    def write_point(self, site: str, path: str) -> None:
        """Before a write at ``site``: raise ENOSPC (as a full disk does) at the planned n-th write."""
        if self.write_fault is None or self.write_fault[0] != site:
            return
        _WRITES[site] = _WRITES.get(site, 0) + 1
        if _WRITES[site] == self.write_fault[1]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


_WRITES: dict[str, int] = {}  # writes per site so far in this process (the ``@n`` counts them)


def _numbers(env: Mapping[str, str], name: str, least: int, most: int) -> tuple[int, ...] | None:
    text = env.get(name)
    if not text:
        return None
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected {least} to {most} comma-separated integers") from None
    if not least <= len(values) <= most:
        raise ValueError(f"{name}={text!r}: expected {least} to {most} comma-separated integers")
    return values


def _pair(env: Mapping[str, str], name: str) -> tuple[int, int] | None:
    values = _numbers(env, name, 2, 2)
    return None if values is None else (values[0], values[1])


_CURRENT = FaultPlan()


def install(plan: FaultPlan) -> None:
    """Make ``plan`` the process's plan (the runner installs the environment's at start-up)."""
    global _CURRENT
    _CURRENT = plan


def current() -> FaultPlan:
    return _CURRENT
