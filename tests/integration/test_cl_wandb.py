"""W&B gets every scalar the project logs, at the step the project logs it (issue 25).

One 2-rank ZeRO-2 launch of two methods on the tiny LLaMA with TensorBoard and an offline W&B
run (``WANDB_MODE=offline``). TensorBoard, written by DeepSpeed's own monitor, is the independent
reference: W&B's history, read back with W&B's own reader (``wandb leet inspect``), must hold the
same scalars at the same steps with the same values. DeepSpeed's ``Train/Samples/*`` scalars (the
sample count as the step, which made W&B drop the project's scalars) go to TensorBoard only.
Skipped without the optional ``wandb`` package (``pip install 'gorp_ds[wandb]'``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.launch import clean_env, launch_train, read_scalars
from tests.support.wandb_reader import has_inspect, history_by_axis, offline_runs

pytest.importorskip("wandb", reason="the optional wandb package (pip install 'gorp_ds[wandb]') is not installed")

pytestmark = pytest.mark.slow

METHODS = ["gorp", "seq-lora"]
TASKS = ["emb_color", "emb_animal"]
STEPS = 3
AXES = ("global_step", "R_row")  # gorp_ds/cl/wandb_log.py: STEP_AXIS, ROW_AXIS
DEEPSPEED_OWN = "Train/Samples/"  # DeepSpeed's monitor events (TensorBoard only)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_model_dir) -> tuple[Path, dict[str, Path], str]:
    """The run's output directory, ``{method: its W&B run file}``, and what the launch printed."""
    if not has_inspect():
        pytest.skip("this wandb has no `wandb leet inspect` to read an offline run with")
    tmp = tmp_path_factory.mktemp("wandb_run")
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    config["wandb"] = {"enabled": True, "project": "gorp_ds_test", "group": "issue25"}
    (tmp / "ds.json").write_text(json.dumps(config))
    wandb_dir = tmp / "wandb_dir"
    wandb_dir.mkdir()
    out = tmp / "out"
    proc = launch_train(["--ds_config", str(tmp / "ds.json"), "--model", str(tiny_model_dir), "--method", ",".join(METHODS),
                         "--tasks", ",".join(TASKS), "--max-steps-per-task", str(STEPS), "--eval-samples", "4",
                         "--max-train-per-task", "32", "--global-batch-size", "8", "--micro-batch-size", "2",
                         "--update-gap", "2", "--output-dir", str(out)],
                        env=clean_env(WANDB_MODE="offline", WANDB_DIR=str(wandb_dir)), timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return out, offline_runs(wandb_dir), output


def test_no_scalar_rejected(launched) -> None:
    _, _, output = launched
    assert "less than the current step" not in output
    assert "Tried to log" not in output


def test_one_run_per_method_from_rank_0(launched) -> None:
    _, runs, _ = launched
    assert sorted(runs) == sorted(METHODS)  # rank 1 opened none


@pytest.mark.parametrize("method", METHODS)
def test_wandb_history_equals_tensorboard(launched, method) -> None:
    out, runs, _ = launched
    board = read_scalars(out, method)
    wandb = history_by_axis(runs[method], AXES)
    ours = {tag: _one_per_step(tag, points) for tag, points in board.items() if not tag.startswith(DEEPSPEED_OWN)}
    assert set(wandb) == set(ours), (sorted(set(wandb) ^ set(ours)))
    for tag, points in ours.items():
        # TensorBoard stores float32; W&B the float64 the project logged.
        assert [step for step, _ in wandb[tag]] == [step for step, _ in points], tag
        assert [value for _, value in wandb[tag]] == pytest.approx([value for _, value in points], rel=1e-6, abs=1e-30), tag
    # Hand-checked against the run's shape: a loss per optimizer step over the whole sequence, R's rows
    # 0..2 per task, S's sizes at both task ends (gorp), DeepSpeed's own lr scalar in TensorBoard only.
    assert [step for step, _ in wandb["train/loss"]] == list(range(1, len(TASKS) * STEPS + 1))
    assert [step for step, _ in wandb[f"R/01_{TASKS[0]}"]] == [0, 1, 2]
    if method == "gorp":
        assert [step for step, _ in wandb["gorp/S_columns_mean"]] == [STEPS, 2 * STEPS]
    # DeepSpeed's own monitor events (sample-count steps) reach neither: the project writes the event
    # file itself (monitor.py) and logs the learning rate per role (train/lr/<role>)
    assert not any(tag.startswith(DEEPSPEED_OWN) for tag in (*wandb, *board)) and any(t.startswith("train/lr/") for t in wandb)


def _one_per_step(tag: str, points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """A W&B row holds one value per tag: TensorBoard's repeats of a tag at one step (seq-lora's two
    ``plain`` groups both write ``train/lr/plain``) must agree, and count once."""
    kept: list[tuple[int, float]] = []
    for step, value in points:
        if kept and kept[-1][0] == step:
            assert value == kept[-1][1], (tag, step, value, kept[-1][1])
            continue
        kept.append((step, value))
    return kept
