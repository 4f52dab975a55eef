"""Checkpoints of the single-process ``zero_scenarios`` run (GORP with a task boundary, shared spaces,
cut-free local driver), for the checkpoint commit-protocol tests; also run in a child process that a
fault plan kills mid-save (tests/integration/test_checkpoint_faults.py)."""

from __future__ import annotations

from gorp_ds.zero import LocalDistributor, save_state
from tests.support import zero_scenarios as zs

FIRST, SECOND = 3, zs.SAVE_AFTER  # two checkpoints: task 1 step 3, and after the task boundary


def handle(opt) -> LocalDistributor:
    params = {name: p for g in opt.param_groups for name, p in zip(g["names"], g["params"])}
    return LocalDistributor(opt, params)


def run_with_saves(directory: str) -> None:
    """Train, saving "first" after FIRST steps and "second" after SECOND steps."""
    model = zs.TinyNet()
    opt = zs.build_optimizer(model)
    zs.train_single_process(model, opt, range(FIRST))
    save_state(handle(opt), directory, "first", {"step": FIRST})
    zs.train_single_process(model, opt, range(FIRST, SECOND))
    save_state(handle(opt), directory, "second", {"step": SECOND})
