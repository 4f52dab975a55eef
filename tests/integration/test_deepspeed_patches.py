"""What each patch of ``gorp_ds/zero/deepspeed_patches.py`` relies on in DeepSpeed, checked against the
installed DeepSpeed: the patched methods' signatures, and their behaviour on a 2-rank gloo group
(``patch_scenarios``; one spawned group for every patch). A DeepSpeed upgrade that changes what a
patch relies on fails here, naming the patch."""

from __future__ import annotations

import inspect

import pytest
import torch

from gorp_ds.zero import deepspeed_patches as patches
from tests.support import patch_scenarios as ps
from tests.support.dist_utils import run_ranks

WORLD = 2
ATOL = 1e-6


def _undecorated(function):
    """``function`` without DeepSpeed's ``instrument_w_nvtx`` wrapper (which keeps no ``__wrapped__``)."""
    while function.__name__ == "wrapped_fn" and function.__closure__:
        function = next(cell.cell_contents for cell in function.__closure__ if inspect.isfunction(cell.cell_contents))
    return function


def _parameters(function) -> list[tuple[str, object]]:
    """``(name, default)`` of a method's parameters after ``self``."""
    return [(p.name, p.default) for p in list(inspect.signature(_undecorated(function)).parameters.values())[1:]]


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> list[dict]:
    return run_ranks(WORLD, ps.patch_facts, out_dir=str(tmp_path_factory.mktemp("patches")))


def test_written_against_this_deepspeed_minor_release():
    import deepspeed

    installed = deepspeed.__version__.split(".")[:2]
    assert installed == patches.WRITTEN_AGAINST.split(".")[:2], (
        f"DeepSpeed {deepspeed.__version__}: re-read gorp_ds/zero/deepspeed_patches.py (written against "
        f"{patches.WRITTEN_AGAINST}) and update WRITTEN_AGAINST")


def test_unlink_cpu_allreduce_buffer(facts):
    """DeepSpeed names each rank's CPU all-reduce buffer as CPU_ALLREDUCE_BUFFER says, every rank
    maps every rank's buffer, and the unlinked buffers stay mapped (the group kept working after)."""
    import os

    for rank in facts:
        names = [patches.CPU_ALLREDUCE_BUFFER.format(uid=os.getuid(), addr="127.0.0.1", port=rank["shm"]["port"], rank=r)
                 for r in range(WORLD)]
        assert rank["shm"]["mapped"] == [f"{name} (deleted)" for name in names]


# ---------------------------------------------------------------------------- ZeRO-1/2


def test_combine_flat_norm_with_targets(facts):
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    assert _parameters(DeepSpeedZeroOptimizer.scaled_global_norm) == [("norm_type", 2)]
    for rank in facts:
        flat = rank["flat"]
        # step() asks the patched norm once and clips every partition (and reports the norm) by it
        assert flat["total_norm"] == pytest.approx(flat["norm"], rel=1e-6)
        assert flat["reported_norm"] == pytest.approx(flat["norm"], rel=1e-6)
        assert flat["update_error"] < ATOL


def test_step_targets_after_flat_step(facts):
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    assert _parameters(DeepSpeedZeroOptimizer.step) == [("closure", None)]
    for rank in facts:
        flat = rank["flat"]
        # R reduced before DeepSpeed's norm; the targets step after DeepSpeed's step with clip_grad
        assert flat["calls"] == ["reduce", "norm", ("step", ps.CLIP, pytest.approx(flat["norm"], rel=1e-6)), "reset"]
        # an overflow leaves zero_optimizer.overflow set: no step for the targets, refreshes undone
        calls = flat["overflow_calls"]
        assert calls[0] == "reduce" and calls[-2:] == ["undo", "reset"]
        assert not any(isinstance(call, tuple) for call in calls)


# ---------------------------------------------------------------------------- ZeRO-3


def test_combine_stage3_norm_with_targets(facts):
    from deepspeed.runtime.utils import combine_grad_norm_groups
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    assert _parameters(DeepSpeedZeroOptimizer_Stage3._get_norm_groups) == []
    assert [p.name for p in inspect.signature(combine_grad_norm_groups).parameters.values()][:1] == ["norm_groups"]
    for rank in facts:
        stage3 = rank["stage3"]
        assert stage3["total_norm"] == pytest.approx(stage3["norm"], rel=1e-6)
        assert stage3["reported_norm"] == pytest.approx(stage3["norm"], rel=1e-6)


def test_step_targets_in_stage3_post_step(facts):
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    assert _parameters(DeepSpeedZeroOptimizer_Stage3._post_step) == [("timer_names", inspect.Parameter.empty)]
    for rank in facts:
        stage3 = rank["stage3"]
        assert stage3["persistent"] == [True, True, False, True, True, True]  # only large.weight is partitioned
        # The targets' step (here +1 on the frozen persistent weight's partition) runs after every
        # sub-group's bf16 partition was written and before the persistent parameters are re-gathered.
        assert stage3["update_error"] < ATOL
        assert stage3["calls"] == ["reduce", "norm", ("step", ps.CLIP, pytest.approx(stage3["norm"], rel=1e-6)),
                                   "reset"]


def test_skip_marked_stage3_steps(facts):
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    assert _parameters(DeepSpeedZeroOptimizer_Stage3._optimizer_step) == [("sub_group_id", inspect.Parameter.empty)]
    for rank in facts:
        stage3 = rank["stage3"]
        # _optimizer_step is the only place the wrapped optimizer steps: skipped there, nothing changes
        assert stage3["skip_change"] == 0.0
        assert stage3["skip_counted"] == 1
        assert "undo" in stage3["skip_calls"] and not any(isinstance(c, tuple) for c in stage3["skip_calls"])


def test_drive_stage3_step(facts):
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    assert _parameters(DeepSpeedZeroOptimizer_Stage3.step) == [("closure", None)]
    for rank in facts:
        # an overflow returns before _post_step: the targets do not step, their refreshes are undone
        calls = rank["stage3"]["overflow_calls"]
        assert calls[0] == "reduce" and calls[-2:] == ["undo", "reset"]
        assert not any(isinstance(call, tuple) for call in calls)


def test_count_micro_steps_in_backward(facts):
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    assert _parameters(DeepSpeedZeroOptimizer_Stage3.clear_backward_seen_flag) == []
    assert _parameters(DeepSpeedEngine.backward)[0][0] == "loss"
    for rank in facts:
        # two micro-batches through the module (not engine.forward): their gradients were averaged,
        # so the step matches one process's update on both micro-batches
        assert rank["stage3"]["update_error"] < ATOL


def test_stage3_module_hooks_removed(facts):
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    assert _parameters(DeepSpeedZeRoOffload._register_deepspeed_module)[0][0] == "module"
    for rank in facts:
        stage3 = rank["stage3"]
        forward, backward, module_hooks = stage3["hooks_before"]
        assert forward > 0 and backward > 0
        # the handles DeepSpeed keeps are every module hook it registered: none left inside
        assert stage3["hooks_inside"] == (0, 0, module_hooks - forward - backward)
        assert stage3["hooks_after"] == stage3["hooks_before"]
        assert torch.equal(stage3["output_inside"], stage3["output_after"])
        assert stage3["partitioned_after"]


def test_internals_the_distributors_call():
    """Not patches, but DeepSpeed methods the distributors call by name."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    assert _parameters(DeepSpeedZeroOptimizer.update_lp_params) == []
    assert _parameters(DeepSpeedZeroOptimizer_Stage3._reassign_or_swap_out_partitioned_parameters) == [
        ("sub_group_id", inspect.Parameter.empty)]
    assert _parameters(DeepSpeedZeRoOffload.partition_all_parameters) == []
