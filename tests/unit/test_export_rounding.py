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


def _nearest_bf16_ties_away(value: float) -> int:
    """The bf16 bit pattern nearest to fp32 ``value``, ties away from zero, found by comparing the
    two bf16 neighbours' distances in exact rational arithmetic (an independent reference)."""
    import struct
    from fractions import Fraction

    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    low = bits & 0xFFFF0000  # the neighbour towards zero (truncation)
    high = low + 0x10000  # the neighbour away from zero
    if bits == low or (bits >> 23) & 0xFF == 0xFF:  # exactly representable, or inf/nan
        return low >> 16

    def exact(pattern: int) -> Fraction:
        return Fraction(struct.unpack("<f", struct.pack("<I", pattern & 0xFFFFFFFF))[0]) if (
            (pattern >> 23) & 0xFF) != 0xFF else Fraction(2) ** 128  # rounding past the largest: infinity

    here = Fraction(value)
    below, above = abs(here - exact(low)), abs(exact(high) - here)
    return (high if above <= below else low) >> 16


def test_round_to_bf16_against_an_independent_reference() -> None:
    values = torch.cat([_ties(64), torch.randn(256, generator=torch.Generator().manual_seed(2)) * 1e3,
                        torch.tensor([1e-40, -1e-40, 3.4e38])])
    got = round_to_bf16(values).view(torch.int16).to(torch.int32) & 0xFFFF
    expected = torch.tensor([_nearest_bf16_ties_away(v) for v in values.tolist()], dtype=torch.int32)
    assert torch.equal(got, expected)


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
