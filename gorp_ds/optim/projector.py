"""Low-rank gradient projectors for ``full`` tensors (GORP.md §2).

A weight ``W`` is ``m × n``. For ``m >= n`` the projector is ``Q`` (``n × k``, top-k right singular
vectors of the gradient) and the low-rank gradient is ``R = G Q`` (``m × k``); for ``m < n`` it is
``P`` (``m × k``, top-k left singular vectors) and ``R = Pᵀ G`` (``k × n``). Projecting on the
shorter side keeps ``R`` and the Adam moments as small as possible.

Pure tensor functions: no distributed code, no optimizer state.
"""

from __future__ import annotations

import zlib
from typing import Literal

import torch
from torch import Tensor

Side = Literal["right", "left"]
PROJECTOR_METHODS = ("randomized", "exact")


def projection_side(shape: tuple[int, int] | torch.Size) -> Side:
    """``right`` (``Q``, n×k) for tall-or-square matrices, ``left`` (``P``, m×k) for wide ones."""
    m, n = shape
    return "right" if m >= n else "left"


def projector_seed(name: str, task_index: int, refresh_index: int) -> int:
    """Seed of the random test matrix. It depends only on the module name and on counters that
    every rank holding the tensor knows, so that co-owners of a matrix compute the same projector."""
    return (zlib.crc32(name.encode()) << 24) ^ (task_index << 16) ^ refresh_index


def randomized_range_basis(
    a: Tensor, k: int, oversample: int, power_iters: int, generator: torch.Generator | None
) -> Tensor:
    """Orthonormal ``d × k`` basis approximating the top-k left singular subspace of ``a`` (``d × c``).

    Randomized subspace iteration (Halko, Martinsson, Tropp 2011, Alg. 4.4): sketch
    ``Y = A Ω`` with ``l = k + oversample`` Gaussian columns, refine with ``power_iters`` rounds of
    ``Y ← A (Aᵀ Y)`` (re-orthonormalised each half-step for stability), then rotate the sketch
    basis to singular vectors with an SVD of the small ``l × c`` matrix ``Yᵀ A``.
    """
    d, c = a.shape
    sketch = min(k + oversample, d, c)
    omega = torch.randn(c, sketch, generator=generator, device=a.device, dtype=a.dtype)
    basis, _ = torch.linalg.qr(a @ omega)  # d × l
    for _ in range(power_iters):
        back, _ = torch.linalg.qr(a.mT @ basis)  # c × l
        basis, _ = torch.linalg.qr(a @ back)  # d × l
    small = basis.mT @ a  # l × c
    u_small, _, _ = torch.linalg.svd(small, full_matrices=False)  # l × l
    return basis @ u_small[:, :k]  # d × k


def exact_basis(a: Tensor, k: int) -> Tensor:
    """Top-k left singular vectors of ``a`` by a full SVD (reference method)."""
    u, _, _ = torch.linalg.svd(a, full_matrices=False)
    return u[:, :k].contiguous()


def compute_projector(
    grad: Tensor,
    rank: int,
    method: str = "randomized",
    *,
    seed: int = 0,
    oversample: int = 8,
    power_iters: int = 2,
) -> Tensor | None:
    """The projector of an ``m × n`` fp32 gradient: ``Q`` (n×k) if ``m >= n`` else ``P`` (m×k).

    Returns ``None`` when the gradient or the decomposition is not finite, or the decomposition
    fails; the caller keeps its previous projector then (GORP.md §2).
    """
    if not bool(torch.isfinite(grad).all()):
        return None
    # Right projection needs the right singular vectors of G = left singular vectors of Gᵀ.
    a = grad.mT if projection_side(grad.shape) == "right" else grad
    try:
        if method == "exact":
            basis = exact_basis(a, rank)
        elif method == "randomized":
            generator = torch.Generator(device=a.device)
            generator.manual_seed(seed)
            basis = randomized_range_basis(a, rank, oversample, power_iters, generator)
        else:
            raise ValueError(f"unknown projector method {method!r}; expected one of {PROJECTOR_METHODS}")
    except torch.linalg.LinAlgError:
        return None
    if not bool(torch.isfinite(basis).all()):
        return None
    return basis.contiguous()


def align_basis(new: Tensor, previous: Tensor) -> Tensor:
    """The orthonormal basis of span(``new``) closest to ``previous`` (orthogonal Procrustes).

    Adam moments are kept across projector refreshes (GORP.md §2) and are expressed in the
    coordinates of the previous basis. A decomposition returns the top-k subspace with an arbitrary
    sign (and, for near-equal singular values, rotation) of each basis vector, so without alignment
    the moments' coordinates would be scrambled at refreshes, discontinuously in the gradient.
    Rotating the new basis by ``U Vᵀ`` from the SVD of the ``k × k`` matrix ``newᵀ previous`` keeps
    the subspace and makes the coordinates consistent (ours).
    """
    u, _, vh = torch.linalg.svd(new.mT @ previous)
    return new @ (u @ vh)


def project_gradient(grad: Tensor, projector: Tensor) -> Tensor:
    """Low-rank gradient: ``R = G Q`` (m×k) for right projection, ``R = Pᵀ G`` (k×n) for left."""
    if projection_side(grad.shape) == "right":
        return grad @ projector
    return projector.mT @ grad


def back_project(low_rank: Tensor, projector: Tensor, shape: tuple[int, int] | torch.Size) -> Tensor:
    """Full-size update from a low-rank one: ``U_r Qᵀ`` (right) or ``P U_r`` (left)."""
    if projection_side(shape) == "right":
        return low_rank @ projector.mT
    return projector @ low_rank
