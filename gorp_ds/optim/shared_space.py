"""The gradient shared space S (docs/algorithm.md §3): what protects earlier tasks.

Each protected tensor has an orthonormal basis ``S`` (``d × s``) on its long side. New gradients
(or low-rank gradients) are projected off it, a stack of same-shape tensors at once; at the end of a task it is extended from the Adam
first moment by GPM's threshold-and-expand rule.

Pure tensor functions: no distributed code, no optimizer state.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

SharedSide = Literal["output", "input"]

# Which side of the tensor S lives on, per role and projection side (docs/algorithm.md §3, table).
#   full, right projection (m >= n): moment M is m × k, S on the output side (m × s)
#   full, left projection (m < n):   moment M is k × n, S on the input side  (n × s)
#   lora_a (r × n):                  S on the input side  (n × s)
#   lora_b (m × r):                  S on the output side (m × s)


def shared_side(role: str, shape: tuple[int, int] | torch.Size) -> SharedSide:
    """The side of ``S`` for a tensor of this role and shape."""
    if role == "lora_a":
        return "input"
    if role == "lora_b":
        return "output"
    if role == "full":
        m, n = shape
        return "output" if m >= n else "input"
    raise ValueError(f"role {role!r} has no shared space")


def project_off(x: Tensor, basis: Tensor | None, side: SharedSide) -> Tensor:
    """Remove from ``x`` its component in span(S), per member of a stack.

    ``side == "output"``: ``x`` is ``(B, d, c)`` with S's side as rows, result ``x − S (Sᵀ x)``.
    ``side == "input"``: ``x`` is ``(B, c, d)`` with S's side as columns, result ``x − (x S) Sᵀ``.
    ``basis`` is ``(B, d, s)``; members with smaller S are padded with zero columns
    (:func:`stack_bases`), which changes nothing: a zero column contributes zero to both products.
    2-D ``x`` and ``basis`` (one matrix) work too.
    """
    if basis is None or basis.shape[-1] == 0:
        return x
    fused = torch.baddbmm if x.dim() == 3 else torch.addmm  # x − product in one kernel
    if side == "output":
        return fused(x, basis, basis.mT @ x, alpha=-1.0)
    return fused(x, x @ basis, basis.mT, alpha=-1.0)


def stack_bases(bases: list[Tensor | None]) -> Tensor | None:
    """``(B, d, s_max)`` stack of per-member bases (``d × s_b`` or ``None``), zero-padded to the
    largest ``s_b``; ``None`` if every member's S is empty."""
    present = [b for b in bases if b is not None and b.shape[1] > 0]
    if not present:
        return None
    d, width = present[0].shape[0], max(b.shape[1] for b in present)
    stacked = present[0].new_zeros(len(bases), d, width)
    for i, b in enumerate(bases):
        if b is not None and b.shape[1] > 0:
            stacked[i, :, : b.shape[1]].copy_(b)
    return stacked


def oriented_moment(moment: Tensor, side: SharedSide) -> Tensor:
    """The moment with S's side as the row dimension (``d × c``)."""
    return moment if side == "output" else moment.mT


def _leading_count(sigma: Tensor, needed: float, shape: tuple[int, int]) -> int:
    """Smallest ``j`` with ``sum(σ[:j]²) >= needed``, never counting numerically-null directions.

    With ε_S close to 1 the float32 sum can fall just short of the target; a tolerance of 1e-6 on
    the target and a rank cut-off (σ ≤ σ_max·max(d, c)·eps) keep directions that no gradient used
    out of S."""
    if sigma.numel() == 0:
        return 0
    cutoff = float(sigma[0]) * max(shape) * torch.finfo(sigma.dtype).eps
    numerical_rank = int((sigma > cutoff).sum())
    cumulative = torch.cumsum(sigma.square(), dim=0)
    reached = torch.nonzero(cumulative >= needed * (1.0 - 1e-6))
    count = int(reached[0]) + 1 if reached.numel() else int(sigma.numel())
    return min(count, numerical_rank)


def extend_shared_space(basis: Tensor | None, x: Tensor, threshold: float) -> Tensor | None:
    """GPM's threshold-and-expand rule applied to a moment ``x`` (``d × c``, S's side as rows).

    - ``basis`` empty: keep the fewest leading left singular vectors of ``x`` whose energy reaches
      ``threshold · ‖x‖²``.
    - otherwise: if span(S) already captures that much of ``x``'s energy, nothing is added; else
      leading left singular vectors of the residual ``x − S Sᵀ x`` are appended until it does.
    The result is re-orthonormalised (QR) and capped at ``d − 1`` columns so that some plasticity is
    always left. A zero or non-finite ``x`` leaves ``basis`` unchanged. Returns ``None`` for empty.
    """
    d = x.shape[0]
    x = x.to(torch.float32)
    total = float(x.square().sum())
    if not torch.isfinite(torch.tensor(total)) or total == 0.0 or threshold <= 0.0:
        return basis
    needed = threshold * total
    if basis is None or basis.shape[1] == 0:
        u, sigma, _ = torch.linalg.svd(x, full_matrices=False)
        count = _leading_count(sigma, needed, tuple(x.shape))
        new_basis = u[:, :count]
    else:
        residual = x - basis @ (basis.mT @ x)
        captured = total - float(residual.square().sum())
        if captured >= needed:
            return basis
        u, sigma, _ = torch.linalg.svd(residual, full_matrices=False)
        count = _leading_count(sigma, needed - captured, tuple(residual.shape))
        new_basis, _ = torch.linalg.qr(torch.cat([basis, u[:, :count]], dim=1))
    new_basis = new_basis[:, : d - 1]
    return new_basis.contiguous() if new_basis.shape[1] > 0 else None
