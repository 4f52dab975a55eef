"""Crash and resume: a launch killed mid-task and one killed right after a task-boundary checkpoint,
each relaunched with --resume, must end exactly where the uninterrupted launch ends.

The uninterrupted reference is the six-method launch that ``test_cl_end_to_end.py`` checks (same
arguments, made once per session: ``tests.support.launch.six_method_run``). The crashes are real: ``GORP_DS_FAULT_AT`` makes every rank SIGKILL itself.
With 4 steps per task and a checkpoint every 2 steps:

1. fault "1,3" (the hook takes the task's 0-based index): gorp dies after step 3 of task 2; its
   last checkpoint is mid-task (``task02_step000002``: 2 steps into task 2);
2. --resume, fault "3,1": gorp resumes there, runs the 2 steps left of task 2, closes tasks 2 and 3
   and dies after the first step of task 4, i.e. right after the task-boundary checkpoint
   (``task04_step000000``);
3. --resume: gorp resumes at the boundary, then galore, seq-lora, o-lora, mtl and seq-ft run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.support.launch import METHODS, launch, read_final_state, six_method_run

pytestmark = pytest.mark.slow


def _latest(out: Path, method: str) -> str | None:
    latest = out / method / "checkpoints" / "latest"
    return latest.read_text().strip() if latest.is_file() else None


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict:
    reference = six_method_run(tmp_path_factory, tiny_model_dir)
    out = tmp_path_factory.mktemp("resumed")
    record: dict = {"reference": reference, "out": out, "launches": []}
    for extra, fault in (((), "1,3"), (("--resume",), "3,1"), (("--resume",), None)):
        proc = launch(tiny_model_dir, out, *extra, fault=fault)
        record["launches"].append({
            "returncode": proc.returncode, "output": proc.stdout + proc.stderr,
            "gorp_latest": _latest(out, "gorp"), "gorp_done": (out / "gorp" / "results.json").is_file(),
            "started": sorted(m for m in METHODS if (out / m).is_dir()),
        })
    return record


def test_crashes_are_real_and_resume_where_they_left_off(runs) -> None:
    first, second, third = runs["launches"]
    assert first["returncode"] != 0, first["output"][-3000:]
    assert not first["gorp_done"] and first["started"] == ["gorp"]
    assert first["gorp_latest"] == "task02_step000002"  # 2 steps into task 2

    assert second["returncode"] != 0, second["output"][-3000:]
    assert "[gorp] resumed at task 2, step 2" in second["output"], second["output"][-3000:]
    assert not second["gorp_done"] and second["started"] == ["gorp"]
    assert second["gorp_latest"] == "task04_step000000"  # the boundary before task 4: tasks 1-3 closed

    assert third["returncode"] == 0, third["output"][-6000:]
    assert "[gorp] resumed at task 4, step 0" in third["output"], third["output"][-3000:]
    assert third["gorp_done"] and third["started"] == sorted(METHODS)


def test_end_of_task_lines_count_the_steps_run_in_that_launch(runs) -> None:
    """A task resumed mid-way reports the steps this launch ran (4 per task, resumed after 2), not
    the task's total; a task started at its beginning reports all 4 with no resume note."""
    first, second, third = (launch["output"] for launch in runs["launches"])
    assert re.search(r"\[gorp\] task 1: 4 steps in [\d.]+ s, [\d,]+ tokens/s \(", first), first[-3000:]
    assert re.search(r"\[gorp\] task 2: 2 steps in [\d.]+ s \(resumed at step 2 of 4\), ", second), second[-3000:]
    assert re.search(r"\[gorp\] task 3: 4 steps in [\d.]+ s, ", second), second[-3000:]
    assert re.search(r"\[gorp\] task 4: 4 steps in [\d.]+ s, ", third), third[-3000:]  # resumed at step 0
    assert "resumed at step" not in third


@pytest.mark.parametrize("method", METHODS)
def test_results_equal_uninterrupted(runs, method) -> None:
    resumed = json.loads((runs["out"] / method / "results.json").read_text())
    reference = json.loads((runs["reference"] / method / "results.json").read_text())
    assert resumed["R"] == reference["R"]
    assert resumed["metrics"] == reference["metrics"]
    summary = json.loads((runs["out"] / "summary.json").read_text())
    assert summary[method] == reference["metrics"]


@pytest.mark.parametrize("method", METHODS)
def test_final_weights_and_shared_spaces_equal_uninterrupted(runs, method) -> None:
    """Stronger than R (the tiny model scores 0 on most tasks): the last checkpoint's fp32 masters,
    the LoRA merges into the frozen weights (replayed on resume) and the shared spaces are
    bit-identical to the uninterrupted launch's."""
    tag, masters, merges, ranks = read_final_state(runs["out"], method)
    ref_tag, ref_masters, ref_merges, ref_ranks = read_final_state(runs["reference"], method)
    assert tag == ref_tag
    assert sorted(masters) == sorted(ref_masters)
    differing = [k for k in masters if not torch.equal(masters[k], ref_masters[k])]
    assert not differing, f"fp32 masters differ from the uninterrupted run: {differing}"
    assert len(merges) == len(ref_merges)
    for task, (record, ref_record) in enumerate(zip(merges, ref_merges)):
        assert sorted(record) == sorted(ref_record)
        for layer in record:
            for key in ("A", "B", "scaling"):
                assert torch.equal(record[layer][key], ref_record[layer][key]), (task, layer, key)
    for rank, (state, ref) in enumerate(zip(ranks, ref_ranks)):
        assert sorted(state["pieces"]) == sorted(ref["pieces"])
        assert sorted(state["shared"]) == sorted(ref["shared"])
        shared = [n for n in state["shared"] if not torch.equal(state["shared"][n], ref["shared"][n])]
        assert not shared, f"rank {rank}: shared spaces differ: {shared}"
