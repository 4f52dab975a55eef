"""Continual-learning metrics (docs/algorithm.md §7) against values worked out by hand.

``R[i][j]``: accuracy on task j+1 (0-based column j) after training tasks 1..i; row 0 is the
model before any training. With 1-based tasks, as in docs/algorithm.md:

    AA = mean_j R[T][j]
    BWT = mean_{j<T} (R[T][j] − R[j][j])
    FWT = mean_{j≥2} (R[j−1][j] − R[0][j])
    Forgetting = mean_{j<T} (max_{1≤i<T} R[i][j] − R[T][j])
"""

from __future__ import annotations

import random

import pytest

from gorp_ds.cl import all_metrics, average_accuracy, backward_transfer, forgetting, forward_transfer

# T = 3. Columns are tasks 1, 2, 3.
R3 = [
    [10.0, 20.0, 30.0],  # before training
    [60.0, 90.0, 35.0],  # after task 1 (task 2 already at 90: counts for forgetting, i ranges over 1..T-1)
    [50.0, 70.0, 40.0],  # after task 2
    [40.0, 65.0, 80.0],  # after task 3
]
# AA = (40 + 65 + 80) / 3 = 185 / 3 = 61.666…
# BWT: task 1: R[3][1] − R[1][1] = 40 − 60 = −20; task 2: R[3][2] − R[2][2] = 65 − 70 = −5
#      mean = (−20 − 5) / 2 = −12.5
# FWT: task 2: R[1][2] − R[0][2] = 90 − 20 = 70; task 3: R[2][3] − R[0][3] = 40 − 30 = 10
#      mean = (70 + 10) / 2 = 40
# Forgetting: task 1: max(R[1][1], R[2][1]) − R[3][1] = max(60, 50) − 40 = 20
#             task 2: max(R[1][2], R[2][2]) − R[3][2] = max(90, 70) − 65 = 25
#             mean = (20 + 25) / 2 = 22.5
R3_EXPECTED = {"AA": 185 / 3, "BWT": -12.5, "FWT": 40.0, "forgetting": 22.5}

# T = 2, with learning on task 2 improving task 1 (positive BWT, negative forgetting).
R2 = [
    [0.0, 5.0],
    [50.0, 15.0],  # after task 1
    [62.0, 45.0],  # after task 2
]
# AA = (62 + 45) / 2 = 53.5
# BWT: task 1 only: R[2][1] − R[1][1] = 62 − 50 = 12
# FWT: task 2 only: R[1][2] − R[0][2] = 15 − 5 = 10
# Forgetting: task 1 only: max_{i=1} R[1][1] − R[2][1] = 50 − 62 = −12
R2_EXPECTED = {"AA": 53.5, "BWT": 12.0, "FWT": 10.0, "forgetting": -12.0}

# T = 4, fractional values.
R4 = [
    [25.0, 0.0, 12.5, 50.0],
    [87.5, 12.5, 25.0, 37.5],  # after task 1
    [62.5, 75.0, 37.5, 50.0],  # after task 2
    [50.0, 62.5, 100.0, 25.0],  # after task 3
    [37.5, 50.0, 87.5, 75.0],  # after task 4
]
# AA = (37.5 + 50 + 87.5 + 75) / 4 = 250 / 4 = 62.5
# BWT: task 1: 37.5 − 87.5 = −50; task 2: 50 − 75 = −25; task 3: 87.5 − 100 = −12.5
#      mean = −87.5 / 3 = −29.1666…
# FWT: task 2: R[1][2] − R[0][2] = 12.5 − 0 = 12.5; task 3: R[2][3] − R[0][3] = 37.5 − 12.5 = 25;
#      task 4: R[3][4] − R[0][4] = 25 − 50 = −25; mean = 12.5 / 3 = 4.1666…
# Forgetting: task 1: max(87.5, 62.5, 50) − 37.5 = 50; task 2: max(12.5, 75, 62.5) − 50 = 25;
#             task 3: max(25, 37.5, 100) − 87.5 = 12.5; mean = 87.5 / 3 = 29.1666…
R4_EXPECTED = {"AA": 62.5, "BWT": -87.5 / 3, "FWT": 12.5 / 3, "forgetting": 87.5 / 3}


@pytest.mark.parametrize(
    ("r", "expected"), [(R3, R3_EXPECTED), (R2, R2_EXPECTED), (R4, R4_EXPECTED)], ids=["T3", "T2", "T4"]
)
def test_metrics_by_hand(r, expected) -> None:
    assert average_accuracy(r) == pytest.approx(expected["AA"], abs=1e-12)
    assert backward_transfer(r) == pytest.approx(expected["BWT"], abs=1e-12)
    assert forward_transfer(r) == pytest.approx(expected["FWT"], abs=1e-12)
    assert forgetting(r) == pytest.approx(expected["forgetting"], abs=1e-12)
    got = all_metrics(r)
    assert set(got) == {"AA", "BWT", "FWT", "forgetting"}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12)


def test_metrics_do_not_modify_r() -> None:
    r = [list(row) for row in R3]
    all_metrics(r)
    assert r == R3


def test_single_task_has_only_aa() -> None:
    r = [[12.0], [34.0]]  # T = 1: AA = 34 / 1; no earlier task to transfer to or forget
    assert all_metrics(r) == {"AA": 34.0, "BWT": None, "FWT": None, "forgetting": None}


def test_mtl_rows_not_measured() -> None:
    # Multi-task learning trains once: only rows 0 and T exist. AA = (40 + 50 + 60) / 3 = 50.
    r = [[10.0, 20.0, 30.0], None, None, [40.0, 50.0, 60.0]]
    assert all_metrics(r) == {"AA": 50.0, "BWT": None, "FWT": None, "forgetting": None}


def test_missing_row_zero_only_hides_fwt() -> None:
    r = [None] + [list(row) for row in R3[1:]]
    got = all_metrics(r)
    assert got["FWT"] is None
    assert got["AA"] == pytest.approx(R3_EXPECTED["AA"])
    assert got["BWT"] == pytest.approx(R3_EXPECTED["BWT"])
    assert got["forgetting"] == pytest.approx(R3_EXPECTED["forgetting"])


def _reference(r: list[list[float]]) -> dict[str, float | None]:
    """The §7 formulas with 1-based task indices, literally (R[i][j] → r[i][j - 1])."""
    t = len(r) - 1

    def at(i: int, j: int) -> float:
        return r[i][j - 1]

    aa = sum(at(t, j) for j in range(1, t + 1)) / t
    if t == 1:
        return {"AA": aa, "BWT": None, "FWT": None, "forgetting": None}
    bwt = sum(at(t, j) - at(j, j) for j in range(1, t)) / (t - 1)
    fwt = sum(at(j - 1, j) - at(0, j) for j in range(2, t + 1)) / (t - 1)
    fgt = sum(max(at(i, j) for i in range(1, t)) - at(t, j) for j in range(1, t)) / (t - 1)
    return {"AA": aa, "BWT": bwt, "FWT": fwt, "forgetting": fgt}


def test_random_matrices_match_literal_formulas() -> None:
    rng = random.Random(7)
    for _ in range(50):
        t = rng.randint(1, 6)
        r = [[rng.choice([0.0, 12.5, 25.0, 37.5, 50.0, 62.5, 75.0, 87.5, 100.0]) for _ in range(t)]
             for _ in range(t + 1)]
        expected = _reference(r)
        got = all_metrics(r)
        for key, value in expected.items():
            if value is None:
                assert got[key] is None
            else:
                assert got[key] == pytest.approx(value, abs=1e-9), (key, r)


@pytest.mark.parametrize(
    "r",
    [
        [],  # no rows at all
        [[10.0, 20.0]],  # only the row before training
        [[10.0, 20.0], [30.0], [40.0, 50.0]],  # row 1 too short
        [[10.0, 20.0], [30.0, 40.0], [40.0, 50.0, 60.0]],  # last row too long
        [[10.0, 20.0], [30.0, 40.0], None],  # the final row is required
    ],
    ids=["empty", "one-row", "short-row", "long-row", "no-final-row"],
)
@pytest.mark.parametrize("fn", [average_accuracy, backward_transfer, forward_transfer, forgetting, all_metrics])
def test_malformed_r_raises(r, fn) -> None:
    with pytest.raises(ValueError, match="R"):
        fn(r)


# Eval tasks (--eval-tasks, never trained): T = 3 trained tasks, E = 2 eval tasks; rows as R's.
E3 = [
    [25.0, 50.0],  # before training
    [30.0, 40.0],  # after task 1
    None,  # not measured (as mtl's middle rows): no effect on either number
    [45.0, 35.0],  # after task 3
]
# eval mean = (45 + 35) / 2 = 40
# generalisation = ((45 − 25) + (35 − 50)) / 2 = (20 − 15) / 2 = 2.5
E3_EXPECTED = {"eval_mean": 40.0, "generalisation": 2.5}


def test_eval_task_metrics_match_hand_computed_values() -> None:
    from gorp_ds.cl.metrics import eval_task_metrics

    assert eval_task_metrics(E3) == pytest.approx(E3_EXPECTED, abs=1e-12)
    # Without the before-training row the change cannot be computed; the mean still can.
    assert eval_task_metrics([None, [10.0, 30.0]]) == {"eval_mean": 20.0, "generalisation": None}
    # One eval task, one trained task: the change is a plain difference (70 − 80).
    assert eval_task_metrics([[80.0], [70.0]]) == {"eval_mean": 70.0, "generalisation": -10.0}
    # --eval-only: one row, the evaluated model; it is no row 0, so no change is computed from it.
    assert eval_task_metrics([[10.0, 30.0]]) == {"eval_mean": 20.0, "generalisation": None}


def test_eval_task_metrics_refuse_ragged_or_empty_matrices() -> None:
    from gorp_ds.cl.metrics import eval_task_metrics

    with pytest.raises(ValueError, match="row 0 has 1 entries, expected 2"):
        eval_task_metrics([[1.0], [2.0, 3.0]])
    with pytest.raises(ValueError, match="last row"):
        eval_task_metrics([[1.0], None])
    with pytest.raises(ValueError, match="last row"):
        eval_task_metrics([[], []])
    with pytest.raises(ValueError, match="last row"):
        eval_task_metrics([])
