"""The run layer's side of the learning-rate schedule (gorp_ds/cl/lr_schedule.py and the session's
resume of it): the position of a run's progress, the warmup refused against the loaded tasks' steps
(per task, over the sequence, for a method that mixes the tasks), and a checkpoint's schedule state
restored, or derived from the progress for a checkpoint without one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gorp_ds.cl.config import ConfigError, RunConfig
from gorp_ds.cl.lr_schedule import build_schedule, check_schedule, position, task_steps
from gorp_ds.cl.progress import Progress
from gorp_ds.cl.session import MethodSession
from gorp_ds.data.tasks import Example, Task
from gorp_ds.optim import GORP
from gorp_ds.optim.role_scheduler import RoleScheduler
from gorp_ds.zero import CheckpointError


def _task(name: str, examples: int) -> Task:
    return Task(name=name, labels=("a", "b"), instruction="", train=[Example("x", "a")] * examples)


def test_position_counts_every_finished_task_and_this_ones_steps() -> None:
    assert position([6, 4, 5], Progress(task=0, step=3)) == 3
    assert position([6, 4, 5], Progress(task=2, step=1)) == 11
    assert position([6, 4, 5], Progress(task=3, step=0)) == 15  # every task closed


def test_task_steps_from_the_budget() -> None:
    cfg = RunConfig.from_flat(global_batch_size=4, epochs=2.0)
    assert task_steps(cfg, _task("t", 10)) == 5  # ceil(2 · 10 / 4)
    assert task_steps(cfg.replace(max_steps_per_task=7), _task("t", 10)) == 7


def test_a_session_without_tasks_gets_a_schedule() -> None:
    """``gorp-ds export`` rebuilds a session with no tasks (``mtl``'s one span is then 0 steps)."""
    cfg = RunConfig.from_flat(lr_schedule="cosine", lr_warmup_steps=3)
    assert build_schedule(cfg, []).spans == build_schedule(cfg, [0]).spans == (1,)
    assert build_schedule(cfg, []).factor(0) == 1.0  # the warmup cut to the one step


def test_warmup_is_checked_against_the_shortest_task_or_the_sequence() -> None:
    tasks = [_task("long", 40), _task("short", 12)]  # 10 and 3 steps at batch 4, one epoch
    cfg = RunConfig.from_flat(global_batch_size=4, lr_schedule="linear", lr_warmup_steps=4)
    with pytest.raises(ConfigError, match=r"--lr-warmup-steps 4 is longer than the 3 optimizer steps of task short "
                                          r"\(--epochs 1, --lr-schedule-scope task\)"):
        check_schedule(cfg, tasks)
    check_schedule(cfg.replace(lr_warmup_steps=3), tasks)
    check_schedule(cfg.replace(lr_schedule_scope="sequence", lr_warmup_steps=13), tasks)
    with pytest.raises(ConfigError, match="14 is longer than the 13 optimizer steps of the whole sequence"):
        check_schedule(cfg.replace(lr_schedule_scope="sequence", lr_warmup_steps=14), tasks)
    check_schedule(cfg.replace(methods=["mtl"]), tasks)  # one task of all 13 steps
    with pytest.raises(ConfigError):
        check_schedule(cfg.replace(methods=["mtl", "gorp"]), tasks)
    check_schedule(cfg.replace(lr_warmup_steps=0, lr_warmup_ratio=1.0), tasks)  # a ratio always fits


def _session(spans: list[int]) -> SimpleNamespace:
    param = torch.nn.Parameter(torch.zeros(3))
    opt = GORP([{"params": [param], "names": ["w"], "role": "plain", "lr": 0.1}])
    cfg = RunConfig.from_flat(lr_schedule="linear", lr_warmup_steps=2, lr_min_ratio=0.5)
    return SimpleNamespace(lr_spans=spans, lr_schedule=RoleScheduler(opt, build_schedule(cfg, spans)),
                           checkpoint_dir="ckpt", optimizer=opt)


def test_resume_restores_the_saved_position_or_derives_it() -> None:
    # spans (4, 4), warmup 2, linear to 0.5: task 2's factors 0.5, 1, 1, 0.75
    saved = _session([4, 4])
    for _ in range(5):
        saved.lr_schedule.step()
    state = saved.lr_schedule.state_dict()
    assert state["position"] == 5 and saved.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    for checkpoint_state in (state, None):  # None: a checkpoint written before schedules existed
        resumed = _session([4, 4])
        MethodSession._restore_schedule(resumed, checkpoint_state, Progress(task=1, step=1))
        assert resumed.lr_schedule.position == 5
        assert resumed.optimizer.param_groups[0]["lr"] == saved.optimizer.param_groups[0]["lr"]
    with pytest.raises(CheckpointError, match="schedule is at step 5 of the run, but its progress is step 6"):
        MethodSession._restore_schedule(_session([4, 4]), state, Progress(task=1, step=2))
