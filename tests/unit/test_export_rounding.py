"""The bf16 value of a split fp32 master is rounded one way everywhere (ties away from zero): the
engine's weights and a LoRA merge computed for export agree bit for bit, ties included."""

from __future__ import annotations

import torch

from gorp_ds.optim.bf16_split import join, round_to_bf16, split_


def _ties(n: int, seed: int = 0) -> torch.Tensor:
    """fp32 values exactly halfway between two bf16 neighbours, of both signs, even and odd uppers."""
    upper = torch.randint(0x3C00, 0x4200, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    sign = torch.where(torch.arange(n) % 2 == 0, 0, 0x8000).to(torch.int32)
    bits = ((upper | sign) << 16) | 0x8000
    return bits.view(torch.float32)


def test_round_to_bf16_is_the_split_masters_rounding() -> None:
    values = torch.cat([_ties(256), torch.randn(4096, generator=torch.Generator().manual_seed(1)),
                        torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3.4e38, float("inf"), -float("inf")])])
    hi, lo = torch.empty(values.shape, dtype=torch.bfloat16), torch.empty(values.shape, dtype=torch.int16)
    split_(values, hi, lo)
    assert torch.equal(round_to_bf16(values).view(torch.int16), hi.view(torch.int16))
    assert torch.equal(join(hi, lo).view(torch.int32), values.view(torch.int32))  # still lossless


def test_ties_round_away_from_zero_where_to_rounds_to_even() -> None:
    ties = _ties(512)
    ours = round_to_bf16(ties).float()
    assert (ours.abs() > ties.abs()).all()  # every tie's magnitude rounded up
    # Tensor.to rounds half of them down (to even): the mismatch an export made before.
    differs = (ties.to(torch.bfloat16).view(torch.int16) != round_to_bf16(ties).view(torch.int16)).float().mean()
    assert 0.3 < differs < 0.7


def test_merged_base_weight_equals_the_merged_engine_weight_bit_for_bit() -> None:
    """The export's LoRA merge (merged_base_weight) against the engine's (merge_into_base_), on a
    bf16 base whose fp32 master sits on ties: identical bits."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from gorp_ds.models.lora import REMAINDER, lora_layers, merge_into_base_, merged_base_weight

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4)
    model = get_peft_model(LlamaForCausalLM(config).to(torch.bfloat16),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_dropout=0.0))
    (layer,) = lora_layers(model).values()
    base = layer.get_base_layer()
    masters = _ties(base.weight.numel(), seed=3).view(base.weight.shape)
    hi, lo = torch.empty_like(base.weight), torch.empty(base.weight.shape, dtype=torch.int16)
    split_(masters, hi, lo)
    base.weight.data.copy_(hi)
    base.register_buffer(REMAINDER, lo, persistent=False)
    a = torch.zeros(2, 32)  # no delta: the merged value is the master itself, every element a tie
    b = torch.zeros(32, 2)
    exported = merged_base_weight(layer, a, b)
    merge_into_base_(layer, a, b)
    assert torch.equal(exported.view(torch.int16), base.weight.data.view(torch.int16))
    assert not torch.equal(masters.to(torch.bfloat16).view(torch.int16), exported.view(torch.int16))
