"""What DeepSpeed and GORP allocate, measured on one rank of a gloo group (for test_memory_model.py).

A tiny PEFT-LoRA LLaMA in bf16 (odd sizes, so that ZeRO pads: ``h = 32``, ``i = 70``, GQA with two
key/value heads, vocabulary 101) is built three times in one process group:

- ZeRO-2, plain DeepSpeed with a torch AdamW over GORP's param groups (``lora_a``, ``lora_b``, and
  ``gate_proj`` with full gradients):
  the flat bf16 groups, fp32 partitions, gradient partitions and Adam's moments.
- ZeRO-3, the same AdamW: every parameter's ``ds_tensor``, the persistent parameters kept whole,
  the fp32 partitions, gradient buffers, the reduce bucket and Adam's moments.
- ZeRO-2 through ``gorp_ds.initialize`` (projected gradients): the ``full`` targets' int16 low bits,
  the flat ``R`` buffer, their projectors and moments, the LoRA factors' moments on this rank, and
  the shared spaces S after one task (ε_S = 1: S keeps every direction of the moment, so its size is
  the worst case the model assumes) and their stacked copies in the next task's first step.

Only element counts are returned; the test compares them with ``gorp_ds.planning.memory_model``.
"""

from __future__ import annotations

import torch

LORA_RANK, K = 4, 2
PERSISTENCE = 600  # norms (32), LoRA factors (≤ 280) and k/v_proj (16 × 32 = 512) stay whole under ZeRO-3
BUCKET = 5000
STEPS = 2  # step 0 refreshes the projectors; step 1 is a plain low-rank step


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=70, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False)


def build_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config()).to(torch.bfloat16)
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0))


def ds_config(stage: int) -> dict:
    zero = {"stage": stage, "overlap_comm": stage == 2, "contiguous_gradients": True, "reduce_scatter": True,
            "reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=PERSISTENCE, stage3_prefetch_bucket_size=BUCKET)
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "steps_per_print": 10**9, "bf16": {"enabled": True}, "zero_optimization": zero,
            "zero_allow_untested_optimizer": True}


def _batch(rank: int, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 * step + rank)
    return torch.randint(0, 101, (2, 12), generator=generator)


def _train(engine, rank: int, steps: int = STEPS) -> None:
    for step in range(steps):
        ids = _batch(rank, step)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()


def _adamw_engine(stage: int):
    import deepspeed

    from gorp_ds.models import TargetsConfig, build_param_groups
    from gorp_ds.optim.config import OptimizerConfig

    model = build_model()
    groups = build_param_groups(model, "gorp", TargetsConfig(), OptimizerConfig(rank=K))  # lora_a, lora_b, gate_proj: trainable
    params = [{"params": g["params"]} for g in groups]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage))
    return engine, optimizer


def _moments(optimizer: torch.optim.Optimizer) -> int:
    return sum(st[k].numel() for st in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq") if k in st)


def zero2_adamw(rank: int) -> dict:
    engine, optimizer = _adamw_engine(2)
    zero = engine.optimizer
    facts = {"bf16_params": sum(f.numel() for f in zero.bit16_groups_flat),
             "fp32_master": sum(p.numel() for p in zero.single_partition_of_fp32_groups)}

    # The bf16 gradient partition lives only during backward: read its size as DeepSpeed fills it.
    original, seen = zero.copy_grads_in_partition, []

    def copy_grads_in_partition(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append(zero.grads_in_partition.numel())
        return result

    # The step's fp32 gradient of one group at a time.
    original_step, stepped = zero._optimizer_step, []

    def optimizer_step(group_no):
        stepped.append(zero.single_partition_of_fp32_groups[group_no].grad.numel())
        return original_step(group_no)

    zero.copy_grads_in_partition = copy_grads_in_partition
    zero._optimizer_step = optimizer_step
    _train(engine, rank)
    facts["grads_in_partition"] = max(seen, default=0)
    facts["fp32_grad_partition"] = max(stepped, default=0)
    facts["adam_moments"] = _moments(optimizer)
    engine.destroy()
    return facts


def zero3_adamw(rank: int) -> dict:
    engine, optimizer = _adamw_engine(3)
    zero = engine.optimizer
    params = list(engine.module.parameters())
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    full = [p for n, p in engine.module.named_parameters() if "gate_proj" in n]
    facts = {
        "frozen_partitions": sum(p.ds_tensor.numel() for p in frozen),
        "trainable_partitions": sum(p.ds_tensor.numel() for p in trainable),
        "lp_param_buffer": zero.lp_param_buffer.numel(),
        "full_partitions": sum(p.ds_tensor.numel() for p in full),
        "fp32_master": sum(p.numel() for p in zero.fp32_partitioned_groups_flat),
        "grad_partitions": zero.grad_partitions_flat_buffer.numel(),
        "reduce_bucket": sum(b.buffer.numel() for b in zero.ipg_buckets.values() if b.buffer is not None),
    }
    # The step's fp32 gradient of one sub-group at a time: read its size as DeepSpeed forms it.
    original, seen = zero._prepare_fp32_grad_for_sub_group, []

    def prepare(sub_group_id):
        original(sub_group_id)
        seen.append(zero.fp32_partitioned_groups_flat[sub_group_id].grad.numel())

    zero._prepare_fp32_grad_for_sub_group = prepare
    _train(engine, rank)
    facts["fp32_grad_subgroup"] = max(seen, default=0)
    # Outside forward/backward, persistent parameters stay whole and the others are released.
    facts["frozen_persistent"] = sum(p.data.numel() for p in frozen if p.ds_persist)
    facts["trainable_persistent"] = sum(p.data.numel() for p in trainable if p.ds_persist)
    facts["released"] = sum(p.data.numel() for p in params if not p.ds_persist)
    facts["adam_moments"] = _moments(optimizer)
    engine.destroy()
    return facts


def zero2_gorp(rank: int) -> dict:
    import gorp_ds
    from gorp_ds.models import TargetsConfig, build_param_groups
    from gorp_ds.optim import GORP
    from gorp_ds.optim.config import OptimizerConfig

    model = build_model()
    groups = build_param_groups(model, "gorp", TargetsConfig(), OptimizerConfig(rank=K, update_gap=2,
                                                                                  shared_threshold=1.0))
    optimizer = GORP(groups)
    config = ds_config(2)
    config.pop("zero_allow_untested_optimizer")
    engine, *_ = gorp_ds.initialize(model=model, optimizer=optimizer, config=config)
    low = engine.gorp.low_rank
    facts = {"low_bits": sum(m.remainder.numel() for m in low.members if m.remainder is not None),
             "lowrank_grad": low.flat_low_rank.numel()}
    _train(engine, rank)
    full = {m.name for m in low.members}
    named = [(n, st) for n, st in optimizer.state.items() if isinstance(n, str) and st]
    facts["lowrank_state"] = sum(st[k].numel() for n, st in named if n in full
                                 for k in ("projector", "exp_avg", "exp_avg_sq"))
    facts["failure_counters"] = sum(st["projector_failures"].numel() for n, st in named if n in full)
    facts["lora_moments"] = sum(st[k].numel() for n, st in named if n not in full for k in ("exp_avg", "exp_avg_sq"))
    optimizer.end_task()
    facts["shared_full"] = sum(s.numel() for n, s in optimizer.shared.items() if n in full)
    facts["shared_lora"] = sum(s.numel() for n, s in optimizer.shared.items() if n not in full)
    _train(engine, rank, steps=1)  # the next task's first step stacks S for the update
    stacked = [(names, stack._shared) for names, stack in optimizer._stacks.items() if stack._shared is not None]
    facts["stacked_full"] = sum(s.numel() for names, s in stacked if names[0] in full)
    facts["stacked_lora"] = sum(s.numel() for names, s in stacked if names[0] not in full)
    engine.destroy()
    return facts


def measure(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    return {"zero2_adamw": zero2_adamw(rank), "zero3_adamw": zero3_adamw(rank), "zero2_gorp": zero2_gorp(rank)}
