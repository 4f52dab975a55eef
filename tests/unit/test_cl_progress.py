"""The numbering users see (tasks from 1) against hand-computed values: checkpoint tags, the
state in checkpoints and ``progress.json`` (and the 0-based format written before), recorded
settings changes, and which tags pruning deletes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from gorp_ds.cl.progress import Progress, tag_position, tags_to_prune, task_number


def test_task_number_counts_from_1() -> None:
    assert [task_number(index) for index in range(3)] == [1, 2, 3]


@pytest.mark.parametrize("task, step, tag", [
    (0, 0, "task01_step000000"),  # before the first step of task 1
    (1, 4, "task02_step000004"),  # 4 steps into task 2
    (2, 0, "task03_step000000"),  # task 2 closed, task 3 not started
    (4, 0, "task05_step000000"),  # a 4-task run, every task closed
    (99, 1_000_000, "task100_step1000000"),  # wider than the padding: the digits grow
])
def test_checkpoint_tag_of_a_position(task, step, tag) -> None:
    progress = Progress(task=task, step=step)
    assert progress.tag == tag
    assert tag_position(tag) == (task + 1, step)


def test_state_numbers_the_task_from_1_and_round_trips_through_json() -> None:
    progress = Progress(task=1, step=4, rows={0: [10.0, 20.0], 1: [50.0, 25.0]},
                        timings={"train_s/1": 3.0, "tokens/1": 96.0, "eval_s/0": 1.0, "eval_s/1": 1.5},
                        global_step=8, skipped_steps=1)
    progress.record_change("lr_lora", 0.01, 0.02)
    state = progress.to_state()
    assert state == {
        "task_number": 2, "step": 4, "rows": {"0": [10.0, 20.0], "1": [50.0, 25.0]},
        "timings": {"train_s/1": 3.0, "tokens/1": 96.0, "eval_s/0": 1.0, "eval_s/1": 1.5}, "global_step": 8,
        "changes": [{"field": "lr_lora", "old": 0.01, "new": 0.02, "task": 2, "step": 4, "global_step": 8}],
        "skipped_steps": 1,
    }
    assert Progress.from_state(json.loads(json.dumps(state))) == progress  # progress.json's way


def test_a_change_while_in_the_first_task_records_task_1() -> None:
    progress = Progress(task=0, step=2, global_step=2)
    progress.record_change("keep_checkpoints", 2, 3)
    assert progress.changes == [{"field": "keep_checkpoints", "old": 2, "new": 3, "task": 1, "step": 2,
                                 "global_step": 2}]


def test_the_0_based_format_of_earlier_versions_is_read_and_renumbered() -> None:
    """A progress.json / checkpoint written before tasks were numbered from 1: 2 steps into task 2,
    settings changed when task 1 was resumed; the first task's timings keyed 0."""
    old = {"task": 1, "step": 2, "rows": {"0": [0.0], "1": [75.0]},
           "timings": {"eval_s/0": 1.0, "train_s/0": 3.0, "tokens/0": 96.0, "eval_s/1": 1.5,
                       "export_s/task_01": 2.0, "train_s/1": 0.5, "tokens/1": 40.0},
           "global_step": 6, "changes": [{"field": "lr_lora", "old": 0.01, "new": 0.02, "task": 0, "step": 2,
                                          "global_step": 2}],
           "skipped_steps": 0}
    progress = Progress.from_state(json.loads(json.dumps(old)))
    assert (progress.task, progress.step, progress.number, progress.tag) == (1, 2, 2, "task02_step000002")
    assert progress.rows == {0: [0.0], 1: [75.0]} and progress.global_step == 6
    assert progress.changes == [{"field": "lr_lora", "old": 0.01, "new": 0.02, "task": 1, "step": 2,
                                 "global_step": 2}]
    # Per-task keys renumbered; rows of R (eval_s) and export labels were never task indices.
    assert progress.timings == {"eval_s/0": 1.0, "train_s/1": 3.0, "tokens/1": 96.0, "eval_s/1": 1.5,
                                "export_s/task_01": 2.0, "train_s/2": 0.5, "tokens/2": 40.0}
    assert progress.to_state()["task_number"] == 2 and "task" not in progress.to_state()


def test_the_oldest_format_without_changes_or_skipped_steps() -> None:
    progress = Progress.from_state({"task": 0, "step": 3, "rows": {}, "timings": {}, "global_step": 3})
    assert progress == Progress(task=0, step=3, global_step=3)
    assert progress.tag == "task01_step000003"


def test_tag_position_ignores_other_names() -> None:
    for name in ("latest", ".tmp-task02_step000000", ".old-task02_step000000", "task02_step", "task2", "export"):
        assert tag_position(name) is None, name


def test_pruning_deletes_the_earliest_positions_as_numbers() -> None:
    names = ["task10_step000000", "task09_step000004", "latest", ".tmp-task10_step000002",
             "task100_step000000", "task99_step000002", "task09_step000002"]
    # By position: 9/2, 9/4, 10/0, 99/2, 100/0 (a string sort puts task100 before task10).
    assert tags_to_prune(names, keep=2, newest="task100_step000000") == [
        "task09_step000002", "task09_step000004", "task10_step000000"]
    assert tags_to_prune(names, keep=5, newest="task100_step000000") == []
    # The newest is kept even where its position is not the latest (a rewound non-finite stop).
    assert tags_to_prune(names, keep=1, newest="task09_step000004") == [
        "task09_step000002", "task10_step000000", "task99_step000002", "task100_step000000"]


def test_session_prune_removes_those_folders(tmp_path) -> None:
    from gorp_ds.cl.session import MethodSession

    for name in ("task01_step000002", "task02_step000000", "task02_step000002", ".tmp-task02_step000004"):
        (tmp_path / name).mkdir()
    (tmp_path / "latest").write_text("task02_step000002\n")
    MethodSession._prune(SimpleNamespace(checkpoint_dir=str(tmp_path)), keep=2, newest="task02_step000002")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-task02_step000004", "latest", "task02_step000000",
                                                         "task02_step000002"]
