"""Projectors of ``full`` tensors (docs/algorithm.md §2): the randomized range finder against the exact top-k
subspace, determinism and seeding, and robustness to non-finite gradients."""

from __future__ import annotations

import math

import pytest
import torch

from gorp_ds.optim import GORP, compute_projector, projector_seed


def low_rank_plus_noise(m, n, k, seed, noise=1e-2):
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    sigma = 10.0 * 0.9 ** torch.arange(k, dtype=torch.float32)  # decaying, strong
    signal = u @ torch.diag(sigma) @ v.mT
    g = torch.randn(m, n, generator=gen)
    return signal + noise * signal.norm() / g.norm() * g  # noise at ~1e-2 of ‖signal‖_F


def captured_energy(g, basis):
    m, n = g.shape
    return float((g @ basis).square().sum()) if m >= n else float((basis.mT @ g).square().sum())


def exact_top_k_energy(g, k):
    return float(torch.linalg.svdvals(g.double())[:k].square().sum())


@pytest.mark.parametrize("shape", [(512, 256), (256, 1024)])
@pytest.mark.parametrize("k", [4, 8, 32])
def test_randomized_captures_exact_energy(shape, k):
    m, n = shape
    g = low_rank_plus_noise(m, n, k, seed=k + m)
    basis = compute_projector(g, k, "randomized", seed=projector_seed("layers.0.mlp.gate_proj", 0, 0))
    side_dim = n if m >= n else m
    assert basis.shape == (side_dim, k) and basis.dtype == torch.float32
    torch.testing.assert_close(basis.mT @ basis, torch.eye(k), rtol=0, atol=1e-5)
    ratio = captured_energy(g, basis) / exact_top_k_energy(g, k)
    assert 0.99 <= ratio <= 1.0 + 1e-5, ratio
    # the exact method is the reference: it attains the optimum (sanity of the energy measure)
    exact = compute_projector(g, k, "exact")
    assert math.isclose(captured_energy(g, exact), exact_top_k_energy(g, k), rel_tol=1e-5)
    torch.testing.assert_close(exact.mT @ exact, torch.eye(k), rtol=0, atol=1e-5)


def test_randomized_deterministic_per_seed_and_seeds_differ():
    g = low_rank_plus_noise(96, 48, 4, seed=0, noise=0.5)  # noisy: the sketch matters
    s1 = projector_seed("model.layers.0.mlp.gate_proj", 0, 0)
    s2 = projector_seed("model.layers.1.mlp.gate_proj", 0, 0)
    assert s1 != s2
    a = compute_projector(g, 4, "randomized", seed=s1, power_iters=0)
    b = compute_projector(g, 4, "randomized", seed=s1, power_iters=0)
    c = compute_projector(g, 4, "randomized", seed=s2, power_iters=0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the seeds give different random test matrices
    def omega(seed):
        return torch.randn(48, 12, generator=torch.Generator().manual_seed(seed))
    assert not torch.allclose(omega(s1), omega(s2))


def test_projector_seed_depends_on_name_task_and_refresh():
    names = [f"model.layers.{i}.mlp.gate_proj" for i in range(32)] + ["t5.cross.q", "t5.cross.v"]
    seeds = {projector_seed(n, t, r) for n in names for t in range(4) for r in range(50)}
    assert len(seeds) == len(names) * 4 * 50
    assert all(0 <= s < 2**63 for s in seeds)  # valid for torch.Generator.manual_seed
    assert projector_seed("a", 0, 0) == projector_seed("a", 0, 0)


def test_optimizer_refreshes_use_deterministic_seeded_projectors():
    """Two optimizers on the same data compute the same randomized projectors (co-owners of a matrix
    agree), and two tensors with identical gradients but different names get different sketches."""
    def run():
        w = {n: torch.nn.Parameter(torch.zeros(40, 20)) for n in ("a.gate_proj", "b.gate_proj")}
        opt = GORP([{"params": list(w.values()), "names": list(w), "role": "full", "rank": 3, "update_gap": 2,
                     "projector": "randomized", "power_iters": 0, "oversample": 0}], lr=1e-2)
        g = low_rank_plus_noise(40, 20, 3, seed=1, noise=1.0)
        for p in w.values():
            p.grad = g.clone()
        opt.step()
        return {n: opt.state[n]["projector"].clone() for n in w}
    first, second = run(), run()
    for n in first:
        assert torch.equal(first[n], second[n])
    assert not torch.allclose(first["a.gate_proj"], first["b.gate_proj"], atol=1e-3)


# ----------------------------------------------------------------------------- non-finite gradients


def _full_opt(w, gap=3, projector="exact"):
    return GORP([{"params": [w], "names": ["mlp.gate_proj"], "role": "full", "rank": 2, "update_gap": gap,
                  "projector": projector}], lr=1e-2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("projector", ["exact", "randomized"])
@pytest.mark.parametrize("shape", [(10, 6), (6, 10)])
def test_non_finite_gradient_at_refresh_keeps_previous_projector(bad, projector, shape):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape))
    opt = _full_opt(w, gap=3, projector=projector)
    for _ in range(3):  # steps 0 (refresh), 1, 2
        w.grad = torch.randn(shape)
        opt.step()
    before = opt.state["mlp.gate_proj"]["projector"].clone()
    grad = torch.randn(shape)
    grad[1, 2] = bad
    w.grad = grad
    opt.step()  # step 3 is a refresh step: must not raise
    st = opt.state["mlp.gate_proj"]
    assert torch.equal(st["projector"], before)
    assert int(st["projector_failures"]) == 1
    assert opt.stats["projector_failures"] == 1
    assert int(st["step"]) == 4  # the step itself was taken with the old projector
    # the next refresh with a finite gradient succeeds
    for _ in range(3):
        w.grad = torch.randn(shape)
        opt.step()
    assert not torch.equal(opt.state["mlp.gate_proj"]["projector"], before)
    assert int(opt.state["mlp.gate_proj"]["projector_failures"]) == 1


@pytest.mark.parametrize("projector", ["exact", "randomized"])
def test_first_refresh_failure_skips_the_step(projector):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 5))
    opt = GORP([{"params": [w], "names": ["mlp.gate_proj"], "role": "full", "rank": 2, "update_gap": 3,
                 "projector": projector}], lr=1e-2, weight_decay=0.1)
    start = w.detach().clone()
    w.grad = torch.full((8, 5), float("nan"))
    opt.step()  # no exception
    assert torch.equal(w.detach(), start)  # skipped: no update, no weight decay
    st = opt.state["mlp.gate_proj"]
    assert "projector" not in st and int(st["step"]) == 0
    assert int(st["projector_failures"]) == 1 and opt.stats["projector_failures"] == 1
    # the next finite step proceeds as the tensor's first step
    g = torch.randn(8, 5)
    w.grad = g.clone()
    opt.step()
    assert not torch.equal(w.detach(), start)
    assert torch.isfinite(w).all()
    assert int(opt.state["mlp.gate_proj"]["step"]) == 1
    # and equals a fresh optimizer's first step on the same gradient (only the failure counter differs)
    w2 = torch.nn.Parameter(start.clone())
    opt2 = GORP([{"params": [w2], "names": ["mlp.gate_proj"], "role": "full", "rank": 2, "update_gap": 3,
                  "projector": projector}], lr=1e-2, weight_decay=0.1)
    w2.grad = g.clone()
    opt2.step()
    assert torch.equal(w.detach(), w2.detach())
