"""The per-GPU memory model (gorp_ds/planning/memory_model.py) against what DeepSpeed and GORP allocate.

Measured on 1, 2 and 3 gloo ranks (one process group each; every group builds a ZeRO-2 AdamW engine,
a ZeRO-3 AdamW engine and a ZeRO-2 GORP engine: tests/support/memory_scenarios.py) on a tiny bf16 LLaMA whose
sizes make ZeRO pad. Every state and partition size must equal the model's prediction exactly, on
every rank: DeepSpeed's padding rules (a ZeRO-2 group padded to a multiple of 2·W, a ZeRO-3 parameter to
a multiple of W), persistence under ZeRO-3, which LoRA tensors touch a ZeRO-2 partition (GORP keeps
their whole moments and S there), and GORP's own state (int16 low bits, R, projectors, moments, S).
Activations are not measured here (bench/zero_gorp.py compares the peak on a GPU).
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from gorp_ds.planning import memory_model as mm
from tests.support import memory_scenarios as ms
from tests.support.dist_utils import run_ranks
from tests.support.side_by_side import side_by_side

WORLDS = (1, 2, 3)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory_model")
    # independent groups (each measures its own ranks' partitions), two at a time
    results = side_by_side(*(lambda w=w: run_ranks(w, ms.measure, out_dir=str(root / f"w{w}")) for w in WORLDS))
    return dict(zip(WORLDS, results))


def _shape() -> mm.ModelShape:
    return mm.ModelShape.from_config(ms.llama_config(), "tiny")


def _zero(stage: int, world: int) -> mm.ZeroShape:
    return mm.ZeroShape.from_ds_config(ms.ds_config(stage), world)


def _predict(stage: int, world: int, rank: int, optimizer: str, tasks: int = 0) -> mm.Prediction:
    gorp = mm.GorpShape(lora_rank=ms.LORA_RANK, rank=ms.K, optimizer=optimizer, tasks=tasks)
    return mm.predict(_shape(), gorp, _zero(stage, world), mm.RunShape(2, 12), rank)


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_zero2_deepspeed_partitions_match(measured, world):
    for rank, facts in enumerate(measured[world]):
        got, p = facts["zero2_adamw"], _predict(2, world, rank, "adamw")
        assert got == {"bf16_params": p.numel("ds.bf16_params"), "fp32_master": p.numel("ds.fp32_master"),
                       "grads_in_partition": p.numel("ds.grads_in_partition"),
                       "fp32_grad_partition": p.numel("ds.fp32_grad_partition"),
                       "adam_moments": p.numel("optimizer.adam_moments")}, f"world {world} rank {rank}"


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_zero3_deepspeed_partitions_match(measured, world):
    for rank, facts in enumerate(measured[world]):
        got, p = facts["zero3_adamw"], _predict(3, world, rank, "adamw")
        expected = {
            "frozen_partitions": p.numel("weights.frozen"), "frozen_persistent": p.numel("weights.frozen.persistent"),
            "trainable_partitions": p.numel("ds.bf16_params"), "lp_param_buffer": p.numel("ds.bf16_params"),
            "trainable_persistent": p.numel("ds.bf16_params.persistent"),
            "full_partitions": sum(mm.stage3_partition(s.numel, world) for s in mm.tensor_specs(_shape(), mm.GorpShape())
                                   if s.kind == "full"),
            "released": 0, "fp32_master": p.numel("ds.fp32_master"), "grad_partitions": p.numel("ds.grad_partitions"),
            "reduce_bucket": p.numel("ds.reduce_bucket"), "fp32_grad_subgroup": p.numel("ds.fp32_grad_subgroup"),
            "adam_moments": p.numel("optimizer.adam_moments"),
        }
        assert got == expected, f"world {world} rank {rank}"


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_zero2_gorp_state_matches(measured, world):
    for rank, facts in enumerate(measured[world]):
        got = facts["zero2_gorp"]
        p = _predict(2, world, rank, "gorp")
        after_task = _predict(2, world, rank, "gorp", tasks=1)  # S once a task ended (ε_S = 1: worst case)
        assert got == {"low_bits": p.numel("full.low_bits"), "lowrank_grad": p.numel("full.lowrank_grad"),
                       "lowrank_state": p.numel("full.lowrank_state"),
                       "failure_counters": p.numel("full.failure_counters"),
                       "lora_moments": p.numel("lora.adam_moments"),
                       "shared_full": after_task.numel("shared.full"),
                       "shared_lora": after_task.numel("shared.lora"),
                       "stacked_full": after_task.numel("shared.full.stacked"),
                       "stacked_lora": after_task.numel("shared.lora.stacked")}, f"world {world} rank {rank}"


@pytest.mark.slow
def test_ranks_differ_where_the_model_says(measured):
    """On 3 ranks the ZeRO-2 partitions cut different LoRA tensors: the model's per-rank numbers are
    not all equal, and the measured ones follow them (guards against a model constant in the rank)."""
    lora = [f["zero2_gorp"]["lora_moments"] for f in measured[3]]
    assert len(set(lora)) > 1
    assert lora == [_predict(2, 3, r, "gorp").numel("lora.adam_moments") for r in range(3)]


def test_padding_rules_by_hand():
    # A ZeRO-2 group of 5 + 6 elements on 3 ranks: padded to 12 (a multiple of 2·3), partitions of 4.
    assert mm.stage2_group([5, 6], 3) == (4, [0, 5])
    assert [mm.stage2_touching([5, 6], 3, r) for r in range(3)] == [[0], [0, 1], [1]]
    assert [mm.stage3_partition(n, 3) for n in (9, 10, 11)] == [3, 4, 4]
    assert mm.sub_groups([4, 4, 4], 8) == [8, 4]


def test_llama2_7b_parameter_count():
    """The 7B shape's inventory is LLaMA-2-7B's 6,738,415,616 parameters plus LoRA r=8 on q and v
    (32 layers · 2 modules · 2 · 8 · 4096)."""
    specs = mm.tensor_specs(mm.MODELS["7b"], mm.GorpShape())
    base = sum(s.numel for s in specs if s.kind in ("frozen", "full"))
    assert base == 6_738_415_616
    assert sum(s.numel for s in specs if s.kind.startswith("lora")) == 32 * 2 * 2 * 8 * 4096


def test_inventory_matches_the_peft_model():
    """Names, shapes and order of the tiny model's parameters (PEFT adds ``.base_layer`` and
    ``.default``; canonical names drop them)."""
    from gorp_ds.models.lora import canonical_name

    model = ms.build_model()
    actual = [(canonical_name(n), tuple(p.shape)) for n, p in model.named_parameters()]
    specs = [(s.name, s.shape) for s in mm.tensor_specs(_shape(), mm.GorpShape(lora_rank=ms.LORA_RANK))]
    assert actual == specs


def test_stage3_shards_what_stage2_replicates():
    """At 70B on 64 GPUs: ZeRO-3 divides the weights and the full targets' low bits by the world size;
    ZeRO-2 holds them whole (70B does not fit, 130 GB of bf16 weights per GPU)."""
    gorp, run, model = mm.GorpShape(), mm.RunShape(), mm.MODELS["70b"]
    two = mm.worst_rank(model, gorp, mm.ZeroShape(2, 64), run)
    three = mm.worst_rank(model, gorp, mm.ZeroShape(3, 64), run)
    specs = mm.tensor_specs(model, gorp)
    assert two.bytes_of("weights") == 2 * sum(s.numel for s in specs if s.kind in ("frozen", "full"))
    assert three.numel("weights.frozen") == sum(math.ceil(s.numel / 64) for s in specs if s.kind == "frozen")
    assert three.numel("weights.full_targets") == sum(math.ceil(s.numel / 64) for s in specs if s.kind == "full")
    assert three.numel("full.low_bits") == three.numel("weights.full_targets")
    assert two.numel("full.low_bits") == sum(s.numel for s in specs if s.kind == "full")
    assert two.peak > 80e9 > three.peak


def test_cli_prints_a_table_and_refuses_bad_flags():
    run = [sys.executable, "-m", "gorp_ds.planning.memory_model"]
    done = subprocess.run(run + ["--model", "13b", "--world", "8,16", "--stage", "2,3", "--markdown"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| LLaMA-2-13B")]
    assert len(rows) == 4
    bad = subprocess.run(run + ["--world", "eight"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("gorp_ds: error: --world 'eight'")


def test_ds_config_values_must_be_numbers():
    with pytest.raises(ValueError, match="zero_optimization.reduce_bucket_size is 'auto'"):
        mm.ZeroShape.from_ds_config({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, 8)
    zero = mm.ZeroShape.from_ds_config({"zero_optimization": {"stage": 3, "reduce_bucket_size": 5e8}}, 8)
    assert (zero.reduce_bucket_size, zero.overlap_comm) == (500_000_000, True)
