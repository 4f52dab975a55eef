"""Live memory of the projected-gradient path around optimizer steps of a tiny bf16 LLaMA (one process,
no DeepSpeed: the ``full`` targets' owner driven the way the ZeRO distributors drive it). Between steps no
tensor of a ``full`` target's ``m × n`` size may stay alive except its bf16 weight and int16
remainder (no fp32 copy of W, no G, no saved activations), and a step must not grow live memory."""

from __future__ import annotations

import gc

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from gorp_ds.models import TargetsConfig, build_param_groups
from gorp_ds.models.loading import enable_activation_checkpointing
from gorp_ds.optim import GORP
from gorp_ds.optim.config import OptimizerConfig
from gorp_ds.zero.lowrank_targets import LowRankTargets, claim_targets


def _live_storages() -> dict[int, int]:
    """``{data_ptr: bytes}`` of every storage a live tensor object refers to."""
    found: dict[int, int] = {}
    for obj in gc.get_objects():
        if type(obj) is torch.Tensor or type(obj) is torch.nn.Parameter:
            storage = obj.untyped_storage()
            if storage.data_ptr():
                found[storage.data_ptr()] = storage.nbytes()
    return found


def test_no_m_by_n_tensor_of_a_full_target_survives_a_step():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config.use_cache = False
    enable_activation_checkpointing(model)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    optimizer = GORP(build_param_groups(model, "gorp", TargetsConfig(), OptimizerConfig(rank=4, update_gap=2, lr_full=1e-3)))
    owned = optimizer.detach_groups("full")
    targets = LowRankTargets(optimizer, claim_targets(owned, model), rank=0, world=1, all_reduce=lambda t: None,
                             is_boundary=lambda: True, accumulation=1)
    members = targets.members
    m, n = members[0].weight.shape
    allowed = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    allowed |= {mem.remainder.untyped_storage().data_ptr() for mem in members}
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    before = [mem.weight.detach().clone() for mem in members]
    allowed |= {t.untyped_storage().data_ptr() for t in before}
    baseline = None
    for step in range(5):  # refresh steps 0, 2, 4 (sketch) and plain steps 1, 3
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()  # the LoRA groups
        targets.reduce_()
        targets.step_(0.0)
        targets.reset()
        optimizer.zero_grad(set_to_none=True)
        del loss
        gc.collect()
        live = _live_storages()
        big = {ptr: size for ptr, size in live.items() if size >= m * n * 2 and ptr not in allowed}
        assert not big, f"step {step}: {len(big)} tensors of a full target's size alive after the step: {sorted(big.values())}"
        assert all(mem.weight.grad is None and not mem.weight.requires_grad for mem in members)
        total = sum(live.values())
        if step == 1:
            baseline = total  # state of the projected Adam is complete after the first plain step
        elif baseline is not None:
            assert total <= baseline, f"step {step}: live tensor bytes grew from {baseline} to {total}"
    assert any(not torch.equal(w, mem.weight) for w, mem in zip(before, members)), "the full targets never moved"
    targets.remove()
