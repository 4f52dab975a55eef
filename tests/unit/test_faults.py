"""The fault plan: parsed once from its variables, and asked, never the environment, by the loop."""

from __future__ import annotations

import os
import re

import pytest

from gorp_ds import faults
from gorp_ds.faults import FaultPlan
from tests.support import REPO


def test_the_plan_from_the_environment() -> None:
    plan = FaultPlan.from_environment({"GORP_DS_FAULT_AT": "1,3", "GORP_DS_SIGNAL_AT": "2,4,1",
                                       "GORP_DS_NAN_AT": "0,2", "GORP_DS_DROP_AT": "0,5",
                                       "GORP_DS_CKPT_FAULT": "manifest@2"})
    assert plan == FaultPlan(kill_after=(1, 3), signal_after=(2, 4, 1), nan_at=(0, 2), drop_at=(0, 5),
                             checkpoint_kill=("manifest", 2))
    assert plan.poisons(0, 2) and not plan.poisons(0, 3) and plan.drops(0, 5) and not plan.drops(1, 5)
    assert FaultPlan.from_environment({"GORP_DS_SIGNAL_AT": "2,4"}).signal_after == (2, 4, None)
    assert FaultPlan.from_environment({"GORP_DS_CKPT_FAULT": "files"}).checkpoint_kill == ("files", 1)
    assert FaultPlan.from_environment({}) == FaultPlan()
    assert FaultPlan.from_environment({"GORP_DS_WRITE_FAULT": "export@3"}).write_fault == ("export", 3)
    assert FaultPlan.from_environment({"GORP_DS_WRITE_FAULT": "predictions"}).write_fault == ("predictions", 1)


@pytest.mark.parametrize("env", [{"GORP_DS_FAULT_AT": "1"}, {"GORP_DS_NAN_AT": "a,b"},
                                 {"GORP_DS_SIGNAL_AT": "1,2,3,4"}, {"GORP_DS_CKPT_FAULT": "nowhere@1"},
                                 {"GORP_DS_PAUSE_AT": "1,2"}, {"GORP_DS_PAUSE_AT": "x,2,/tmp/p"},
                                 {"GORP_DS_WRITE_FAULT": "disk@1"}, {"GORP_DS_WRITE_FAULT": "export@x"}])
def test_a_malformed_plan_is_refused(env) -> None:
    with pytest.raises(ValueError, match=next(iter(env))):
        FaultPlan.from_environment(env)


def test_the_empty_plan_injects_nothing() -> None:
    plan = FaultPlan()
    for task in range(3):
        for step in range(1, 5):
            assert not plan.drops(task, step) and not plan.poisons(task, step)
            plan.kill_point(task, step)  # would kill this test process if it fired
            plan.signal_point(task, step, 0)
    plan.at_checkpoint_point("files", 1)
    for site in faults.WRITE_SITES:
        plan.write_point(site, "/nowhere")  # would raise ENOSPC if it fired


def test_the_pause_says_where_it_waits_and_waits_until_asked(tmp_path) -> None:
    plan = FaultPlan.from_environment({"GORP_DS_PAUSE_AT": f"1,3,{tmp_path}/pause"})
    assert plan.pause_after == (1, 3, f"{tmp_path}/pause")
    plan.pause_point(1, 2, 0, until=lambda: False)  # another step: returns at once, writes nothing
    assert list(tmp_path.iterdir()) == []
    asked = iter([False, False, True])
    plan.pause_point(1, 3, 1, until=lambda: next(asked))
    assert (tmp_path / "pause.rank1").read_text() == f"{os.getpid()}\n"
    assert next(asked, "used up") == "used up", "it asked until the answer was yes"


def test_install_sets_the_process_plan() -> None:
    before = faults.current()
    try:
        faults.install(FaultPlan(drop_at=(0, 1)))
        assert faults.current().drops(0, 1)
    finally:
        faults.install(before)


def test_only_the_entry_point_reads_the_fault_variables() -> None:
    """The loop and the writers ask the plan; only faults.py names the variables, and only the
    command line (gorp_ds/cli.py) reads them, once."""
    pattern = re.compile(r"GORP_DS_(FAULT_AT|SIGNAL_AT|NAN_AT|DROP_AT|CKPT_FAULT|WRITE_FAULT)")
    readers = re.compile(r"FaultPlan\.from_environment\(")
    named = sorted(str(p.relative_to(REPO)) for p in (REPO / "gorp_ds").rglob("*.py") if pattern.search(p.read_text()))
    reading = sorted(str(p.relative_to(REPO)) for p in (REPO / "gorp_ds").rglob("*.py")
                     if readers.search(p.read_text()) and p.name != "faults.py")
    assert named == ["gorp_ds/faults.py"], named
    assert reading == ["gorp_ds/cli.py"], reading
