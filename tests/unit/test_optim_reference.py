"""GORP (float32) against the independent float64 re-derivation in ``reference_gorp.py``.

Three tasks with ``end_task()`` between them, projector refreshes every T = 4 steps on tasks of 10
steps (T does not divide the task length, so each task ends mid-interval), full tensors in both
orientations (tall m >= n: right projection, S on the output side; wide m < n: left projection,
S on the input side), LoRA A and B, non-zero weight decay and scale != 1, ``projector="exact"``.

Gradients are synthetic and fed through ``.grad`` so that both sides see bit-identical inputs and
so that their spectra are controlled: each task has its own dominant singular structure with
well-separated singular values (ratio >= 1.5 between consecutive ones around k) plus small noise,
so the top-k singular vectors, their order, and the S threshold decisions are all well defined and
float32 and float64 agree on them (the latter is asserted through ``RefTensor.margins``).
Singular-vector signs: see the module docstring of ``reference_gorp``.
"""

from __future__ import annotations

import pytest
import torch

from gorp_ds.optim import GORP
from tests.support.reference_gorp import F64, RefTensor, align_signs, projector_matrix

TASKS, STEPS, GAP, RANK = 3, 10, 4, 3
SIGMAS = torch.tensor([6.0, 4.0, 2.6, 1.2, 0.7, 0.45, 0.3, 0.2, 0.12, 0.08, 0.05, 0.03])


def _orth(n, gen):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    return q


class SyntheticGrads:
    """Per tensor and task, a fixed dominant structure U diag(σ) Vᵀ; per step, small noise."""

    def __init__(self, shapes: dict[str, tuple[int, int]], seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.shapes = shapes
        self.base: dict[str, torch.Tensor] = {}
        self.prev_u: dict[str, torch.Tensor] = {}

    def new_task(self):
        for name, (m, n) in self.shapes.items():
            u = _orth(m, self.gen)
            if name in self.prev_u:  # overlap with the previous task's dominant directions
                u, _ = torch.linalg.qr(self.prev_u[name] + 0.8 * u)
            self.prev_u[name] = u
            v = _orth(n, self.gen)
            c = min(m, n)
            self.base[name] = u[:, :c] @ torch.diag(SIGMAS[:c]) @ v[:, :c].mT

    def grad(self, name):
        b = self.base[name]
        return b + 0.02 * torch.randn(b.shape, generator=self.gen)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("refresh_alignment", ["none", "procrustes"], ids=["as-written", "procrustes-variant"])
def test_gorp_matches_float64_reference_over_three_tasks(seed, refresh_alignment):
    """``as-written``: docs/algorithm.md as written (``align_projector=False``). ``procrustes-variant``: refreshed
    projectors are rotated within their span towards the previous one (``align_projector=True``,
    the default, ours); the reference implements that rotation independently."""
    torch.manual_seed(seed)
    shapes = {"tall.gate_proj": (20, 10), "wide.gate_proj": (10, 24), "q.lora_A": (4, 16), "q.lora_B": (14, 4)}
    params = {name: torch.randn(shape) for name, shape in shapes.items()}
    params["q.lora_B"].mul_(0.1)
    params = {k: torch.nn.Parameter(v) for k, v in params.items()}
    wd, scale, lr_full, lr_lora, betas = 0.05, 0.5, 2e-2, 1e-2, (0.9, 0.99)
    opt = GORP(
        [
            {"params": [params["tall.gate_proj"], params["wide.gate_proj"]], "names": ["tall.gate_proj", "wide.gate_proj"],
             "role": "full", "rank": RANK, "update_gap": GAP, "scale": scale, "projector": "exact", "lr": lr_full,
             "align_projector": refresh_alignment == "procrustes"},
            {"params": [params["q.lora_A"]], "names": ["q.lora_A"], "role": "lora_a", "lr": lr_lora},
            {"params": [params["q.lora_B"]], "names": ["q.lora_B"], "role": "lora_b", "lr": lr_lora},
        ],
        betas=betas, eps=1e-8, weight_decay=wd, shared_threshold=0.9,
    )
    roles = {"tall.gate_proj": "full", "wide.gate_proj": "full", "q.lora_A": "lora_a", "q.lora_B": "lora_b"}
    refs = {
        name: RefTensor(roles[name], params[name], lr=lr_full if roles[name] == "full" else lr_lora, betas=betas,
                        eps=1e-8, weight_decay=wd, rank=RANK, update_gap=GAP,
                        scale=scale if roles[name] == "full" else 1.0, shared_threshold=0.9,
                        refresh_alignment=refresh_alignment)
        for name in shapes
    }
    start = {name: refs[name].w.clone() for name in shapes}
    grads = SyntheticGrads(shapes, seed=100 + seed)
    refreshes = 0
    for task in range(TASKS):
        grads.new_task()
        for step in range(STEPS):
            g = {name: grads.grad(name) for name in shapes}
            for name in shapes:
                params[name].grad = g[name].clone()
            opt.step()
            for name in shapes:
                impl_proj = opt.state[name].get("projector")
                refs[name].step(g[name], align=lambda p, q=impl_proj: align_signs(p, q))
                if roles[name] == "full":  # same projector (after the sign gauge of a task's first one)
                    torch.testing.assert_close(impl_proj.to(F64), refs[name].proj, rtol=0, atol=1e-5)
                refreshes += roles[name] == "full" and step % GAP == 0
        for name in shapes:  # trajectory check at the end of each task
            ref_w, impl_w = refs[name].w, params[name].detach().to(F64)
            moved = (ref_w - start[name]).norm()
            err = (impl_w - ref_w).norm()
            assert err <= 1e-4 * moved, f"task {task} {name}: |impl-ref| = {err:.3e}, |ref moved| = {moved:.3e}"
            torch.testing.assert_close(impl_w, ref_w, rtol=1e-4, atol=1e-5 * float(ref_w.abs().max()))
            # the first moment the S rule is about to read, in the implementation's gauge
            impl_m = opt.state[name]["exp_avg"].to(F64)
            if roles[name] == "full":
                tall = shapes[name][0] >= shapes[name][1]
                p = refs[name].proj
                # M is gauge dependent only through the projector; compare its back-projection
                ref_bm, impl_bm = (refs[name].m @ p.mT, impl_m @ p.mT) if tall else (p @ refs[name].m, p @ impl_m)
            else:
                ref_bm, impl_bm = refs[name].m, impl_m
            torch.testing.assert_close(impl_bm, ref_bm, rtol=1e-4, atol=1e-5 * float(ref_bm.abs().max()))
        opt.end_task()
        for name in shapes:
            refs[name].end_task()
            d = refs[name].S.shape[0] if refs[name].S is not None else None
            impl_s = opt.shared_space(name)
            assert (impl_s is None) == (refs[name].S is None), name
            if d is None:
                continue
            assert impl_s.shape == refs[name].S.shape, f"task {task} {name}: S {impl_s.shape} vs ref {refs[name].S.shape}"
            torch.testing.assert_close(projector_matrix(impl_s, d), projector_matrix(refs[name].S, d), rtol=0, atol=1e-4)
        # LoRA factors are re-created at every task boundary (§4); do the same on both sides
        with torch.no_grad():
            params["q.lora_B"].mul_(0.5)
            params["q.lora_A"].add_(0.1)
        for name in ("q.lora_A", "q.lora_B"):
            refs[name].w = params[name].detach().to(F64).clone()
            start[name] = refs[name].w.clone()
    # The design must make S grow and the threshold decisions must be far from ties.
    assert all(refs[name].S is not None for name in shapes)
    assert refs["tall.gate_proj"].S.shape[1] > RANK  # S grew across tasks
    margins = [m for r in refs.values() for m in r.margins]
    assert min(margins) > 1e-4, f"threshold decision too close to a tie for a float32/float64 comparison: {min(margins)}"
    assert refreshes == TASKS * 3 * 2
