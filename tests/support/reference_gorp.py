"""Independent float64 re-derivation of GORP, written from docs/algorithm.md (§2, §3, §4).

Used only by the tests. It deliberately imports nothing from ``gorp_ds``: projectors come from
``torch.linalg.svd`` in float64, the shared-space threshold rule and Adam are re-implemented here
from the text of the spec, so that comparing it with ``gorp_ds.optim.GORP`` is a real check and not
the code compared with itself.

Sign gauge. Singular vectors are only defined up to the sign of each column. Inside one refresh
interval the back-projected update is invariant to those signs (flipping column j of Q flips
column j of R = G Q and of M, leaves V unchanged, so column j of M̂/(√V̂+ε) flips and U_r Qᵀ is
unchanged). But GORP keeps the moments across refreshes (§2), so the *relative* sign of the new
projector's columns with respect to the old moments does change the trajectory. The spec leaves
that gauge to the SVD routine, and float32 and float64 LAPACK calls need not pick the same one.
``RefTensor.step`` therefore accepts an ``align`` callback: the test computes the reference
projector itself (float64 SVD), checks that every column equals the implementation's column up to
a sign (|cos| ≈ 1, i.e. the same top-k singular vectors in the same order) and adopts the
implementation's signs. Only this discrete gauge is taken from the implementation; everything that
is compared (subspaces, moments, parameters, S) is computed independently. S itself only enters
through S Sᵀ, which has no sign or rotation ambiguity.
"""

from __future__ import annotations

import torch

F64 = torch.float64
PROTECTED = ("lora_a", "lora_b", "full")


def svd64(a: torch.Tensor):
    return torch.linalg.svd(a.to(F64), full_matrices=False)


def ref_projector(grad: torch.Tensor, k: int) -> tuple[torch.Tensor, str]:
    """§2: Q (n×k, top-k right singular vectors) if m >= n, else P (m×k, top-k left ones)."""
    m, n = grad.shape
    u, _, vh = svd64(grad)
    if m >= n:
        return vh[:k].mT.contiguous(), "right"
    return u[:, :k].contiguous(), "left"


def align_signs(ref: torch.Tensor, impl: torch.Tensor, min_abs_cos: float = 1 - 1e-6) -> torch.Tensor:
    """Flip the columns of ``ref`` to the implementation's sign gauge, after checking that the
    columns are the same vectors up to sign (same singular vectors, same order)."""
    impl = impl.to(F64)
    assert ref.shape == impl.shape, (ref.shape, impl.shape)
    cos = (ref * impl).sum(0) / (ref.norm(dim=0) * impl.norm(dim=0))
    assert bool((cos.abs() > min_abs_cos).all()), (
        f"the implementation's projector columns are not the top-k singular vectors of G up to sign: |cos| = {cos.abs()}"
    )
    return ref * torch.sign(cos)


def ref_extend(basis: torch.Tensor | None, x: torch.Tensor, eps_s: float, margins: list | None = None):
    """§3 threshold-and-expand rule on ``x`` (d×c, S's side as rows), float64.

    ``margins`` (optional) collects, for every discrete decision taken, its distance to the
    threshold as a fraction of ‖X‖², so that a test can check that float32 and float64 cannot
    take different decisions."""
    x = x.to(F64)
    d = x.shape[0]
    total = float((x * x).sum())
    if eps_s <= 0.0 or total == 0.0:
        return basis
    needed = eps_s * total
    if basis is None:
        u, sig, _ = svd64(x)
        cum = torch.cumsum(sig**2, 0)
        count = next((i + 1 for i in range(len(cum)) if cum[i] >= needed), len(cum))
        if margins is not None:
            margins.append(float(cum[count - 1] - needed) / total)
            if count > 1:
                margins.append(float(needed - cum[count - 2]) / total)
        new = u[:, :count]
    else:
        basis = basis.to(F64)
        resid = x - basis @ (basis.mT @ x)
        captured = total - float((resid * resid).sum())
        if margins is not None:
            margins.append(abs(captured - needed) / total)
        if captured >= needed:
            return basis
        u, sig, _ = svd64(resid)
        cum = captured + torch.cumsum(sig**2, 0)
        count = next((i + 1 for i in range(len(cum)) if cum[i] >= needed), len(cum))
        if margins is not None:
            margins.append(float(cum[count - 1] - needed) / total)
            if count > 1:
                margins.append(float(needed - cum[count - 2]) / total)
        new, _ = torch.linalg.qr(torch.cat([basis, u[:, :count]], 1))
    new = new[:, : d - 1]
    return new if new.shape[1] > 0 else None


def projector_matrix(basis: torch.Tensor | None, d: int) -> torch.Tensor:
    """S Sᵀ (zero if S is empty): the gauge-free content of a shared space."""
    if basis is None:
        return torch.zeros(d, d, dtype=F64)
    b = basis.to(F64)
    return b @ b.mT


def procrustes(new: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """The orthonormal basis of span(new) closest to ``previous``: new · U Vᵀ, U Σ Vᵀ = svd(newᵀ previous).
    An addition of ours to docs/algorithm.md §2; the ``refresh_alignment="procrustes"`` variant of the reference
    applies it to check the optimizer's ``align_projector=True`` (default) mode."""
    u, _, vh = torch.linalg.svd(new.mT @ previous)
    return new @ (u @ vh)


class RefTensor:
    """One tensor under GORP, float64, written from the spec.

    ``refresh_alignment``: ``"none"`` is docs/algorithm.md §2 as written (the projector is the top-k singular
    vectors); ``"procrustes"`` rotates each refreshed projector within its span towards the previous
    one of the same task (a variant the code adopted: docs/algorithm.md §2, marked ours).

    ``refresh_phase`` (docs/algorithm.md §2.1): a ``full`` tensor refreshes at step ``t`` of a task when
    ``t == 0`` or ``t mod T == refresh_phase``; 0 is the ``cycle`` schedule (steps 0, T, 2T, …)."""

    def __init__(self, role, weight, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rank=None,
                 update_gap=None, scale=1.0, shared_threshold=0.9, refresh_alignment="none", refresh_phase=0):
        self.refresh_alignment = refresh_alignment
        self.refresh_phase = refresh_phase
        self.role = role
        self.w = weight.detach().to(F64).clone()
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.k, self.gap, self.scale, self.eps_s = rank, update_gap, scale, shared_threshold
        self.S: torch.Tensor | None = None
        self.margins: list[float] = []
        self.reset()

    def reset(self):  # §4 (3): moments, projector, step counter; S kept
        self.t = 0
        self.m = self.v = self.proj = None

    # which side S lives on (§3 table)
    def _s_side(self) -> str:
        if self.role == "lora_a":
            return "input"
        if self.role == "lora_b":
            return "output"
        rows, cols = self.w.shape
        return "output" if rows >= cols else "input"

    def _off(self, x):
        if self.S is None or self.role not in PROTECTED:
            return x
        s = self.S
        return x - s @ (s.mT @ x) if self._s_side() == "output" else x - (x @ s) @ s.mT

    def step(self, grad, align=None):
        g = grad.to(F64)
        if self.role == "full":
            rows, cols = self.w.shape
            if self.t == 0 or self.t % self.gap == self.refresh_phase:
                proj, _ = ref_projector(g, self.k)
                if self.refresh_alignment == "procrustes" and self.proj is not None:
                    self.proj = procrustes(proj, self.proj)  # gauge fixed by the previous projector
                else:
                    self.proj = align(proj) if align is not None else proj
            r = g @ self.proj if rows >= cols else self.proj.mT @ g
            r = self._off(r)
        else:
            r = self._off(g)
        self.t += 1
        if self.m is None:
            self.m, self.v = torch.zeros_like(r), torch.zeros_like(r)
        self.m = self.b1 * self.m + (1 - self.b1) * r
        self.v = self.b2 * self.v + (1 - self.b2) * r * r
        m_hat = self.m / (1 - self.b1**self.t)
        v_hat = self.v / (1 - self.b2**self.t)
        u = m_hat / (v_hat.sqrt() + self.eps)
        if self.role == "full":
            rows, cols = self.w.shape
            u = self.scale * (u @ self.proj.mT if rows >= cols else self.proj @ u)
        self.w = self.w - self.lr * u - self.lr * self.wd * self.w

    def end_task(self):
        if self.role in PROTECTED and self.m is not None and self.eps_s > 0:
            x = self.m if self._s_side() == "output" else self.m.mT
            self.S = ref_extend(self.S, x, self.eps_s, self.margins)
        self.reset()
