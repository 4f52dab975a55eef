"""Every output file outside the checkpoints is written one way (gorp_ds/safe_write.py): whole or not
at all, and a failure is one WriteError naming the path, the bytes needed and the bytes free.

Full disks are injected here (the fault plan's ENOSPC at one write site, as ``GORP_DS_WRITE_FAULT``
sets it in a launch). Covered in one process: the writer itself, the report files, the TensorBoard
event file (written synchronously by the monitor) and the output-path checks; the export's writes
are in test_export_hf_dir.py, real full and read-only file systems in
tests/integration/test_write_real_disk.py, the launches in tests/integration/test_cl_write_faults.py."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from gorp_ds.safe_write import WriteError, guarded, path_problem, write_file, write_json

NUMBERS = re.compile(r"it needs [\d.]+ \w*B \((\d+) bytes\), [\d.]+ \w*B \((\d+) bytes\) are free")


def _one_line(err: WriteError, path: Path) -> tuple[int, int]:
    text = str(err)
    assert "\n" not in text and text.startswith(f"{path}: cannot write "), text
    numbers = NUMBERS.search(text)
    assert numbers, text
    return int(numbers[1]), int(numbers[2])


def test_a_write_is_whole_and_an_injected_enospc_leaves_the_previous_file(tmp_path, fault_plan) -> None:
    path = tmp_path / "deep" / "results.json"
    write_json(str(path), {"R": [[1.0]]}, what="the results", site="results")
    assert json.loads(path.read_text()) == {"R": [[1.0]]}
    fault_plan(write_fault=("results", 2))  # the second write at this site fails as on a full disk
    write_file(str(path), "first", what="the results", site="results")
    with pytest.raises(WriteError) as caught:
        write_file(str(path), "second, longer", what="the results", site="results", note="checkpoint t is intact")
    need, free = _one_line(caught.value, path)
    disk = os.statvfs(tmp_path)  # the free bytes of this file system (others write to it meanwhile)
    assert need == len("second, longer") and abs(free - disk.f_bavail * disk.f_frsize) < 2**30
    assert "No space left on device" in str(caught.value) and "checkpoint t is intact" in str(caught.value)
    assert path.read_text() == "first" and not list(path.parent.glob("*.tmp"))
    write_file(str(path), "third", what="the results", site="results")  # the fault fires once
    assert path.read_text() == "third"


def test_a_program_error_keeps_its_traceback(tmp_path) -> None:
    with pytest.raises(KeyError):
        with guarded(str(tmp_path / "x"), "x", need=1, site="results"):
            raise KeyError("a bug, not the disk")


def test_output_paths_checked_before_work(tmp_path) -> None:
    regular = tmp_path / "file"
    regular.write_text("")
    assert "is a file, not a directory" in path_problem(str(regular), "--output-dir x")
    problem = path_problem(str(regular / "eval" / "deeper"), "--output-dir y")
    assert problem.startswith("--output-dir y: ") and f"{regular} is a file, so no directory" in problem
    assert path_problem(str(tmp_path / "new" / "dir"), "--output-dir z") is None
    if os.geteuid() != 0:  # root writes through permissions (test_write_real_disk mounts a read-only one)
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert "not writable" in path_problem(str(locked / "out"), "--output-dir l")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_file_system_without_storage_is_named_not_taken_for_a_full_disk(tmp_path) -> None:
    """/proc reports 0 of 0 blocks free: that is not a full disk (free space unknown), and an output
    path there is refused before any work, by what it is."""
    from gorp_ds.safe_write import free_bytes

    assert os.statvfs("/proc").f_blocks == 0  # the premise
    assert free_bytes("/proc/x/run") is None
    assert free_bytes(str(tmp_path)) == os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize > 0
    problem = path_problem("/proc/x/run", "--output-dir /proc/x/run")
    assert problem == ("--output-dir /proc/x/run: /proc is on a file system without storage (such as /proc or /sys), "
                       "where no file can be made; choose a path on a disk")
    with pytest.raises(WriteError) as caught:  # a write there fails by its own cause, not "not enough free space"
        write_file("/proc/x/results.json", "{}", what="the results", site="results")
    assert "not enough free space" not in str(caught.value) and "the free space is unknown" in str(caught.value)


def test_report_files_stop_at_the_failed_one(tmp_path, fault_plan) -> None:
    from gorp_ds.cl.report import on_rank0, write_method_results, write_predictions, write_summary

    records = [[{"index": 0, "prediction": "red"}], [{"index": 0, "prediction": "cat"}]]
    fault_plan(write_fault=("predictions", 2))
    with pytest.raises(WriteError, match="predictions on emb_animal"):
        on_rank0(0, lambda: write_predictions(str(tmp_path), 1, ["emb_color", "emb_animal"], records))
    assert json.loads((tmp_path / "predictions" / "R01_01_emb_color.jsonl").read_text()) == records[0][0]
    assert not (tmp_path / "predictions" / "R01_02_emb_animal.jsonl").exists()
    result = {"method": "gorp", "tasks": ["a"], "R": [[50.0], [75.0]], "metrics": {"AA": 75.0, "BWT": None, "FWT": None,
                                                                                 "forgetting": None}}
    fault_plan(write_fault=("results", 3))  # results.json and results.md written, the heatmap fails
    with pytest.raises(WriteError, match="heatmap of R"):
        write_method_results(str(tmp_path), result)
    assert json.loads((tmp_path / "results.json").read_text()) == result
    assert "| 75.0 |" in (tmp_path / "results.md").read_text() and not (tmp_path / "R.png").exists()
    fault_plan()
    write_method_results(str(tmp_path), result)
    assert (tmp_path / "R.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fault_plan(write_fault=("summary", 1))
    result["timings"] = {"train_s": 1.0}
    with pytest.raises(WriteError, match=f"^{tmp_path / 'summary.md'}: cannot write the methods summary: No space") \
            as caught:
        write_summary(str(tmp_path), [result])
    assert "every method's results.json is written" in str(caught.value)
    assert json.loads((tmp_path / "results.json").read_text()) == {k: v for k, v in result.items() if k != "timings"}


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_events_are_written_in_the_calling_thread(tmp_path, fault_plan) -> None:
    from gorp_ds.cl.monitor import Monitor

    board = {"enabled": True, "output_path": str(tmp_path / "tb"), "job_name": "gorp"}
    monitor = Monitor(None, board, rank=0)
    monitor.write([("train/loss", 2.5, 1), ("train/lr/full", 0.015625, 1)])
    monitor.write([("train/loss", 2.25, 2)])
    assert _scalars(tmp_path / "tb" / "gorp") == {"train/loss": [(1, 2.5), (2, 2.25)], "train/lr/full": [(1, 0.015625)]}
    monitor.raise_failure("nothing failed")  # a no-op
    fault_plan(write_fault=("tensorboard_flush", 2))
    monitor.write([("train/loss", 2.0, 3)])
    monitor.write([("train/loss", 1.5, 4)])  # fails: kept, not raised here
    monitor.write([("train/loss", 1.25, 5)])  # dropped after the failure
    with pytest.raises(WriteError) as caught:
        monitor.raise_failure("checkpoint c is intact")
    text = str(caught.value)
    assert text.startswith(f"{monitor._events.path}: cannot write the TensorBoard events: No space left on device")
    assert "checkpoint c is intact" in text and NUMBERS.search(text)
    monitor.close()
    assert [step for step, _ in _scalars(tmp_path / "tb" / "gorp")["train/loss"]] == [1, 2, 3]

    fault_plan(write_fault=("tensorboard_open", 1))
    with pytest.raises(WriteError, match="cannot write the TensorBoard events: No space left on device"):
        Monitor(None, {**board, "job_name": "other"}, rank=0)
    assert Monitor(None, {**board, "enabled": False}, rank=0).enabled is False
