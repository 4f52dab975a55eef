"""The weight update of every GORP path, written once: ``W ← decay · W − step_size · U``.

``decay = 1 − lr·wd`` is AdamW's decoupled weight decay, applied before the step; ``U`` is the
step's direction (Adam's ``M̂ / (√V̂ + ε)``, or a ``full`` tensor's back-projected low-rank update).
Every path that changes a weight calls :func:`weight_update`: the foreach lists of ``plain`` and
``lora_*`` tensors (whole or ZeRO slices), the low-rank products of ``full`` tensors, and the split
fp32 masters of the ZeRO layer (eager, and inside its compiled fused kernel). The variants differ
only in the kernel that evaluates the formula, picked from the operands:

- a list of tensors (any shapes) and a list ``U``: ``_foreach_mul_``, ``_foreach_add_``;
- a list and ``Quotient(M, D)`` (``U = M / D``, Adam): ``_foreach_mul_``, ``_foreach_addcdiv_``;
- an ``(m, n)`` or ``(B, m, n)`` tensor and ``Product(left, right)`` (``U = left @ right``): one
  ``addmm_`` / ``baddbmm_``;
- a tensor and a tensor ``U`` with float scalars: ``mul_``, ``add_`` in place; with 0-d tensor
  scalars (compiled kernels): out of place.

Lists and stacks stay batched (one multi-tensor or batched kernel per call); the product form never
materialises the dense ``U`` (the decay rides along as the GEMM's ``beta``); the out-of-place form
lets the compiler fuse the update with the split master's join and split into one kernel. So sharing
the formula costs no path a kernel or a byte of memory traffic.

Pure tensor function: no distributed code, no optimizer state, no host-device synchronisation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

Scalar = float | Tensor  # a Python float, or a 0-d fp32 tensor (compiled callers: no recompiles)


class Product(NamedTuple):
    """``U = left @ right``: ``left`` ``(m, k)`` / ``(B, m, k)``, ``right`` ``(k, n)`` / ``(B, k, n)``."""

    left: Tensor
    right: Tensor


class Quotient(NamedTuple):
    """``U = numerators / denominators`` elementwise, per list entry (Adam's normalised moment)."""

    numerators: list[Tensor]
    denominators: list[Tensor]


Update = Tensor | list[Tensor] | Product | Quotient


def weight_update(weights: Tensor | list[Tensor], update: Update, decay: Scalar,
                  step_size: Scalar) -> Tensor | list[Tensor]:
    """``W ← decay · W − step_size · U``; returns the updated weights.

    In place on ``weights`` (fp32 arithmetic in the caller's dtype), except with 0-d tensor scalars,
    where it returns a new tensor: the form a compiled kernel wants (the compiler turns it into the
    kernel's stores). A float ``decay`` of exactly 1 (no weight decay) skips the multiplication,
    which would change nothing."""
    if isinstance(weights, list):  # foreach: one multi-tensor kernel per op, any shapes
        if isinstance(decay, Tensor) or decay != 1.0:
            torch._foreach_mul_(weights, decay)
        if isinstance(update, Quotient):
            torch._foreach_addcdiv_(weights, update.numerators, update.denominators, value=-step_size)
        else:
            torch._foreach_add_(weights, update, alpha=-step_size)
        return weights
    if isinstance(update, Product):  # one GEMM, the decay as beta: no dense (…, m, n) temporary
        gemm = weights.addmm_ if weights.dim() == 2 else weights.baddbmm_
        return gemm(update.left, update.right, beta=decay, alpha=-step_size)
    if isinstance(decay, Tensor):
        return weights * decay - step_size * update
    if decay != 1.0:
        weights.mul_(decay)
    return weights.add_(update, alpha=-step_size)
