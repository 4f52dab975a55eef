"""Forgetting sanity check: the shared space S protects an earlier task (docs/algorithm.md §3).

Design. A linear model y = W x with W ∈ R^{8×32}, role ``full`` (m < n: left projection, S on
the input side, which is exactly the side on which tasks differ here).
- Task 1: inputs x = A diag(2, 1.4, 1, 0.7) z in a random 4-dim subspace A ⊂ R^32, targets T1 x.
- Task 2: isotropic inputs on A ⊕ B (B another 4 dims), targets T2 x with T2 = −T1 on A (a direct
  conflict) and a fresh random map on B.
Minibatches of 8 with label noise, so the end-of-task first moment is the EMA of noisy gradients,
whose row space lies in A. Any update that leaves W A unchanged keeps task 1 intact; AdamW and
GaLore (``shared_threshold=0``, same projected Adam but no S) are free to overwrite W A to fit
task 2 and forget. With S, GORP removes the A-directions that S holds from task 2's low-rank
gradient: it cannot fit task 2 on A (by design, the conflict is total) but still learns the
non-conflicting B part.

Measured behaviour (not tuned away): at the default ε_S = 0.9 the end-of-task moment yields an S
of only 2–3 of A's 4 dimensions, so protection is partial. Task-1 loss after task 2, GORP/AdamW,
4 seeds aggregated: 0.15–0.24 (depending on the projector and on projector alignment), per seed
up to 0.44; GaLore/AdamW 0.8–0.9. With isotropic task-1 inputs (SCALES = 1) it is weaker:
aggregated 0.24–0.44, per seed up to 0.67. The anisotropic design is kept because it is the GPM
premise (directions carrying more gradient energy matter more to the loss). With ε_S = 0.999, S
holds (nearly) all of A and forgetting drops to ~5 % of AdamW's, which shows that the leak left by
Adam's elementwise normalisation after the projection is small and that most residual forgetting
at 0.9 is the threshold's doing.
"""

from __future__ import annotations

import pytest
import torch

from gorp_ds.optim import GORP

M, N, DA, DB = 8, 32, 4, 4
SCALES = torch.tensor([2.0, 1.4, 1.0, 0.7])
STEPS, LR, BATCH, NOISE = 150, 0.05, 8, 0.3
SEEDS = range(4)


def make_problem(seed):
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(N, DA + DB, generator=g))
    a = basis[:, :DA]
    t1 = torch.randn(M, N, generator=g)
    t2 = torch.randn(M, N, generator=g)
    t2 = t2 - t2 @ a @ a.mT - t1 @ a @ a.mT  # T2 A = −T1 A: full conflict on task 1's inputs
    ev = torch.Generator().manual_seed(10_000 + seed)
    x1 = (a @ (SCALES[:, None] * torch.randn(DA, 512, generator=ev))).mT
    x2 = (basis @ torch.randn(DA + DB, 512, generator=ev)).mT
    xb = (basis[:, DA:] @ torch.randn(DB, 512, generator=ev)).mT
    return dict(a=a, basis=basis, t1=t1, t2=t2, eval1=(x1, x1 @ t1.mT), eval2=(x2, x2 @ t2.mT), eval2b=(xb, xb @ t2.mT))


def sample(p, task, gen):
    if task == 1:
        x = (p["a"] @ (SCALES[:, None] * torch.randn(DA, BATCH, generator=gen))).mT
        t = p["t1"]
    else:
        x = (p["basis"] @ torch.randn(DA + DB, BATCH, generator=gen)).mT
        t = p["t2"]
    return x, x @ t.mT + NOISE * torch.randn(BATCH, M, generator=gen)


def loss(w, data):
    x, y = data
    return (x @ w.mT - y).square().sum(1).mean()


def run(p, seed, kind, threshold=0.9, projector="randomized"):
    w = torch.nn.Parameter(torch.zeros(M, N))
    if kind == "adamw":
        opt = torch.optim.AdamW([w], lr=LR, weight_decay=0.0)
    else:
        opt = GORP([{"params": [w], "names": ["layer.mlp.gate_proj"], "role": "full", "rank": 4, "update_gap": 10,
                     "projector": projector, "scale": 1.0}], lr=LR, shared_threshold=threshold)
    gen = torch.Generator().manual_seed(seed + 1)
    out = {}
    for task in (1, 2):
        for _ in range(STEPS):
            opt.zero_grad()
            loss(w, sample(p, task, gen)).backward()
            opt.step()
        with torch.no_grad():
            if task == 1:
                out["task1_after_1"] = float(loss(w, p["eval1"]))
                if kind != "adamw":
                    opt.end_task()
                    out["S"] = opt.shared_space("layer.mlp.gate_proj")
                out["task2_before"] = float(loss(w, p["eval2"]))
                out["task2b_before"] = float(loss(w, p["eval2b"]))
            else:
                out["task1_after_2"] = float(loss(w, p["eval1"]))
                out["task2_after"] = float(loss(w, p["eval2"]))
                out["task2b_after"] = float(loss(w, p["eval2b"]))
    return out


@pytest.mark.parametrize("projector", ["randomized", "exact"])
def test_gorp_forgets_less_than_adamw_and_galore(projector):
    torch.manual_seed(0)
    res = {"adamw": [], "gorp": [], "galore": []}
    for seed in SEEDS:
        p = make_problem(seed)
        res["adamw"].append(run(p, seed, "adamw"))
        res["gorp"].append(run(p, seed, "gorp", 0.9, projector))
        res["galore"].append(run(p, seed, "gorp", 0.0, projector))
        # S exists, lies inside task 1's input subspace A, and is not the whole of R^32
        s = res["gorp"][-1]["S"]
        assert s is not None and 1 <= s.shape[1] <= DA
        assert float((p["a"].mT @ s).square().sum()) == pytest.approx(s.shape[1], abs=1e-3)
        assert res["galore"][-1]["S"] is None

    def total(kind, key):
        return sum(r[key] for r in res[kind])

    for kind in res:  # everyone learned task 1 (evaluated on noise-free targets)
        assert all(r["task1_after_1"] < 0.5 for r in res[kind]), kind
    # the baselines fit task 2 and forget task 1
    for kind in ("adamw", "galore"):
        assert total(kind, "task2_after") < 0.05 * total(kind, "task2_before"), kind
        assert total(kind, "task1_after_2") > 100 * total(kind, "task1_after_1"), kind
    # GORP still learns task 2 where it does not conflict with task 1 (B), and lowers task 2's loss
    assert total("gorp", "task2b_after") < 0.15 * total("gorp", "task2b_before")
    assert total("gorp", "task2_after") < 0.75 * total("gorp", "task2_before")
    # the point: markedly less forgetting than AdamW ...
    ratio = total("gorp", "task1_after_2") / total("adamw", "task1_after_2")
    assert ratio < 0.5, f"GORP/AdamW task-1 loss after task 2 = {ratio:.2f}"
    # ... and it comes from S: without it (GaLore) forgetting is close to AdamW's
    galore_ratio = total("galore", "task1_after_2") / total("adamw", "task1_after_2")
    assert galore_ratio > 0.7, galore_ratio
    assert total("gorp", "task1_after_2") < 0.5 * total("galore", "task1_after_2")


def test_higher_threshold_nearly_removes_forgetting():
    gorp, adamw = 0.0, 0.0
    for seed in SEEDS[:2]:
        p = make_problem(seed)
        r = run(p, seed, "gorp", threshold=0.999)
        s = r["S"]
        assert DA - 1 <= s.shape[1] <= DA  # (nearly) all of A: the moment can be nearly rank-deficient
        assert float((p["a"].mT @ s).square().sum()) == pytest.approx(s.shape[1], abs=1e-3)  # S ⊂ A
        assert r["task2b_after"] < 0.3 * r["task2b_before"]  # B is still learned (83–94 % in 150 steps)
        gorp += r["task1_after_2"]
        adamw += run(p, seed, "adamw")["task1_after_2"]
    assert gorp < 0.1 * adamw, (gorp, adamw)
