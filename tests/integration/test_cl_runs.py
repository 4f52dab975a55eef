"""Runs you can trust, and non-finite steps: real 2-rank ZeRO-2 launches of gorp (and seq-ft) on the
tiny LLaMA, 2 tasks × 4 steps, a checkpoint every 2 steps.

The re-run sequence is the one a Slurm requeue produces (``--resume auto`` is what the sbatch script
passes), in one output directory D:

1. run A (another learning rate) finishes in D;
2. run B into D without flags: refused at start on both ranks (exit 2, one line), D untouched;
3. run B into D with ``--resume auto``: refused, because A's finished results were produced with
   other settings (this is where the old code said "already finished; skipping" and threw B away);
4. run B into D with ``--overwrite``: A moves to ``D.old-<time>``; B is killed mid task 2;
5. the requeue, ``--resume auto``: B resumes from its own checkpoint and ends exactly where an
   uninterrupted B ends (R, weights, masters, shared spaces);
6. the same killed state resumed with a new ``--lr-lora``: the new value is applied from the resume
   step (TensorBoard logs the groups' actual learning rates) and recorded (results, progress, config.yaml).

Non-finite values: B with a NaN written into one tensor's gradient at task 1, step 3 (the loss stays
finite; under ZeRO the NaN lies in rank 0's partition only) must skip that step and then match,
bit for bit, B run with that step left out altogether (no forward, backward or optimizer call, same
data order otherwise) — the honest "run without that batch": everything a skipped step could leak
(moments, step counters, projector refresh schedule, DeepSpeed's gradient buffers) would show up as a
difference. seq-ft at ``--lr-plain 1e30`` diverges after its first step and must stop with the
non-finite error and a checkpoint of that first step, not finish with R = 0.

Every launch here also evaluates ``--eval-tasks emb_fruit`` (never trained): its column is in every
row, its batches are never drawn, and a resumed run's eval-task rows equal the uninterrupted run's.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from gorp_ds.cl.config import flatten_run
from tests.support import REPO
from tests.support.launch import clean_env, launch_train, read_final_state, read_scalars
from tests.support.resume_checks import assert_same_final_state
from tests.support.side_by_side import side_by_side

ERROR_PREFIX = "gorp_ds: error:"
B_ARGS = [
    "--method", "gorp", "--tasks", "emb_color,emb_animal", "--max-steps-per-task", "4", "--save-every", "2",
    "--eval-samples", "8", "--max-train-per-task", "64", "--global-batch-size", "8", "--micro-batch-size", "2",
    "--lr-lora", "1e-2", "--lr-full", "1e-2", "--lr-plain", "1e-3", "--update-gap", "2", "--eval-tasks", "emb_fruit",
]
HOOKS = ("GORP_DS_FAULT_AT", "GORP_DS_NAN_AT", "GORP_DS_DROP_AT")

pytestmark = pytest.mark.slow


def _launch(model_dir: Path, out: Path, *extra: str, **hooks: str) -> dict:
    proc = launch_train(["--ds_config", str(REPO / "ds_configs" / "zero2.json"), "--model", str(model_dir), *B_ARGS,
                         "--output-dir", str(out), *extra], env=clean_env(drop=HOOKS, **hooks), timeout=300)
    return {"rc": proc.returncode, "output": proc.stdout + proc.stderr}


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _errors(output: str) -> list[str]:
    return [line[line.index(ERROR_PREFIX):] for line in output.splitlines() if ERROR_PREFIX in line]


def _results(out: Path, method: str = "gorp") -> dict:
    return json.loads((out / method / "results.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict:
    root = tmp_path_factory.mktemp("runs")
    d, ref = root / "D", root / "B_reference"
    record: dict = {"root": root, "D": d, "ref": ref, "D2": root / "D_new_lr"}

    def requeue_sequence() -> None:  # the launches into D, one after the other (each needs the last)
        record["A"] = _launch(tiny_model_dir, d, "--lr-lora", "5e-3")
        record["A_files"] = _listing(d)
        record["no_flags"] = _launch(tiny_model_dir, d)
        record["after_no_flags"] = _listing(d)
        record["auto_over_A"] = _launch(tiny_model_dir, d, "--resume", "auto")
        record["after_auto_over_A"] = _listing(d)
        record["overwrite_killed"] = _launch(tiny_model_dir, d, "--overwrite", GORP_DS_FAULT_AT="1,3")
        record["killed_latest"] = (d / "gorp" / "checkpoints" / "latest").read_text().strip()
        record["killed_has_results"] = (d / "gorp" / "results.json").exists()
        shutil.copytree(d, record["D2"])
        record["requeue"] = _launch(tiny_model_dir, d, "--resume", "auto")
        record["new_lr"] = _launch(tiny_model_dir, record["D2"], "--resume", "--lr-lora", "2e-2")

    def independent() -> None:  # launches into directories of their own
        record["reference"] = _launch(tiny_model_dir, ref)
        record["nan"] = _launch(tiny_model_dir, root / "nan", GORP_DS_NAN_AT="0,3")
        record["drop"] = _launch(tiny_model_dir, root / "drop", GORP_DS_DROP_AT="0,3")
        record["diverge"] = _launch(tiny_model_dir, root / "diverge", "--method", "seq-ft", "--lr-plain", "1e30")

    side_by_side(requeue_sequence, independent)
    return record


def test_first_run_writes_its_configuration(runs) -> None:
    assert runs["A"]["rc"] == 0, runs["A"]["output"][-4000:]
    import yaml

    saved = yaml.safe_load((runs["ref"] / "config.yaml").read_text())
    run = flatten_run(saved["run"])  # by section: model, data, lora, targets, optimizer, runner
    assert run["tasks"] == ["emb_color", "emb_animal"] and run["methods"] == ["gorp"]
    assert run["lr_lora"] == 1e-2 and run["max_steps_per_task"] == 4
    assert saved["world_size"] == 2
    assert saved["deepspeed"]["zero_stage"] == 2 and saved["deepspeed"]["gradient_accumulation_steps"] == 2
    assert "run configuration" in runs["reference"]["output"]
    (aside,) = runs["root"].glob("D.old-*")
    assert flatten_run(yaml.safe_load((aside / "config.yaml").read_text())["run"])["lr_lora"] == 5e-3  # A's own


def test_rerun_without_flags_is_refused_on_every_rank(runs) -> None:
    got = runs["no_flags"]
    assert got["rc"] == 2, got["output"][-3000:]
    errors = _errors(got["output"])
    assert len(errors) == 1, got["output"][-3000:]  # rank 0 prints; rank 1 stopped with it (status 2 overall)
    assert "already holds a run" in errors[0] and "--resume" in errors[0] and "--overwrite" in errors[0]
    assert "Traceback" not in got["output"]
    assert runs["after_no_flags"] == runs["A_files"]  # nothing written, moved or deleted


def test_resume_auto_does_not_take_another_runs_finished_results(runs) -> None:
    got = runs["auto_over_A"]
    assert got["rc"] == 2, got["output"][-3000:]
    assert "already finished" not in got["output"]
    errors = _errors(got["output"])
    assert len(errors) == 1 and "finished results" in errors[0], got["output"][-3000:]
    assert "gorp/results.json: lr_lora: saved 0.005, this run 0.01" in got["output"]
    assert runs["after_auto_over_A"] == runs["A_files"]


def test_overwrite_moves_the_old_run_aside(runs) -> None:
    got = runs["overwrite_killed"]
    assert got["rc"] not in (0, 2), got["output"][-3000:]  # really killed (SIGKILL) mid task 2
    aside = sorted(runs["root"].glob("D.old-*"))
    assert len(aside) == 1, aside
    assert _listing(aside[0]).keys() == runs["A_files"].keys()  # all of A, TensorBoard events included
    assert _results(aside[0])["config"]["lr_lora"] == 5e-3
    assert runs["killed_latest"] == "task02_step000002" and not runs["killed_has_results"]


def test_requeue_resumes_the_new_run_and_matches_uninterrupted(runs) -> None:
    got, ref = runs["requeue"], runs["reference"]
    assert ref["rc"] == 0, ref["output"][-4000:]
    assert got["rc"] == 0, got["output"][-4000:]
    assert "already finished" not in got["output"]
    assert "[gorp] resumed at task 2, step 2" in got["output"]
    resumed, reference = _results(runs["D"]), _results(runs["ref"])
    assert resumed["R"] == reference["R"] and resumed["metrics"] == reference["metrics"]
    assert resumed["eval_tasks"] == reference["eval_tasks"]
    assert resumed["config"]["lr_lora"] == 1e-2 and resumed["config_changes"] == []
    assert_same_final_state(runs["D"], runs["ref"])


def test_changed_learning_rate_is_applied_and_recorded(runs) -> None:
    got = runs["new_lr"]
    assert got["rc"] == 0, got["output"][-4000:]
    # Killed after global step 7; the checkpoint is at task 2, step 2 = global step 6.
    change = {"field": "lr_lora", "old": 0.01, "new": 0.02, "task": 2, "step": 2, "global_step": 6}
    result = _results(runs["D2"])
    assert result["config"]["lr_lora"] == 0.02
    # The directory was copied for this case, so output_dir changed as well (recorded like any other).
    moved = {"field": "output_dir", "old": str(runs["D"]), "new": str(runs["D2"]), "task": 2, "step": 2,
             "global_step": 6}
    assert result["config_changes"] == [change, moved]
    assert json.loads((runs["D2"] / "gorp" / "progress.json").read_text())["changes"] == [change, moved]
    import yaml

    assert flatten_run(yaml.safe_load((runs["D2"] / "config.yaml").read_text())["run"])["lr_lora"] == 0.02
    # The learning rates the optimizer actually used, step by step (the killed attempt logged steps
    # 1-7; the resumed launch re-logs from step 7, replacing them).
    scalars = read_scalars(runs["D2"], "gorp")
    for role in ("lora_a", "lora_b"):
        used = dict(scalars[f"train/lr/{role}"])
        assert sorted(used) == list(range(1, 9)), used
        assert all(used[s] == pytest.approx(0.01) for s in range(1, 7)), used
        assert all(used[s] == pytest.approx(0.02) for s in (7, 8)), used
    assert all(v == pytest.approx(0.01) for _, v in scalars["train/lr/full"])  # unchanged settings stay


def test_nan_gradient_is_skipped_and_the_run_matches_one_without_that_batch(runs) -> None:
    nan, drop = runs["nan"], runs["drop"]
    assert nan["rc"] == 0, nan["output"][-4000:]
    assert drop["rc"] == 0, drop["output"][-4000:]
    assert "task 1, step 3: non-finite loss or gradient" in nan["output"]
    nan_dir, drop_dir = runs["root"] / "nan", runs["root"] / "drop"
    assert _results(nan_dir)["skipped_nonfinite_steps"] == 1 and _results(drop_dir)["skipped_nonfinite_steps"] == 0
    skipped = dict(read_scalars(nan_dir, "gorp")["train/skipped_nonfinite_steps"])
    assert [skipped[s] for s in range(1, 9)] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert _results(nan_dir)["R"] == _results(drop_dir)["R"]
    masters = assert_same_final_state(nan_dir, drop_dir)
    # Not vacuous: the batch left out matters (the uninterrupted run, which trained on it, differs).
    _, ref_masters, _, _ = read_final_state(runs["ref"], "gorp")
    assert any(not torch.equal(masters[k], ref_masters[k]) for k in masters)


def test_diverging_run_stops_with_a_clear_error_and_its_last_good_checkpoint(runs) -> None:
    got = runs["diverge"]
    assert got["rc"] == 2, got["output"][-4000:]
    assert "Traceback" not in got["output"]
    errors = _errors(got["output"])
    assert len(errors) == 1, got["output"][-4000:]
    assert "3 optimizer steps in a row had a non-finite loss or gradient" in errors[0]
    assert "task 1, steps 2-4" in errors[0] and "--lr-plain 1e+30" in errors[0]
    out = runs["root"] / "diverge" / "seq-ft"
    assert not (out / "results.json").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "task01_step000001"
    from gorp_ds.zero import read_client_state, read_masters

    progress = read_client_state(str(out / "checkpoints"), "task01_step000001")["progress"]
    assert progress["task_number"] == 1 and progress["step"] == 1 and progress["global_step"] == 1
    masters = read_masters(str(out / "checkpoints"), "task01_step000001")
    assert masters and all(torch.isfinite(t).all() for t in masters.values())


def test_eval_tasks_are_evaluated_in_every_row_and_never_trained(runs) -> None:
    ref = runs["reference"]
    assert ref["rc"] == 0, ref["output"][-4000:]
    result = _results(runs["ref"])
    assert result["tasks"] == ["emb_color", "emb_animal"]  # R's columns: the trained tasks only
    section = result["eval_tasks"]
    assert section["tasks"] == ["emb_fruit"]
    rows = section["R"]
    assert len(rows) == 3 and all(row is not None and len(row) == 1 for row in rows)  # before, after 1, after 2
    for (value,) in rows:  # correct of the 8 evaluated examples, in percent
        assert 0.0 <= value <= 100.0 and abs(value * 8 / 100 - round(value * 8 / 100)) < 1e-6, value
    # metrics.eval_task_metrics, re-derived from the rows
    assert section["metrics"] == pytest.approx({"eval_mean": rows[2][0], "generalisation": rows[2][0] - rows[0][0]})
    assert section["predictions"] == [[f"predictions/R{i:02d}_03_emb_fruit.jsonl"] for i in range(3)]
    lines = (runs["ref"] / "gorp" / section["predictions"][2][0]).read_text().splitlines()
    assert len(lines) == 8 and 100 * sum(json.loads(line)["correct"] for line in lines) / 8 == rows[2][0]
    # Never trained: each task's training ends with "trained on <task>" (its batches drawn from that
    # task's train split); both trained tasks appear, the eval task never does.
    trained = re.findall(r"\[gorp\] task \d+: .*; trained on (\S+)", ref["output"])
    assert trained == ["emb_color", "emb_animal"], ref["output"][-3000:]
    assert "eval tasks (never trained): emb_fruit" in ref["output"]
    # TensorBoard: the eval task's accuracy at every row and their mean, the two numbers at the end
    scalars = read_scalars(runs["ref"], "gorp")
    assert scalars["eval_tasks/emb_fruit"] == [(i, pytest.approx(row[0])) for i, row in enumerate(rows)]
    assert [s for s, _ in scalars["eval_tasks/mean"]] == [0, 1, 2]
    assert scalars["metrics/generalisation"][-1][1] == pytest.approx(section["metrics"]["generalisation"])
    assert scalars["metrics/eval_mean"][-1][1] == pytest.approx(section["metrics"]["eval_mean"])
    summary = (runs["ref"] / "summary.md").read_text()
    assert "| eval mean | generalisation |" in summary and "Eval tasks (never trained):" in summary
    assert json.loads((runs["ref"] / "summary.json").read_text())["gorp"]["generalisation"] == pytest.approx(
        section["metrics"]["generalisation"])
