"""An fp32 master weight stored as its bf16 model weight plus the 16 low bits (2 bytes per element).

An fp32 number is 32 bits; the bf16 weight the model computes with is its upper 16 bits, rounded.
Keeping the remainder ``lo = bits(master) − bits(hi) · 2¹⁶`` (a signed 16-bit integer, because ``hi``
is rounded to nearest: ``lo ∈ [−2¹⁵, 2¹⁵)``) makes ``(hi, lo)`` an exact, lossless encoding of the
fp32 master. So a ``full`` target's master costs 2 extra bytes per element instead of 4, the model's
bf16 weight *is* the rounded master at all times (no copy, no drift), and updates far below bf16
resolution (``lr_full`` 1e-6 at 7B) accumulate exactly as in fp32.

Rounding: ``hi`` is the master rounded to nearest bf16, ties away from zero (``+0x8000`` on the
magnitude bits), which differs from round-to-nearest-even only on exact ties.

Pure tensor functions (bit arithmetic on int32 views); callers process a matrix (or a few) at a
time so that the fp32 temporaries stay small.
"""

from __future__ import annotations

import torch
from torch import Tensor


def join(hi: Tensor, lo: Tensor) -> Tensor:
    """The fp32 master (a new tensor) from its bf16 part ``hi`` and int16 remainder ``lo``."""
    bits = (hi.view(torch.int16).to(torch.int32) << 16) + lo.to(torch.int32)
    return bits.view(torch.float32)


def split_(master: Tensor, hi: Tensor, lo: Tensor) -> None:
    """Write fp32 ``master`` into ``hi`` (bf16, rounded to nearest) and ``lo`` (int16) in place."""
    bits = master.view(torch.int32)
    upper = (bits + 0x8000) >> 16  # arithmetic shift: the rounded upper half, sign-extended
    lo.copy_(bits - (upper << 16))  # in [-0x8000, 0x7FFF]
    hi.view(torch.int16).copy_(upper)  # int32 -> int16 keeps the low 16 bits: the bf16 pattern


def zero_remainder(hi: Tensor) -> Tensor:
    """The remainder of a master that equals its bf16 weight exactly."""
    return torch.zeros(hi.shape, dtype=torch.int16, device=hi.device)
