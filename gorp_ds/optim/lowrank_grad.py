"""Gradients of a ``full`` tensor's Linear formed from its activations (docs/algorithm.md §2 without ``G``).

For ``y = x Wᵀ`` with ``W`` ``m × n``, the layer's input ``X`` (``T × n``, one row per token) and
output gradient ``δ`` (``T × m``) give the weight gradient ``G = δᵀ X``. The low-rank gradient the
optimizer needs is

- right projection (``m >= n``, projector ``Q``, ``n × k``): ``R = G Q = δᵀ (X Q)``, ``m × k``;
- left projection (``m < n``, projector ``P``, ``m × k``): ``R = Pᵀ G = (δ P)ᵀ X``, ``k × n``;

at ``2·T·(m + n)·k`` flops instead of ``2·T·m·n`` for ``G``, and without an ``m × n`` buffer.
:func:`accumulate_full_gradient_` forms ``G`` itself (projector refresh steps only).

Products run in the activations' dtype (bf16 activations: bf16 operands, fp32 accumulation inside
the GEMM, one rounding of the result, like the weight gradient autograd would form) and the result
is added to an fp32 accumulator. Pure tensor functions: no distributed code, no optimizer state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .projector import Side


def accumulate_low_rank_(out: Tensor, x: Tensor, delta: Tensor, projector: Tensor, side: Side) -> None:
    """``out += R`` of one micro-batch from ``x`` (``T × n``), ``delta`` (``T × m``) and the
    projector (``n × k`` right, ``m × k`` left); ``out`` fp32, ``m × k`` or ``k × n``."""
    if x.dtype == torch.float32 and delta.dtype == torch.float32:
        if side == "right":
            out.addmm_(delta.mT, x @ projector)
        else:
            out.addmm_((delta @ projector).mT, x)
        return
    basis = projector.to(x.dtype)  # a no-op when the caller cast the projectors already
    # right: δᵀ (X Q), (m, T) @ (T, k); left: (δ P)ᵀ X, (k, T) @ (T, n)
    product = delta.mT @ (x @ basis) if side == "right" else (delta @ basis).mT @ x
    out.add_(product)  # the fp32 accumulator promotes the product in the same kernel (no .float() copy)


def accumulate_full_gradient_(out: Tensor, x: Tensor, delta: Tensor) -> None:
    """``out += G = δᵀ X`` (``m × n``, fp32) of one micro-batch."""
    if x.dtype == torch.float32 and delta.dtype == torch.float32:
        out.addmm_(delta.mT, x)
        return
    out.add_((delta.mT @ x).float())
