"""Low-rank gradient projectors for ``full`` tensors (docs/algorithm.md §2), over stacks of same-shape matrices.

A weight ``W`` is ``m × n``. For ``m >= n`` the projector is ``Q`` (``n × k``, top-k right singular
vectors of the gradient) and the low-rank gradient is ``R = G Q`` (``m × k``); for ``m < n`` it is
``P`` (``m × k``, top-k left singular vectors) and ``R = Pᵀ G`` (``k × n``). Projecting on the
shorter side keeps ``R`` and the Adam moments as small as possible.

Every function takes a stack: ``B`` matrices of one shape as a ``(B, m, n)`` tensor (a single matrix
is ``B = 1``; the matmul-based helpers also accept plain 2-D tensors). Members of a stack never mix:
a non-finite gradient in one member leaves the others' results as if it were absent.

Pure tensor functions: no distributed code, no optimizer state, no host-device synchronisation
except inside torch's own error checks of ``eigh``/``svd`` (refresh steps only).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Side = Literal["right", "left"]
PROJECTOR_METHODS = ("randomized", "exact")
# Sketch directions whose squared norm falls below this fraction of the largest one are dropped
# (zeroed) by the orthonormalisation; the Gram matrices are formed in float64, so directions down
# to ~1e-6 of the largest singular value survive with orthonormality error ~1e-10.
_DROP = 1e-12


@dataclass(frozen=True)
class GradientProducts:
    """A ``(B, m, n)`` gradient stack known through products only: ``apply(v)`` = ``G v``
    (``(B, n, l)`` → ``(B, m, l)``), ``apply_t(u)`` = ``Gᵀ u`` (``(B, m, l)`` → ``(B, n, l)``)."""

    apply: Callable[[Tensor], Tensor]
    apply_t: Callable[[Tensor], Tensor]
    device: torch.device


def projection_side(shape: tuple[int, ...] | torch.Size) -> Side:
    """``right`` (``Q``, n×k) for tall-or-square matrices, ``left`` (``P``, m×k) for wide ones.
    ``shape`` may carry leading batch dimensions."""
    m, n = shape[-2:]
    return "right" if m >= n else "left"


def projector_seed(name: str, task_index: int, refresh_index: int) -> int:
    """Seed of the random test matrix. It depends only on the module name and on counters that
    every rank holding the tensor knows, so that co-owners of a matrix compute the same projector."""
    return (zlib.crc32(name.encode()) << 24) ^ (task_index << 16) ^ refresh_index


def finite_members(x: Tensor) -> Tensor:
    """``(B,)`` bool: which members of a ``(B, …)`` stack are entirely finite (on the device)."""
    return torch.isfinite(x).flatten(1).all(1)


def orthonormalize(y: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormal basis of the column span of each ``(d, l)`` member of ``y`` (``(B, d, l)``, fp32),
    and which members were finite.

    Batched and synchronisation-free, unlike a Householder QR (which GPUs run one small matrix at a
    time): the ``l × l`` Gram matrix ``YᵀY = V Λ Vᵀ`` is decomposed in float64 and
    ``Y V Λ^{-1/2}`` is formed twice (the second pass removes the first's rounding). Directions with
    ``λ ≤ 1e-12 λ_max`` are zeroed instead of being blown up, so a rank-deficient member gets zero
    columns, not noise. Non-finite members are computed on zeros (their result is discarded by the
    caller) so that they cannot make the batched decomposition fail for the others.
    """
    finite = finite_members(y)
    basis = torch.where(finite[:, None, None], y, 0.0).double()
    for _ in range(2):
        gram = basis.mT @ basis  # (B, l, l)
        eigenvalues, vectors = torch.linalg.eigh(gram)
        keep = eigenvalues > _DROP * eigenvalues[:, -1:].clamp_min(torch.finfo(torch.float64).tiny)
        scale = torch.where(keep, eigenvalues.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), 0.0)
        basis = basis @ (vectors * scale[:, None, :])  # (B, d, l); only the span matters to callers
    return basis.to(y.dtype), finite


def _top_left_vectors(small: Tensor, k: int) -> Tensor:
    """Top-k left singular vectors (``(B, l, k)``) of each ``(l, c)`` member of ``small``, from the
    float64 eigendecomposition of ``small smallᵀ`` (an ``l × l`` problem, batched on the device)."""
    s64 = small.double()
    _, vectors = torch.linalg.eigh(s64 @ s64.mT)  # ascending
    return vectors.flip(-1)[..., :k].to(small.dtype)


def randomized_range_basis(a: Tensor, k: int, oversample: int, power_iters: int, seeds: Sequence[int]) -> Tensor:
    """Orthonormal ``(B, d, k)`` bases approximating the top-k left singular subspace of each
    ``(d, c)`` member of ``a`` (``(B, d, c)``); member ``b`` draws its test matrix from ``seeds[b]``.

    Randomized subspace iteration (Halko, Martinsson, Tropp 2011, Alg. 4.4): sketch ``Y = A Ω`` with
    ``l = k + oversample`` Gaussian columns, refine with ``power_iters`` rounds of ``Y ← A (Aᵀ Y)``
    (re-orthonormalised each half-step for stability), then rotate the sketch basis to singular
    vectors (Rayleigh–Ritz on ``Yᵀ A``). Non-finite members give non-finite or zero bases.
    """
    batch, d, c = a.shape
    return randomized_range_basis_op(lambda v: a @ v, lambda u: a.mT @ u, (batch, d, c), k, oversample, power_iters,
                                     seeds, a.device, a.dtype)


def randomized_range_basis_op(apply: Callable[[Tensor], Tensor], apply_t: Callable[[Tensor], Tensor],
                              shape: tuple[int, int, int], k: int, oversample: int, power_iters: int,
                              seeds: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor:
    """:func:`randomized_range_basis` of a matrix known only through its products: ``apply(v)`` is
    ``A v`` (``(B, c, l)`` → ``(B, d, l)``), ``apply_t(u)`` is ``Aᵀ u``. The algorithm touches ``A``
    only through ``2 + 2·power_iters`` such thin products, so ``A`` never has to exist (e.g. a
    gradient ``δᵀ X`` applied through its activations, each product summed over ranks)."""
    batch, d, c = shape
    sketch = min(k + oversample, d, c)
    omegas = []
    for seed in seeds:  # one generator per member: the same projector on every rank that holds it
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))
        omegas.append(torch.randn(c, sketch, generator=generator, device=device, dtype=dtype))
    omega = torch.stack(omegas) if batch > 1 else omegas[0].unsqueeze(0)  # (B, c, l)
    basis, finite = orthonormalize(apply(omega))  # (B, d, l)
    for _ in range(power_iters):
        back, ok = orthonormalize(apply_t(basis))  # (B, c, l)
        basis, ok2 = orthonormalize(apply(back))  # (B, d, l)
        finite = finite & ok & ok2
    small = apply_t(basis).mT  # (B, l, c) = Yᵀ A
    finite = finite & finite_members(small)
    small = torch.where(finite[:, None, None], small, 0.0)
    result = basis @ _top_left_vectors(small, k)  # (B, d, k)
    return torch.where(finite[:, None, None], canonical_signs(result), float("nan"))


def canonical_signs(basis: Tensor) -> Tensor:
    """Flip each column so that its largest-magnitude entry is positive. The sketch's own basis is
    only defined up to a rotation (the orthonormalisation picks one by rounding), so without a
    fixed gauge the signs of the returned singular vectors would depend on rounding noise."""
    pivot = basis.abs().argmax(dim=-2, keepdim=True)  # (B, 1, k)
    signs = torch.where(basis.gather(-2, pivot) < 0, -1.0, 1.0)
    return basis * signs


def exact_basis(a: Tensor, k: int) -> Tensor:
    """Top-k left singular vectors of each member of ``a`` (``(B, d, c)``) by a full SVD
    (reference method). Non-finite members give NaN bases."""
    finite = finite_members(a)
    u, _, _ = torch.linalg.svd(torch.where(finite[:, None, None], a, 0.0), full_matrices=False)
    return torch.where(finite[:, None, None], u[..., :k], float("nan"))


def compute_projectors(
    grads: Tensor,
    rank: int,
    projector: str = "randomized",
    *,
    seeds: Sequence[int] | None = None,
    oversample: int = 8,
    power_iters: int = 2,
) -> tuple[Tensor, Tensor]:
    """Projectors of a ``(B, m, n)`` fp32 gradient stack: ``Q`` (``(B, n, k)``) if ``m >= n`` else
    ``P`` (``(B, m, k)``), and a ``(B,)`` bool tensor saying which members succeeded. A member whose
    gradient or decomposition is not finite is marked failed (its projector is garbage; the caller
    keeps the previous one, docs/algorithm.md §2). Nothing is read back to the host; a decomposition that
    raises fails every member."""
    batch = grads.shape[0]
    # Right projection needs the right singular vectors of G = left singular vectors of Gᵀ.
    a = grads.mT if projection_side(grads.shape) == "right" else grads  # (B, d, c)
    if projector not in PROJECTOR_METHODS:
        raise ValueError(f"unknown projector method {projector!r}; expected one of {PROJECTOR_METHODS}")
    try:
        if projector == "exact":
            basis = exact_basis(a, rank)
        else:
            basis = randomized_range_basis(a, rank, oversample, power_iters, seeds if seeds is not None else [0] * batch)
    except torch.linalg.LinAlgError:
        nan = torch.full((batch, a.shape[1], rank), float("nan"), dtype=grads.dtype, device=grads.device)
        return nan, torch.zeros(batch, dtype=torch.bool, device=grads.device)
    return basis.contiguous(), finite_members(basis)


def compute_projectors_op(apply: Callable[[Tensor], Tensor], apply_t: Callable[[Tensor], Tensor],
                          shape: tuple[int, int, int], rank: int, *, seeds: Sequence[int], oversample: int = 8,
                          power_iters: int = 2, device: torch.device, dtype: torch.dtype = torch.float32
                          ) -> tuple[Tensor, Tensor]:
    """:func:`compute_projectors` (randomized) of a ``(B, m, n)`` gradient stack known only through
    products: ``apply(v)`` = ``G v`` (``(B, n, l)`` → ``(B, m, l)``), ``apply_t(u)`` = ``Gᵀ u``."""
    batch, m, n = shape
    if projection_side((m, n)) == "right":  # a = Gᵀ: A v = Gᵀ v, Aᵀ u = G u
        a_apply, a_apply_t, a_shape = apply_t, apply, (batch, n, m)
    else:
        a_apply, a_apply_t, a_shape = apply, apply_t, (batch, m, n)
    try:
        basis = randomized_range_basis_op(a_apply, a_apply_t, a_shape, rank, oversample, power_iters, seeds, device, dtype)
    except torch.linalg.LinAlgError:
        nan = torch.full((batch, a_shape[1], rank), float("nan"), dtype=dtype, device=device)
        return nan, torch.zeros(batch, dtype=torch.bool, device=device)
    return basis.contiguous(), finite_members(basis)


def compute_projector(grad: Tensor, rank: int, projector: str = "randomized", *, seed: int = 0,
                      oversample: int = 8, power_iters: int = 2) -> Tensor | None:
    """One matrix (``B = 1`` of :func:`compute_projectors`), ``None`` on failure. Reads the success
    flag back to the host: for tests and benchmarks, not for the optimizer's step."""
    basis, ok = compute_projectors(grad.unsqueeze(0), rank, projector, seeds=[seed], oversample=oversample,
                                   power_iters=power_iters)
    return basis[0] if bool(ok[0]) else None


def align_basis(new: Tensor, previous: Tensor) -> Tensor:
    """The orthonormal basis of span(``new``) closest to ``previous`` (orthogonal Procrustes), per member.

    Adam moments are kept across projector refreshes (docs/algorithm.md §2) and are expressed in the
    coordinates of the previous basis. A decomposition returns the top-k subspace with an arbitrary
    sign (and, for near-equal singular values, rotation) of each basis vector, so without alignment
    the moments' coordinates would be scrambled at refreshes, discontinuously in the gradient.
    Rotating the new basis by ``U Vᵀ`` from the SVD of the ``k × k`` matrix ``newᵀ previous`` keeps
    the subspace and makes the coordinates consistent (ours). Non-finite members of ``new`` must
    have been replaced by finite values by the caller (they would make the batched SVD fail).
    """
    u, _, vh = torch.linalg.svd(new.mT @ previous)
    return new @ (u @ vh)


def project_gradient(grad: Tensor, projector: Tensor) -> Tensor:
    """Low-rank gradient: ``R = G Q`` (m×k) for right projection, ``R = Pᵀ G`` (k×n) for left."""
    if projection_side(grad.shape) == "right":
        return grad @ projector
    return projector.mT @ grad


def back_project(low_rank: Tensor, projector: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """Full-size update from a low-rank one: ``U_r Qᵀ`` (right) or ``P U_r`` (left)."""
    if projection_side(shape) == "right":
        return low_rank @ projector.mT
    return projector @ low_rank
