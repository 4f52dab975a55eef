"""An fp32 value stored as its bf16 rounding plus the 16 low bits (2 bytes per element), exactly.

An fp32 number is 32 bits; the bf16 number a model computes with is its upper 16 bits, rounded.
Keeping the remainder ``lo = bits(x) − bits(hi) · 2¹⁶`` (a signed 16-bit integer, because ``hi`` is
rounded to nearest: ``lo ∈ [−2¹⁵, 2¹⁵)``) makes ``(hi, lo)`` a lossless encoding of ``x``.

Used for the fp32 masters of trained full-rank targets (gorp_ds/zero/split_master.py) and for the
frozen base weights that LoRA merges accumulate into (gorp_ds/models/lora.py): the bf16 weight is
the rounded fp32 value at all times, and repeated additions accumulate exactly as in fp32.

Rounding: ``hi`` is ``x`` rounded to nearest bf16, ties away from zero (``+0x8000`` on the
magnitude bits), which differs from round-to-nearest-even only on exact ties. It cannot be
round-to-nearest-even: at a tie, the remainder would be +2¹⁵ or −2¹⁵ with the same (even) ``hi``, and
an int16 holds only one of them. Every bf16 value that stands for such a master (the model's weight,
an export of it) is therefore rounded by :func:`round_to_bf16`, this module's rounding, never by
``Tensor.to(torch.bfloat16)`` (ties to even).

Pure tensor functions (bit arithmetic on int32 views).
"""

from __future__ import annotations

import torch
from torch import Tensor


def join(hi: Tensor, lo: Tensor) -> Tensor:
    """The fp32 value (a new tensor) from its bf16 part ``hi`` and int16 remainder ``lo``."""
    bits = hi.view(torch.int16).to(torch.int32)
    bits.bitwise_left_shift_(16)
    bits.add_(lo)  # int16 operand promoted on the fly: no second temporary
    return bits.view(torch.float32)


def _rounded_upper(bits: Tensor) -> Tensor:
    """The upper 16 bits of fp32 ``bits`` (an int32 view) rounded to nearest, ties away from zero,
    sign-extended in a new int32 tensor."""
    upper = bits + 0x8000
    upper.bitwise_right_shift_(16)  # arithmetic shift
    return upper


def round_to_bf16(value: Tensor) -> Tensor:
    """fp32 ``value`` rounded to bf16 as :func:`split_` rounds it (a new tensor): the bf16 weight
    that a master of this value has."""
    return _rounded_upper(value.float().contiguous().view(torch.int32)).to(torch.int16).view(torch.bfloat16)


def split_(master: Tensor, hi: Tensor, lo: Tensor) -> None:
    """Write fp32 ``master`` into ``hi`` (bf16, rounded to nearest) and ``lo`` (int16) in place
    (one int32 temporary)."""
    bits = master.view(torch.int32)
    upper = _rounded_upper(bits)
    hi.view(torch.int16).copy_(upper)  # int32 -> int16 keeps the low 16 bits: the bf16 pattern
    upper.bitwise_left_shift_(16)
    torch.sub(bits, upper, out=upper)  # in [-0x8000, 0x7FFF]
    lo.copy_(upper)


def zero_remainder(hi: Tensor) -> Tensor:
    """The remainder of a value that equals its bf16 part exactly."""
    return torch.zeros(hi.shape, dtype=torch.int16, device=hi.device)
