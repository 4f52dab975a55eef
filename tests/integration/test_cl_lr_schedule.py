"""The learning-rate schedule in real 2-rank launches (gorp on the tiny LLaMA, ZeRO-2, two tasks of 6
steps, cosine decay to 0.1 after 4 warmup steps, restarted at each task, a checkpoint every 2 steps):

1. an uninterrupted launch;
2. the same launch SIGKILLed after step 3 of task 2 (``GORP_DS_FAULT_AT`` "1,3"), mid-warmup; its
   last checkpoint is 2 steps into task 2;
3. ``--resume`` of it.

Every role's learning rate in TensorBoard (``train/lr/<role>``, the rate the step used) equals its
base rate times the hand-computed factor at every global step, in both output directories (the
resumed one holds the killed launch's events and the resumed launch's, step 9 from both), and the
final fp32 masters, LoRA merges and shared spaces are bit-identical to the uninterrupted launch's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.launch import launch
from tests.support.resume_checks import assert_same_final_state
from tests.support.side_by_side import side_by_side

pytestmark = pytest.mark.slow

STEPS = 6
ARGS = ("--method", "gorp", "--tasks", "emb_color,emb_animal", "--max-steps-per-task", str(STEPS), "--lr-full", "5e-3",
        "--lr-schedule", "cosine", "--lr-warmup-steps", "4", "--lr-min-ratio", "0.1", "--lr-schedule-scope", "task",
        "--export", "false", "--predictions", "false")
# Factor of each step of a task (warmup 4: (k+1)/4; then p = (k-4)/2: 1, 0.1 + 0.45·(1 + cos π/2) = 0.55).
FACTORS = [0.25, 0.5, 0.75, 1.0, 1.0, 0.55]
BASE = {"lora_a": 1e-2, "lora_b": 1e-2, "full": 5e-3}  # --lr-lora (RUN_ARGS), --lr-full


def _lr_events(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every ``train/lr/<role>`` event of gorp's TensorBoard folder, duplicates kept (no purge)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run / "tensorboard" / "gorp"), size_guidance={"scalars": 0},
                                   purge_orphaned_data=False)
    accumulator.Reload()
    return {tag.rsplit("/", 1)[1]: [(e.step, e.value) for e in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"] if tag.startswith("train/lr/")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict:
    reference, resumed = tmp_path_factory.mktemp("lr_reference"), tmp_path_factory.mktemp("lr_resumed")
    record: dict = {"reference_dir": reference, "resumed_dir": resumed}

    def run(name: str, out: Path, extra: tuple[str, ...], fault: str | None) -> None:
        proc = launch(tiny_model_dir, out, *ARGS, *extra, fault=fault)
        latest = out / "gorp" / "checkpoints" / "latest"
        record[name] = {"returncode": proc.returncode, "output": proc.stdout + proc.stderr,
                        "latest": latest.read_text().strip() if latest.is_file() else None}

    def killed_and_resumed() -> None:
        run("killed", resumed, (), "1,3")
        run("resumed", resumed, ("--resume",), None)

    side_by_side(lambda: run("reference", reference, (), None), killed_and_resumed)
    return record


def test_the_kill_is_real_and_mid_warmup(runs) -> None:
    assert runs["reference"]["returncode"] == 0, runs["reference"]["output"][-6000:]
    assert runs["killed"]["returncode"] != 0, runs["killed"]["output"][-3000:]
    assert runs["killed"]["latest"] == "task02_step000002"  # 2 of task 2's 4 warmup steps done
    assert runs["resumed"]["returncode"] == 0, runs["resumed"]["output"][-6000:]
    assert "[gorp] resumed at task 2, step 2" in runs["resumed"]["output"], runs["resumed"]["output"][-3000:]


def test_every_role_follows_the_hand_computed_schedule_in_both_runs(runs) -> None:
    for run in (runs["reference_dir"], runs["resumed_dir"]):
        events = _lr_events(run)
        assert sorted(events) == sorted(BASE), sorted(events)
        for role, logged in events.items():
            for step, value in logged:  # TensorBoard keeps float32
                expected = BASE[role] * FACTORS[(step - 1) % STEPS]
                assert value == pytest.approx(expected, rel=1e-6), (run.name, role, step, value, expected)
            assert sorted({step for step, _ in logged}) == list(range(1, 2 * STEPS + 1)), (run.name, role)


def test_resumed_lr_per_step_equals_the_uninterrupted_runs(runs) -> None:
    reference, resumed = _lr_events(runs["reference_dir"]), _lr_events(runs["resumed_dir"])
    for role in BASE:
        by_step = dict(reference[role])
        steps = [step for step, _ in resumed[role]]
        assert steps.count(9) == 2, steps  # logged by the killed launch and again after the resume
        assert all(value == by_step[step] for step, value in resumed[role]), (role, resumed[role], reference[role])


def test_final_weights_are_bit_identical(runs) -> None:
    assert_same_final_state(runs["resumed_dir"], runs["reference_dir"], merges=2)
