"""GORP under DeepSpeed ZeRO-3 on 2 and 3 gloo ranks equals the single-process GORP (fp32, ≤ 1e-5
relative on every step), through projector refreshes (steps 0, 3, 5, 8) and a task boundary at which S is
extended and the LoRA is merged into its (partitioned, frozen) base weight; a checkpoint saved on 2 ranks
resumes on 3. Start-up refusals of ZeRO-3 settings GORP does not support are checked without DeepSpeed.

Three process groups in all (start-up dominates): 1 rank (the whole-tensor partitions of one GPU: fp32
and bf16 only); 2 ranks run every scenario and save mid-task 2; 3 ranks run every scenario and resume
from the 2-rank checkpoint.
"""

from __future__ import annotations

import json

import pytest
import torch

from gorp_ds.zero import UnsupportedSetupError, check_supported, load_ds_config
from gorp_ds.zero.layout import FlatTensor, PartitionedLayout, partition_range
from tests.support import REPO
from tests.support import zero3_scenarios as z3
from tests.support import zero_scenarios as zs
from tests.support.dist_utils import run_ranks
from tests.support.side_by_side import side_by_side

RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3")
    checkpoint = str(root / "ckpt")
    # world 3 loads what world 2 saved; world 1 is independent and runs beside them
    one, (two, three) = side_by_side(
        lambda: run_ranks(1, z3.scenarios, checkpoint, "one", out_dir=str(root / "w1")),
        lambda: (run_ranks(2, z3.scenarios, checkpoint, "save", out_dir=str(root / "w2")),
                 run_ranks(3, z3.scenarios, checkpoint, "load", out_dir=str(root / "w3"))))
    return {1: one, 2: two, 3: three}


def _max_rel_err(trajectory: dict[int, torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(float((trajectory[s] - reference[s]).norm() / reference[s].norm()) for s in trajectory)


CASES = [(world, *case) for world in (2, 3) for case in (("clip", 2, True), ("sketch", 1, True),
                                                         ("persistent", 2, True), ("flat", 2, False))]


@pytest.mark.slow
@pytest.mark.parametrize("world, scenario, gas, projected", [(1, "clip", 2, True)] + CASES)
def test_stage3_trajectory_matches_single_process(runs, world, scenario, gas, projected):
    reference = z3.reference_trajectory(world, gas, 0.3, projected=projected)
    for rank, result in enumerate(runs[world]):
        facts = result[scenario]
        assert sorted(facts["trajectory"]) == list(range(zs.STEPS))
        err = _max_rel_err(facts["trajectory"], reference)
        assert err <= RTOL, f"{scenario} world {world} rank {rank}: relative error {err:.2e}"
        assert all(facts["shared"].get(n, 0) >= 1 for n in ("lora_a", "lora_b", *zs.FULL)), facts["shared"]
    # The merge moved the frozen base weight (checked against the reference above, which merges too).
    no_merge = z3.reference_trajectory(world, gas, 0.3, projected=projected, merge=False)
    assert _max_rel_err(runs[world][0][scenario]["trajectory"], no_merge) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_stage3_partitions_every_tensor_and_each_rank_holds_its_slice(runs, world):
    for rank, result in enumerate(runs[world]):
        facts = result["clip"]
        assert all(facts["partitioned"].values()), f"a tensor is whole outside a gather: {facts['partitioned']}"
        assert not any(result["persistent"]["partitioned"].values()), "persistent tensors should stay gathered"
        shapes = dict(zip(z3.TRACKED, [p.shape for p in z3.tracked(zs.TinyNet())]))
        for name in ("lora_a", "lora_b", "norm", *zs.FULL):  # the full targets' masters are sharded too
            numel = torch.Size(shapes[name]).numel()
            assert facts["held"][name] == partition_range(numel, world, rank), (name, facts["held"][name])
        assert {"lora_a", "lora_b", "norm"} <= set(facts["cut"])


@pytest.mark.slow
def test_stage3_resume_saved_on_2_ranks_continues_on_3_ranks(runs):
    reference = z3.reference_trajectory(3, 2, 0.3)
    for rank, result in enumerate(runs[3]):
        resumed = result["resumed"]["trajectory"]
        assert sorted(resumed) == list(range(zs.SAVE_AFTER, zs.STEPS))
        assert _max_rel_err(resumed, reference) <= RTOL, f"rank {rank}"
        uninterrupted = result["clip"]["trajectory"]
        assert _max_rel_err(resumed, [uninterrupted[s] for s in range(zs.STEPS)]) <= RTOL


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3])
def test_stage3_bf16_slices_are_the_rounded_fp32_masters(runs, world):
    reference = z3.reference_trajectory(world, 2, 0.3, merge=False)
    for result in runs[world]:
        facts = result["bf16"]
        for name in zs.FULL:
            weight, master = facts["weights"][name], facts["masters"][name]
            start, end = facts["held"][name]
            assert master.dtype == torch.float32 and master.numel() == end - start
            assert torch.equal(master.bfloat16(), weight.reshape(-1)[start:end]), f"{name}: slice != rounded master"
            assert facts["remainders"][name].abs().sum() > 0, "the master never left bf16 resolution"
        err = float((facts["trajectory"][zs.STEPS - 1] - reference[-1]).norm() / reference[-1].norm())
        assert err < 2e-2, f"bf16 run drifted {err:.2e} from fp32"


def test_partitioned_layout_matches_the_stage3_slices():
    """Each tensor padded to a multiple of W and cut in W equal slices, back to back per rank."""
    layout = PartitionedLayout((FlatTensor("a", (3, 7), 0), FlatTensor("b", (1,), 7), FlatTensor("c", (5,), 8)), 3)
    assert [(p.name, p.elem_start, p.elem_end, p.local_start, p.local_end) for p in layout.pieces(2)] == [
        ("a", 14, 21, 0, 7), ("c", 4, 5, 8, 9)]  # "b" (1 element) is padding on ranks 1 and 2
    assert layout.owners() == {"a": [0, 1, 2], "b": [0], "c": [0, 1, 2]}
    assert [t.name for t in layout.cut_tensors()] == ["a", "c"]


def _stage3(**zero) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, **zero}}


@pytest.mark.parametrize("zero, field", [
    ({"offload_param": {"device": "cpu"}}, "zero_optimization.offload_param"),
    ({"offload_optimizer": {"device": "cpu"}}, "zero_optimization.offload_optimizer"),
    ({"zero_hpz_partition_size": 2}, "zero_optimization.zero_hpz_partition_size"),
    ({"zero_quantized_weights": True}, "zero_optimization.zero_quantized_weights"),
    ({"zero_quantized_nontrainable_weights": True}, "zero_optimization.zero_quantized_nontrainable_weights"),
    ({"zero_quantized_gradients": True}, "zero_optimization.zero_quantized_gradients"),
    ({"mics_shard_size": 2}, "zero_optimization.mics_shard_size"),
])
def test_unsupported_stage3_settings_are_refused_naming_the_field(zero, field):
    with pytest.raises(UnsupportedSetupError) as err:
        check_supported(_stage3(**zero), "ds.json")
    message = str(err.value)
    assert message.startswith(f"ds.json: '{field}'") and "remove" in message and "\n" not in message


def test_stage3_config_is_accepted():
    config = load_ds_config(REPO / "ds_configs" / "zero3.json")
    assert check_supported(config) == 3
    assert check_supported(_stage3(offload_param={"device": "none"})) == 3
    assert json.loads((REPO / "ds_configs" / "zero3.json").read_text())["zero_optimization"]["stage"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_stage3_step_marked_non_finite_changes_nothing(runs, world):
    """GORP.skip_next_step set before a refresh step (3): no sub-group steps and the full targets
    neither (weights bit-identical, every step counter unchanged), the skip is counted once, and the
    next step trains on from step 2's state."""
    for rank, result in enumerate(runs[world]):
        facts, uninterrupted = result["skip"], result["clip"]["trajectory"]
        assert torch.equal(facts["trajectory"][3], facts["trajectory"][2]), f"rank {rank}: the skipped step moved weights"
        assert facts["skipped_steps"] == 1
        assert facts["counters"][2] == facts["counters"][3] == [3] and facts["counters"][4] == [4], facts["counters"]
        assert torch.equal(facts["trajectory"][2], uninterrupted[2])
        assert not torch.equal(facts["trajectory"][4], uninterrupted[4])  # step 4 trained on batch 4 from step 2's state
