"""The spread projector refresh (docs/algorithm.md §2.1, ``refresh_schedule="spread"``).

- The phases and the due rule against hand-computed tables, and their two promises over many
  ``(L, T)``: at most ⌈L/T⌉ members refresh in a step after step 0, and every ``T`` consecutive steps
  from step 1 on refresh each member exactly once.
- ``GORP`` under ``spread`` (float32, ``projector="exact"``) against the independent float64
  re-derivation of ``reference_gorp.RefTensor`` with each tensor's phase computed here from the
  documented formula: weights compared at every step, two tasks of 8 steps with T = 3 (so more than
  two cycles per task and a task boundary mid-cycle), five ``full`` tensors of two shapes in one
  group (so one stack refreshes some members and not others in a step).
- Which members the optimizer refreshed at each step (seen through their projectors and the
  refresh counter), and a resume from a mid-cycle ``state_dict`` that continues bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch

from gorp_ds.optim import GORP
from gorp_ds.optim.refresh_schedule import refresh_due, refresh_index, refresh_phases
from tests.support.reference_gorp import F64, RefTensor, align_signs
from tests.unit.test_optim_reference import SyntheticGrads

# ------------------------------------------------------------------ the schedule as pure functions


@pytest.mark.parametrize("count, gap, phases", [
    (4, 3, [0, 0, 1, 2]),            # ⌊j·3/4⌋
    (7, 3, [0, 0, 0, 1, 1, 2, 2]),   # ⌊j·3/7⌋
    (2, 5, [0, 2]),                  # L < T: spread over the cycle
    (3, 1, [0, 0, 0]),               # T = 1: every step refreshes every member anyway
    (30, 20, [j * 20 // 30 for j in range(30)]),
])
def test_phases_table(count, gap, phases):
    assert refresh_phases(count, gap, "spread") == phases
    assert refresh_phases(count, gap, "cycle") == [0] * count


def test_due_and_refresh_numbers_table():
    # T = 3, phase 2: steps 0, 2, 5, 8; refresh numbers 0, 1, 2, 3.
    assert [s for s in range(10) if refresh_due(s, 2, 3)] == [0, 2, 5, 8]
    assert [refresh_index(s, 2, 3) for s in (0, 2, 5, 8)] == [0, 1, 2, 3]
    # Phase 0 is the cycle schedule with its old refresh numbers step // T.
    assert [s for s in range(10) if refresh_due(s, 0, 3)] == [0, 3, 6, 9]
    assert [refresh_index(s, 0, 3) for s in (0, 3, 6, 9)] == [0, 1, 2, 3]


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 30, 32])
@pytest.mark.parametrize("gap", [1, 2, 3, 7, 20])
def test_spread_bounds_and_once_per_cycle(count, gap):
    phases = refresh_phases(count, gap, "spread")
    assert all(0 <= p < gap for p in phases)
    steps = 4 * gap + 3
    due = [[refresh_due(s, p, gap) for p in phases] for s in range(steps)]
    assert all(due[0]), "step 0 of a task refreshes every member"
    assert max(sum(row) for row in due[1:]) <= math.ceil(count / gap)
    for start in range(1, steps - gap + 1):  # any T consecutive steps from step 1 on
        window = due[start : start + gap]
        assert all(sum(row[j] for row in window) == 1 for j in range(count)), (start, phases)
    # Refresh numbers count each member's refreshes: 0, 1, 2, … in step order.
    for j, p in enumerate(phases):
        numbers = [refresh_index(s, p, gap) for s in range(steps) if due[s][j]]
        assert numbers == list(range(len(numbers)))


def test_bad_schedule_is_refused():
    with pytest.raises(ValueError, match="refresh_schedule"):
        refresh_phases(3, 2, "staggered")
    with pytest.raises(ValueError, match="refresh_schedule"):
        GORP([{"params": [torch.zeros(4, 4, requires_grad=True)], "names": ["w"], "role": "full", "lr": 1.0,
               "rank": 2, "refresh_schedule": "staggered"}])


# ------------------------------------------------------------------ the optimizer against float64

TASKS, STEPS, GAP, RANK = 2, 8, 3, 3
# One full group, two shapes interleaved: tall (right projection) and wide (left projection) stacks.
SHAPES = {"t0.gate_proj": (20, 10), "w0.gate_proj": (10, 24), "t1.gate_proj": (20, 10), "w1.gate_proj": (10, 24),
          "t2.gate_proj": (20, 10)}
NAMES = list(SHAPES)
PHASES = {name: j * GAP // len(NAMES) for j, name in enumerate(NAMES)}  # docs/algorithm.md §2.1: 0, 0, 1, 1, 2


def _optimizer(params: dict[str, torch.nn.Parameter], schedule: str, align: bool) -> GORP:
    return GORP([{"params": [params[n] for n in NAMES], "names": NAMES, "role": "full", "rank": RANK,
                  "update_gap": GAP, "scale": 0.5, "projector": "exact", "lr": 2e-2, "align_projector": align,
                  "refresh_schedule": schedule}],
                betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, shared_threshold=0.9)


def _params(seed: int) -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.nn.Parameter(torch.randn(shape, generator=gen)) for n, shape in SHAPES.items()}


@pytest.mark.parametrize("refresh_alignment", ["none", "procrustes"], ids=["as-written", "procrustes-variant"])
def test_spread_matches_float64_reference_every_step(refresh_alignment):
    params = _params(0)
    opt = _optimizer(params, "spread", refresh_alignment == "procrustes")
    refs = {n: RefTensor("full", params[n], lr=2e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, rank=RANK,
                         update_gap=GAP, scale=0.5, shared_threshold=0.9, refresh_alignment=refresh_alignment,
                         refresh_phase=PHASES[n])
            for n in NAMES}
    start = {n: refs[n].w.clone() for n in NAMES}
    grads = SyntheticGrads(SHAPES, seed=7)
    refreshed_per_step = []
    for task in range(TASKS):
        grads.new_task()
        for step in range(STEPS):
            g = {n: grads.grad(n) for n in NAMES}
            for n in NAMES:
                params[n].grad = g[n].clone()
            before = {n: opt.state[n]["projector"].clone() for n in NAMES if "projector" in opt.state.get(n, {})}
            count = opt.refresh_count
            opt.step()
            changed = [n for n in NAMES if n not in before or not torch.equal(before[n], opt.state[n]["projector"])]
            expected = [n for n in NAMES if step == 0 or step % GAP == PHASES[n]]
            assert changed == expected, f"task {task} step {step}"
            assert opt.refresh_count - count == len(expected)
            refreshed_per_step.append(len(expected))
            for n in NAMES:
                impl_proj = opt.state[n]["projector"]
                refs[n].step(g[n], align=lambda p, q=impl_proj: align_signs(p, q))
                torch.testing.assert_close(impl_proj.to(F64), refs[n].proj, rtol=0, atol=1e-5)
                ref_w, impl_w = refs[n].w, params[n].detach().to(F64)
                moved = (ref_w - start[n]).norm()
                err = (impl_w - ref_w).norm()
                assert err <= 1e-4 * moved, f"task {task} step {step} {n}: |impl-ref| {err:.3e}, moved {moved:.3e}"
        opt.end_task()
        for n in NAMES:
            refs[n].end_task()
    assert max(refreshed_per_step[1:STEPS]) <= math.ceil(len(NAMES) / GAP) == 2
    assert all(r.S is not None for r in refs.values()), "the second task ran with S in use"


def _run(opt: GORP, params: dict[str, torch.nn.Parameter], steps: range, seed: int = 3) -> list[torch.Tensor]:
    weights = []
    for step in steps:
        gen = torch.Generator().manual_seed(seed * 1000 + step)
        for n in NAMES:
            params[n].grad = torch.randn(SHAPES[n], generator=gen)
        opt.step()
        weights.append(torch.cat([params[n].detach().reshape(-1) for n in NAMES]))
    return weights


@pytest.mark.parametrize("schedule", ["cycle", "spread"])
def test_resume_mid_cycle_is_exact(schedule):
    params = _params(1)
    opt = _optimizer(params, schedule, True)
    straight = _run(opt, params, range(8))
    params = _params(1)
    opt = _optimizer(params, schedule, True)
    first = _run(opt, params, range(4))  # stops between phases (step 4 refreshes phase 1 under spread)
    saved = opt.state_dict()
    resumed_params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    resumed = _optimizer(resumed_params, schedule, True)
    resumed.load_state_dict(saved)
    rest = _run(resumed, resumed_params, range(4, 8))
    for a, b in zip(straight, first + rest):
        assert torch.equal(a, b)


def test_cycle_is_the_default_and_unchanged():
    """The default schedule refreshes every member at steps 0, T, 2T, … (today's behaviour)."""
    params = _params(2)
    opt = GORP([{"params": [params[n] for n in NAMES], "names": NAMES, "role": "full", "rank": RANK,
                 "update_gap": GAP, "lr": 1e-2}])
    counts = []
    for step in range(7):
        count = opt.refresh_count
        _run(opt, params, range(step, step + 1))
        counts.append(opt.refresh_count - count)
    assert counts == [5, 0, 0, 5, 0, 0, 5]
