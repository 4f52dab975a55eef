"""The README's table of the embedded default is what scripts/readme_numbers.py makes from the
recorded runs in bench/results/, and each record's metrics are those of its own R."""

from __future__ import annotations

import importlib.util
import math

import pytest

from gorp_ds.cl.metrics import all_metrics
from tests.support import REPO

spec = importlib.util.spec_from_file_location("readme_numbers", REPO / "scripts" / "readme_numbers.py")
readme_numbers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_numbers)

RECORDS = readme_numbers.load_records()


def test_there_is_a_recorded_embedded_default_run() -> None:
    assert RECORDS, f"no bench/results/{readme_numbers.PATTERN}"
    for rec in RECORDS:
        assert rec["date"] and rec["machine"]["torch"] and rec["wall_s"] > 0, rec["file"]
        assert [m["method"] for m in rec["methods"]] == ["gorp", "seq-lora"], rec["file"]


def test_the_readme_table_is_the_one_the_records_make() -> None:
    block = readme_numbers.readme_block((REPO / "README.md").read_text())
    assert block == readme_numbers.table(RECORDS), "run: python scripts/readme_numbers.py render"


@pytest.mark.parametrize("rec", RECORDS, ids=lambda r: r["file"])
def test_each_recorded_metric_is_that_of_its_recorded_r(rec) -> None:
    for method in rec["methods"]:
        again = all_metrics(method["R"])
        for key, value in method["metrics"].items():
            if value is None or again[key] is None:
                assert value is None and again[key] is None, (method["method"], key)
            else:
                assert math.isclose(value, again[key], abs_tol=1e-9), (method["method"], key, value, again[key])


def test_the_table_from_a_hand_made_record() -> None:
    r = [[0.0, 0.0], [90.0, 10.0], [80.0, 100.0]]
    rec = {"where": "somewhere", "date": "2026-12-07", "wall_s": 125.0, "wall_note": "make run", "file": "x.json",
           "machine": {"gpu": None, "cpu": "cpu", "cores": 2, "torch": "t", "deepspeed": "d"},
           "methods": [{"method": "gorp", "R": r, "metrics": all_metrics(r), "train_s": 12.4,
                        "peak_memory_gib": 1.234, "peak_memory_source": "rss_high_water_mark"}]}
    lines = readme_numbers.table([rec]).splitlines()
    # AA = mean of the last row = 90; BWT = 80 - 90 = -10; forgetting = max over earlier rows - last = 10;
    # FWT = R[0][1] (0) against R[... ] as docs/algorithm.md §7 defines it, recomputed by all_metrics.
    fwt = all_metrics(r)["FWT"]
    assert lines[2] == (f"| somewhere | gorp | 90.0 | −10.0 | {fwt:+.1f} | 10.0 | 12 | 1.23 | 2 min 5 s (make run) |"
                        .replace("-", "−"))
    assert "the resident set's peak (RSS)" in lines[-1] and "2 cores of cpu" in lines[-1]
