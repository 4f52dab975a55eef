"""The shared space S (docs/algorithm.md §3): the threshold-and-expand rule, and that the gradients entering
the next task's moments are orthogonal to S."""

from __future__ import annotations

import pytest
import torch

from gorp_ds.optim import GORP, extend_shared_space
from tests.support.reference_gorp import ref_extend

# ----------------------------------------------------------------------------- threshold rule


def _matrix_with_energies(energies, d, c, seed=0):
    """X = U diag(sqrt(energies)) Vᵀ (d×c) with random orthonormal U, V: ‖X‖² = sum(energies)."""
    gen = torch.Generator().manual_seed(seed)
    r = len(energies)
    u, _ = torch.linalg.qr(torch.randn(d, r, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(c, r, generator=gen))
    return u @ torch.diag(torch.tensor(energies).sqrt()) @ v.mT, u


ENERGIES = [50.0, 25.0, 12.0, 8.0, 5.0]  # total 100; cumulative 50, 75, 87, 95, 100


def _assert_orthonormal(s, atol=1e-5):
    torch.testing.assert_close(s.mT @ s, torch.eye(s.shape[1]), rtol=0, atol=atol)


def _span_equal(a, b, atol=1e-5):
    torch.testing.assert_close(a @ a.mT, b @ b.mT, rtol=0, atol=atol)


@pytest.mark.parametrize("eps_s, expected", [(0.9, 4), (0.4, 1), (0.74, 2), (0.76, 3), (0.86, 3), (0.88, 4), (0.97, 5)])
def test_count_from_empty_matches_hand_count(eps_s, expected):
    x, u = _matrix_with_energies(ENERGIES, 12, 9)
    s = extend_shared_space(None, x, eps_s)
    assert s.shape == (12, expected)
    _assert_orthonormal(s)
    _span_equal(s, u[:, :expected])


def test_nothing_added_when_existing_space_captures_enough():
    x, u = _matrix_with_energies(ENERGIES, 12, 9)
    basis = u[:, :4].contiguous()  # captures 95 % of the energy
    out = extend_shared_space(basis, x, 0.9)
    assert torch.equal(out, basis)
    # also when S is not made of singular vectors (U[:, :4] rotated): still 95 % captured
    rot, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(3)))
    basis2 = (u[:, :4] @ rot).contiguous()
    assert torch.equal(extend_shared_space(basis2, x, 0.94), basis2)
    # but 96 % is not captured: one more column is appended
    assert extend_shared_space(basis2, x, 0.96).shape == (12, 5)


def test_columns_appended_until_threshold():
    x, u = _matrix_with_energies(ENERGIES, 12, 9)
    basis = u[:, :1].contiguous()  # captures 50; residual energies 25, 12, 8, 5; need 90 - 50 = 40 -> 25+12+8
    out = extend_shared_space(basis, x, 0.9)
    assert out.shape == (12, 4)
    _assert_orthonormal(out)
    _span_equal(out, u[:, :4])
    _span_equal(out[:, :1], basis)  # the old directions are kept (QR keeps the span of the leading columns)


def test_append_with_generic_existing_space_matches_float64_rule():
    gen = torch.Generator().manual_seed(7)
    x, _ = _matrix_with_energies([40.0, 20.0, 15.0, 9.0, 7.0, 5.0, 4.0], 16, 10, seed=1)
    basis, _ = torch.linalg.qr(torch.randn(16, 2, generator=gen))
    margins = []
    expected = ref_extend(basis.double(), x.double(), 0.9, margins)
    assert min(margins) > 1e-3  # the decision is not a near-tie
    out = extend_shared_space(basis, x, 0.9)
    assert out.shape == expected.shape and out.shape[1] > 2
    _assert_orthonormal(out)
    _span_equal(out.double(), expected, atol=1e-5)
    # the captured fraction now reaches the threshold
    resid = x - out @ (out.mT @ x)
    assert 1 - resid.square().sum() / x.square().sum() >= 0.9 - 1e-6


def test_orthonormal_after_many_extensions():
    gen = torch.Generator().manual_seed(5)
    s = None
    for _ in range(6):
        x = torch.randn(20, 3, generator=gen) @ torch.randn(3, 6, generator=gen)
        s = extend_shared_space(s, x, 0.9)
        _assert_orthonormal(s)
    assert 6 <= s.shape[1] <= 19


def test_cap_at_d_minus_one_columns():
    x, _ = _matrix_with_energies([30.0, 20.0, 20.0, 15.0, 15.0], 5, 8)  # full rank d = 5
    s = extend_shared_space(None, x, 1.0)
    assert s.shape == (5, 4)
    _assert_orthonormal(s)
    # through the append path as well
    s2 = extend_shared_space(s[:, :2].contiguous(), x, 1.0)
    assert s2.shape == (5, 4)
    _assert_orthonormal(s2)
    # and an S already at the cap does not grow
    s3 = extend_shared_space(s2, torch.randn(5, 8), 1.0)
    assert s3.shape == (5, 4)
    _assert_orthonormal(s3)


def test_zero_matrix_leaves_s_unchanged():
    assert extend_shared_space(None, torch.zeros(8, 3), 0.9) is None
    basis, _ = torch.linalg.qr(torch.randn(8, 2))
    assert torch.equal(extend_shared_space(basis, torch.zeros(8, 3), 0.9), basis)


def test_threshold_zero_gives_no_s():
    x, _ = _matrix_with_energies(ENERGIES, 12, 9)
    assert extend_shared_space(None, x, 0.0) is None


def test_threshold_zero_in_optimizer_keeps_no_s():
    w = torch.nn.Parameter(torch.randn(6, 4))
    opt = GORP([{"params": [w], "names": ["w"], "role": "lora_b", "shared_threshold": 0.0}], lr=1e-2)
    w.grad = torch.randn(6, 4)
    opt.step()
    opt.end_task()
    assert opt.shared_space("w") is None


# ----------------------------------------------------------------------------- orthogonality to S

CASES = [  # name, role, shape, which side of M S lives on
    ("mlp.tall", "full", (24, 10), "rows"),  # right projection: M is m×k, S ⊂ R^m
    ("mlp.wide", "full", (10, 24), "cols"),  # left projection: M is k×n, S ⊂ R^n
    ("attn.lora_A", "lora_a", (4, 20), "cols"),  # M_A r×n, S ⊂ R^n
    ("attn.lora_B", "lora_b", (20, 4), "rows"),  # M_B m×r, S ⊂ R^m
]


def _component(s, x, side):
    return s.mT @ x if side == "rows" else x @ s


@pytest.mark.parametrize("projector", ["exact", "randomized"])
def test_next_task_moments_are_orthogonal_to_s(projector):
    torch.manual_seed(0)
    params = {name: torch.nn.Parameter(torch.randn(shape)) for name, _, shape, _ in CASES}
    groups = []
    for name, role, _, _ in CASES:
        g = {"params": [params[name]], "names": [name], "role": role}
        if role == "full":
            g.update(rank=3, update_gap=3, projector=projector)
        groups.append(g)
    opt = GORP(groups, lr=1e-2, shared_threshold=0.9)
    gen = torch.Generator().manual_seed(1)
    # task 1: gradients with a fixed low-rank structure (+ noise)
    structure = {n: (torch.randn(s[0], 3, generator=gen), torch.randn(3, s[1], generator=gen)) for n, _, s, _ in CASES}

    def task1_grad(name):
        a, b = structure[name]
        return a @ b + 0.05 * torch.randn(a.shape[0], b.shape[1], generator=gen)

    for _ in range(7):
        for name in params:
            params[name].grad = task1_grad(name)
        opt.step()
    opt.end_task()
    shared = {name: opt.shared_space(name) for name in params}
    for name, _, shape, side in CASES:
        s = shared[name]
        assert s is not None and 1 <= s.shape[1] < (shape[0] if side == "rows" else shape[1])
        _assert_orthonormal(s)
    # task 2: the same kind of gradients, which live mostly inside S, over several steps and a refresh
    for step in range(5):
        raw = {name: task1_grad(name) for name in params}
        for name in params:
            params[name].grad = raw[name].clone()
        opt.step()
        for name, role, _, side in CASES:
            s, st = shared[name], opt.state[name]
            m = st["exp_avg"]
            if role == "full":
                rows, cols = raw[name].shape
                r = raw[name] @ st["projector"] if rows >= cols else st["projector"].mT @ raw[name]
            else:
                r = raw[name]
            # the unprojected (low-rank) gradient does have a large component in S ...
            assert _component(s, r, side).norm() > 0.5 * r.norm(), name
            # ... and none of it reaches the moments (up to float32 rounding of the removed part,
            # which is ~10x the size of what is left, hence the bound relative to r)
            leak = _component(s, m, side).norm()
            assert leak <= 1e-5 * r.norm() and leak <= 1e-4 * m.norm(), f"step {step} {name}: {leak} vs {m.norm()}"
            assert m.norm() > 0


@pytest.mark.parametrize("with_basis", [False, True])
def test_threshold_one_adds_no_null_space_directions(with_basis):
    """ε_S = 1.0 is accepted by the optimizer. In exact arithmetic §3 then keeps rank(X) columns
    (plus nothing for directions X does not have). In float32 the cumulative σ² can fall short of
    ‖X‖² by rounding; ``_leading_count`` then returns *all* columns, and the extra ones are the
    arbitrary left singular vectors of σ ≈ 0, i.e. directions no task ever used, which S then
    takes away from every later task."""
    counts = []
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(32, 2, generator=gen) @ torch.randn(2, 6, generator=gen)  # rank 2
        basis = torch.linalg.qr(torch.randn(32, 1, generator=gen))[0] if with_basis else None
        s = extend_shared_space(basis, x, 1.0)
        counts.append(s.shape[1])
    assert set(counts) == {3 if with_basis else 2}, counts
