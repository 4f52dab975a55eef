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
    bits = hi.view(torch.int16).to(torch.int32)
    bits.bitwise_left_shift_(16)
    bits.add_(lo)  # int16 operand promoted on the fly: no second temporary
    return bits.view(torch.float32)


def split_(master: Tensor, hi: Tensor, lo: Tensor) -> None:
    """Write fp32 ``master`` into ``hi`` (bf16, rounded to nearest) and ``lo`` (int16) in place
    (one int32 temporary)."""
    bits = master.view(torch.int32)
    upper = bits + 0x8000
    upper.bitwise_right_shift_(16)  # arithmetic shift: the rounded upper half, sign-extended
    hi.view(torch.int16).copy_(upper)  # int32 -> int16 keeps the low 16 bits: the bf16 pattern
    upper.bitwise_left_shift_(16)
    torch.sub(bits, upper, out=upper)  # in [-0x8000, 0x7FFF]
    lo.copy_(upper)


def zero_remainder(hi: Tensor) -> Tensor:
    """The remainder of a master that equals its bf16 weight exactly."""
    return torch.zeros(hi.shape, dtype=torch.int16, device=hi.device)


def _fused_update(hi: Tensor, lo: Tensor, left: Tensor, right: Tensor, decay: Tensor, step: Tensor):
    """``split(decay · join(hi, lo) − step · left @ right)`` as new ``(hi, lo)``; written for
    ``torch.compile`` (one elementwise kernel around the GEMM; scalars as tensors so that changing
    step sizes do not recompile)."""
    bits = (hi.view(torch.int16).to(torch.int32) << 16) + lo.to(torch.int32)
    master = bits.view(torch.float32) * decay - step * (left @ right)
    out = master.view(torch.int32)
    upper = (out + 0x8000) >> 16
    return upper.to(torch.int16).view(torch.bfloat16), (out - (upper << 16)).to(torch.int16)


def update_flat_(hi: Tensor, lo: Tensor, product: Tensor, decay: float, step_size: float) -> None:
    """``master ← decay · master − step_size · product`` on a split master of any shape (a ZeRO-3
    slice), ``product`` fp32 of the same number of elements; in place, eager."""
    master = join(hi, lo)
    master.mul_(decay).sub_(product.view(master.shape), alpha=step_size)
    split_(master, hi, lo)


_compiled: dict[str, object] = {}


def update_(hi: Tensor, lo: Tensor, left: Tensor, right: Tensor, decay: float, step_size: float) -> None:
    """``master ← decay · master − step_size · left @ right`` on a split master, in place.

    On CUDA a ``torch.compile``d kernel reads ``hi``, ``lo`` and the GEMM's product once and writes
    ``hi``, ``lo`` once (~16 bytes per element); if compiling fails it falls back, once and with a
    warning, to the eager sequence (join, ``addmm_``, split: ~90 bytes per element)."""
    if hi.is_cuda and _compiled.get("fn") is not False:
        try:
            fn = _compiled.get("fn")
            if fn is None:
                fn = _compiled["fn"] = torch.compile(_fused_update, dynamic=False, fullgraph=True)
            # Filled on the device (a kernel argument, no host-to-device copy, no sync).
            decay_t = torch.full((), decay, dtype=torch.float32, device=hi.device)
            step_t = torch.full((), step_size, dtype=torch.float32, device=hi.device)
            new_hi, new_lo = fn(hi, lo, left, right, decay_t, step_t)
            hi.copy_(new_hi)
            lo.copy_(new_lo)
            return
        except Exception as err:  # noqa: BLE001 - any compiler failure: the eager path is exact too
            from ..log import get_logger

            get_logger(__name__).warning(f"fused split-master update unavailable ({type(err).__name__}: {err}); "
                                         "using the eager path")
            _compiled["fn"] = False
    master = join(hi, lo)
    master.addmm_(left, right, beta=decay, alpha=-step_size)
    split_(master, hi, lo)
