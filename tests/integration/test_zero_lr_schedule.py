"""The learning-rate schedule reaches the update at every ZeRO stage: GORP under ZeRO-1/2/3 (flat and
projected ``full`` targets) stepped by ``RoleScheduler`` follows the single-process GORP under the same
schedule to 1e-5 relative, while the single-process run with fixed rates is far from it. One 2-rank
process group (tests/support/schedule_scenarios.py)."""

from __future__ import annotations

import pytest
import torch

from tests.support import schedule_scenarios as ss
from tests.support import zero_scenarios as zs
from tests.support.dist_utils import run_ranks

pytestmark = pytest.mark.slow
RTOL = 1e-5
WORLD = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_ranks(WORLD, ss.scenarios, out_dir=str(tmp_path_factory.mktemp("zero_lr")))


def _max_rel_err(trajectory, reference: list[torch.Tensor]) -> float:
    return max(float((trajectory[s] - reference[s]).norm() / reference[s].norm()) for s in range(zs.STEPS))


def test_the_schedule_changes_the_single_process_trajectory() -> None:
    scheduled, rates = ss.reference_trajectory(WORLD, ss.SCHEDULE)
    fixed, fixed_rates = ss.reference_trajectory(WORLD, None)
    assert _max_rel_err(scheduled, fixed) > 1e-3
    assert [r["full"] for r in rates] == pytest.approx([2e-2 * ss.SCHEDULE.factor(s) for s in range(zs.STEPS)])
    assert all(r["full"] == 2e-2 for r in fixed_rates)


@pytest.mark.parametrize("scenario", sorted(ss.SCENARIOS))
def test_zero_follows_the_scheduled_single_process_run(runs, scenario) -> None:
    reference, rates = ss.reference_trajectory(WORLD, ss.SCHEDULE)
    for rank, result in enumerate(runs):
        facts = result[scenario]
        if ss.SCENARIOS[scenario][1] == "projected":
            assert facts["detached"] == ["full"]  # the group torch's scheduler alone would miss
        for step in range(zs.STEPS):
            assert facts["rates"][step] == pytest.approx(rates[step], rel=1e-12), (scenario, rank, step)
        err = _max_rel_err(facts["trajectory"], reference)
        assert err <= RTOL, f"{scenario} rank {rank}: relative error {err:.2e}"
