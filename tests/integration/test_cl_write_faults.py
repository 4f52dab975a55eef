"""A full disk at every output a run writes, in real 2-rank launches of launch/train.py (gorp, tiny
LLaMA, the arguments of test_cl_end_to_end: four tasks of 4 steps, a checkpoint every 2 steps).

One output directory goes through this chain; each launch but the last meets ENOSPC at one write
site (``GORP_DS_WRITE_FAULT``, gorp_ds/faults.py: the write fails as on a full disk), and must stop
every rank with one ``gorp_ds: error:`` line naming the file, the bytes needed and free, status 2,
no traceback, with ``latest`` on a complete checkpoint:

1. the first predictions file of R's row 1 (after task 1 trained; ``latest``: task 1, step 2);
2. --resume: creating the TensorBoard event file (before any step);
3. --resume: the 6th batch of TensorBoard events, inside task 2: kept by rank 0 and raised on every
   rank at the next checkpoint;
4. --resume: task 2's PEFT adapter tensors (its per-task export, written by rank 0 and agreed by
   every rank; ``latest`` stays at task 2, step 2);
5. --resume: the final export's weight file (after task 4, whose checkpoint is committed); the
   results.json written before the export (R complete, ``finished`` false) stays;
6. --resume (the unfinished results do not make it skip gorp): the finished results.json, after
   the export was written whole (the 4th write of the results site: results.json, its table and
   heatmap come before the export, unfinished);
7. --resume: finishes, and equals gorp in the uninterrupted six-method launch (R, metrics, the fp32
   masters and the LoRA merges, bit for bit).

Then ``--eval-only`` with its output under a regular file, and on a read-only file system: one line
before any evaluation (of gorp's export from the uninterrupted launch; these two launches run beside
the chain).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.launch import launch, six_method_run
from tests.support.resume_checks import assert_resumed_equals_uninterrupted
from tests.support.side_by_side import side_by_side

pytestmark = pytest.mark.slow
GORP_ONLY = ("--method", "gorp")
NUMBERS = re.compile(r"it needs [\d.]+ \w*B \(\d+ bytes\), [\d.]+ \w*B \(\d+ bytes\) are free")


def _latest(out: Path) -> str | None:
    latest = out / "gorp" / "checkpoints" / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def _one_error(proc: subprocess.CompletedProcess) -> str:
    """The launch's one error line (asserting status 2, one line, no traceback)."""
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gorp_ds: error:")]
    assert len(errors) == 1, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr and "Exception in thread" not in proc.stderr, proc.stderr[-4000:]
    return errors[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir) -> Path:
    return six_method_run(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def launches(tmp_path_factory, tiny_model_dir, reference) -> dict:
    """The chain, and beside it (independent launches, side by side) the ``--eval-only`` refusals."""
    chain_dir, eval_dir = tmp_path_factory.mktemp("write_faults"), tmp_path_factory.mktemp("eval_only_outputs")
    chain, eval_only = side_by_side(lambda: _chain(chain_dir, tiny_model_dir),
                                    lambda: _eval_only_launches(eval_dir, tiny_model_dir, reference / "gorp" / "export"))
    return {"chain": chain, "eval_only": eval_only}


@pytest.fixture(scope="module")
def chain(launches) -> dict:
    return launches["chain"]


def _chain(out: Path, tiny_model_dir: Path) -> dict:
    from gorp_ds.zero.checkpoint_io import check_tag

    faults = ["predictions@5", "tensorboard_open", "tensorboard_flush@6", "adapters@3", "export@2", "results@4", None]
    record = []
    for number, fault in enumerate(faults):
        extra = ("--resume",) if number else ()
        env = {"GORP_DS_WRITE_FAULT": fault} if fault else {}
        proc = launch(tiny_model_dir, out, *GORP_ONLY, *extra, env_extra=env)
        tag = _latest(out)
        results = out / "gorp" / "results.json"
        record.append({"fault": fault, "proc": proc, "latest": tag,
                       "results": results.read_bytes() if results.is_file() else None,
                       "exported": (out / "gorp" / "export" / "model.safetensors").is_file(),
                       "complete": tag is not None and check_tag(str(out / "gorp" / "checkpoints"), tag) is None,
                       "progress": json.loads((out / "gorp" / "progress.json").read_text())})
    return {"out": out, "launches": record}


def test_each_full_disk_is_one_line_and_keeps_the_last_checkpoint(chain) -> None:
    out = chain["out"] / "gorp"
    expected = {  # site: (the file named, the checkpoint latest names after the launch)
        "predictions@5": (out / "predictions" / "R01_01_emb_color.jsonl", "task01_step000002"),
        "tensorboard_open": (chain["out"] / "tensorboard" / "gorp" / "events.out.tfevents.", "task01_step000002"),
        "tensorboard_flush@6": (chain["out"] / "tensorboard" / "gorp" / "events.out.tfevents.", None),
        # resumed at task 2 step 2: its end writes the full delta, the adapter's config, then its tensors;
        # the task's end checkpoint comes after its per-task export, so latest stays at step 2
        "adapters@3": (out / "export" / "task_02" / "adapter" / "adapter_model.safetensors", "task02_step000002"),
        "export@2": (out / "export.tmp", "task05_step000000"),
        "results@4": (out / "results.json", "task05_step000000"),
    }
    for launch_record in chain["launches"][:-1]:
        line = _one_error(launch_record["proc"])
        path, tag = expected[launch_record["fault"]]
        assert f": {path}" in line and "No space left on device" in line and NUMBERS.search(line), line
        assert "Fix: free space or point --output-dir at a larger, writable file system, then run again with --resume auto" in line, line
        assert launch_record["complete"], launch_record["latest"]
        if tag is not None:
            assert launch_record["latest"] == tag, (launch_record["fault"], launch_record["latest"])
            assert f"checkpoint {out / 'checkpoints' / tag} are intact" in line, line
    # The TensorBoard failure inside task 2 surfaced at its next checkpoint (step 2), after the save.
    flush = chain["launches"][2]
    assert flush["latest"] == "task02_step000002", flush["latest"]
    assert f"checkpoint {out / 'checkpoints' / 'task02_step000002'} are intact" in _one_error(flush["proc"])


def test_what_was_written_before_stays(chain) -> None:
    first = chain["launches"][0]
    assert sorted(first["progress"]["rows"]) == ["0"], "row 0 recorded; row 1's files failed"
    assert "resumed at task 1, step 2" in chain["launches"][2]["proc"].stdout + chain["launches"][2]["proc"].stderr
    export_failed = chain["launches"][4]
    assert sorted(export_failed["progress"]["rows"]) == ["0", "1", "2", "3", "4"]
    assert all(launch_record["results"] is None for launch_record in chain["launches"][:4])


def test_a_full_disk_during_the_export_keeps_the_results(chain, reference) -> None:
    """The results are written before the final export: the export's failure leaves results.json
    with R and the metrics complete, marked unfinished, and no export. The next launch is not
    skipped: it writes the export whole, then fails on the finished results, leaving the unfinished
    ones; the last launch writes the export again over it and marks the results finished."""
    export_failed, results_failed, last = chain["launches"][4], chain["launches"][5], chain["launches"][6]
    expected = json.loads((reference / "gorp" / "results.json").read_text())
    assert expected["finished"] is True
    for launch_record in (export_failed, results_failed):
        kept = json.loads(launch_record["results"])
        assert kept["finished"] is False, launch_record["fault"]
        assert kept["R"] == expected["R"] and kept["metrics"] == expected["metrics"], (kept["R"], expected["R"])
        assert "final" not in kept["exports"], kept["exports"]
    assert not export_failed["exported"] and results_failed["exported"]
    assert "[gorp] already finished" not in results_failed["proc"].stdout + results_failed["proc"].stderr
    assert "[gorp] already finished" not in last["proc"].stdout + last["proc"].stderr
    final = json.loads(last["results"])
    assert final["finished"] is True and final["exports"]["final"]["bytes"] > 0 and last["exported"]


def test_resumed_chain_equals_uninterrupted(chain, reference) -> None:
    last = chain["launches"][-1]
    assert last["proc"].returncode == 0, (last["proc"].stdout + last["proc"].stderr)[-4000:]
    assert_resumed_equals_uninterrupted(chain["out"], reference, merges=4)
    # every task's adapter, the one whose write failed included, was written by a later launch
    for task in range(1, 5):
        adapter = chain["out"] / "gorp" / "export" / f"task_{task:02d}" / "adapter"
        assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file(), task
    expected = json.loads((reference / "gorp" / "results.json").read_text())
    for path in expected["predictions"][-1]:
        assert (chain["out"] / "gorp" / path).read_text() == (reference / "gorp" / path).read_text(), path


def _eval_only_launches(tmp: Path, tiny_model_dir: Path, model: Path) -> dict:
    """``--eval-only`` of an export (gorp's, from the uninterrupted launch) with its output under a
    regular file, and in a read-only directory (a read-only tmpfs when running as root, who writes
    through permissions)."""
    regular = tmp / "a_file"
    regular.write_text("")
    record: dict = {"regular": regular, "mount": tmp / "read_only", "skip": None}
    record["under_file"] = launch(tiny_model_dir, regular / "eval_out", *GORP_ONLY, "--eval-only", "--model", str(model))
    mount = record["mount"]
    mount.mkdir()
    if os.geteuid() != 0:
        mount.chmod(0o555)
    else:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)], capture_output=True)
        if done.returncode != 0:
            record["skip"] = f"running as root and cannot mount a read-only tmpfs: {done.stderr.decode().strip()}"
            return record
    try:
        record["read_only"] = launch(tiny_model_dir, mount / "eval_out", *GORP_ONLY, "--eval-only", "--model",
                                     str(model))
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(mount)], check=False)
    return record


def test_eval_only_output_path_is_checked_before_evaluation(launches) -> None:
    got = launches["eval_only"]
    proc = got["under_file"]
    line = _one_error(proc)
    assert f"{got['regular']} is a file, so no directory can be made under it" in line, line
    assert "evaluating" not in proc.stdout + proc.stderr  # stopped before the evaluation started

    if got["skip"] is not None:
        pytest.skip(got["skip"])
    proc = got["read_only"]
    line = _one_error(proc)
    assert f"{got['mount']} is" in line and "not writable" in line, line
    assert "evaluating" not in proc.stdout + proc.stderr
