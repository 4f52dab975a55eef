"""bench/train_time.py's schedule and summary: the alternating order, and totals and ratios checked
against numbers worked out by hand."""

from __future__ import annotations

import sys

import pytest

from tests.support import REPO

sys.path.insert(0, str(REPO))

from bench.train_time import interleaved, markdown, summarise  # noqa: E402


def test_the_order_alternates_so_each_method_goes_first_as_often_as_last() -> None:
    orders = [interleaved(["seq-lora", "gorp"], t) for t in range(4)]
    assert orders == [["seq-lora", "gorp"], ["gorp", "seq-lora"], ["seq-lora", "gorp"], ["gorp", "seq-lora"]]
    firsts = [o[0] for o in orders]
    assert firsts.count("seq-lora") == firsts.count("gorp") == 2
    assert interleaved(["a", "b", "c"], 1) == ["c", "b", "a"]


def test_totals_and_ratios_match_a_hand_computation() -> None:
    times = {"seq-lora": [10.0, 20.0, 20.0, 10.0], "gorp": [12.0, 21.0, 19.0, 11.0]}
    summary = summarise(times, "seq-lora")
    gorp = summary["methods"]["gorp"]
    assert gorp["total_s"] == pytest.approx(63.0)
    assert gorp["ratio"] == pytest.approx(63.0 / 60.0)  # 1.05
    assert gorp["after_first_ratio"] == pytest.approx(51.0 / 50.0)  # tasks 2-4: 1.02
    assert gorp["task_ratios"] == pytest.approx([1.2, 1.05, 0.95, 1.1])
    assert summary["methods"]["seq-lora"]["ratio"] == pytest.approx(1.0)
    table = markdown(summary)
    assert "| gorp | 12.0 / 21.0 / 19.0 / 11.0 | 63.0 | 1.050 | 1.020 | 1.20 / 1.05 / 0.95 / 1.10 |" in table


def test_a_method_with_missing_tasks_is_refused() -> None:
    with pytest.raises(ValueError, match="gorp: 3 task times, seq-lora has 4"):
        summarise({"seq-lora": [1.0, 1.0, 1.0, 1.0], "gorp": [1.0, 1.0, 1.0]}, "seq-lora")
