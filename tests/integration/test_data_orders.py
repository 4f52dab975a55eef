"""``--order 1`` … ``--order 6``: the O-LoRA / GORP papers' task orders, resolved on a
CL_Benchmark-layout folder; a missing task stops the launch with one line naming it and its path;
the papers' 512/50 source/target lengths are the default for these orders."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gorp_ds.cl import add_arguments, build_run_config
from gorp_ds.data import DataConfig, load_task_sequence
from gorp_ds.data.errors import DataError
from gorp_ds.data.registry import PAPER_ORDERS, SUBSTITUTE_ORDERS
from tests.support import REPO
from tests.support.launch import one_rank_env

REAL = REPO.parent / "shared" / "cl_benchmark"  # beside the checkout, as in CI; tests skip without it

# As published (task names as in CL_Benchmark), written out here independently of the registry.
PUBLISHED = {
    "1": "dbpedia amazon yahoo agnews",
    "2": "dbpedia amazon agnews yahoo",
    "3": "yahoo amazon agnews dbpedia",
    "4": "MNLI CB WiC COPA QQP BoolQA RTE IMDB yelp amazon SST-2 dbpedia agnews MultiRC yahoo",
    "5": "MultiRC BoolQA WiC MNLI CB COPA QQP RTE IMDB SST-2 dbpedia agnews yelp amazon yahoo",
    "6": "yelp amazon MNLI CB COPA QQP RTE IMDB SST-2 dbpedia agnews yahoo MultiRC BoolQA WiC",
}
TYPE_OF = {"dbpedia": "TC", "agnews": "TC", "yahoo": "TC", "amazon": "SC", "yelp": "SC", "IMDB": "SC",
           "SST-2": "SC", "MNLI": "NLI", "CB": "NLI", "RTE": "NLI", "QQP": "QQP", "WiC": "WiC", "COPA": "COPA",
           "BoolQA": "BoolQA", "MultiRC": "MultiRC"}


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> Path:
    """All 15 tasks of the long benchmark in the CL_Benchmark layout, two examples each."""
    root = tmp_path_factory.mktemp("cl_benchmark")
    for task, kind in TYPE_OF.items():
        folder = root / kind / task
        folder.mkdir(parents=True)
        (folder / "labels.json").write_text(json.dumps(["yes", "no"]))
        examples = [{"sentence": f"{task} example {i}", "label": ["yes", "no"][i % 2]} for i in range(2)]
        (folder / "train.json").write_text(json.dumps(examples))
        (folder / "test.json").write_text(json.dumps(examples))
    return root


@pytest.mark.parametrize("order", sorted(PUBLISHED))
def test_order_resolves_to_the_published_task_list(benchmark, order) -> None:
    tasks = load_task_sequence(DataConfig(data_dir=str(benchmark), order=order))
    assert [t.name for t in tasks] == PUBLISHED[order].split()
    assert list(PAPER_ORDERS[order]) == [f"{TYPE_OF[t]}/{t}" for t in PUBLISHED[order].split()]
    assert len(tasks) == (4 if order in "123" else 15)


def test_substitute_orders_are_kept() -> None:
    assert SUBSTITUTE_ORDERS == {"A": ("dbpedia", "amazon", "yelp", "agnews"),
                                 "B": ("agnews", "yelp", "amazon", "dbpedia"),
                                 "C": ("yelp", "dbpedia", "agnews", "amazon")}


def test_missing_task_names_it_and_the_expected_path(benchmark, tmp_path) -> None:
    partial = tmp_path / "partial"
    for kind in ("TC", "SC"):
        for task in ("dbpedia", "agnews", "amazon"):
            if (benchmark / kind / task).is_dir():
                (partial / kind).mkdir(parents=True, exist_ok=True)
                os.symlink(benchmark / kind / task, partial / kind / task)
    with pytest.raises(DataError) as err:
        load_task_sequence(DataConfig(data_dir=str(partial), order="1"))
    message = str(err.value)
    assert "\n" not in message
    assert "task yahoo is missing" in message and str(partial / "TC" / "yahoo") in message
    with pytest.raises(DataError, match="task MNLI is missing.*NLI/MNLI"):
        load_task_sequence(DataConfig(data_dir=str(partial), order="4"))


@pytest.mark.skipif(not REAL.is_dir(), reason="shared/cl_benchmark not present")
def test_real_data_lacks_yahoo() -> None:
    with pytest.raises(DataError, match="task yahoo is missing from --data-dir: expected .*TC/yahoo"):
        load_task_sequence(DataConfig(data_dir=str(REAL), order="1"))


def _config(*argv: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return build_run_config(parser.parse_args(list(argv)))


def test_paper_orders_default_to_the_papers_lengths() -> None:
    cfg = _config("--model", "some/dir", "--data-dir", "x", "--order", "1")
    assert (cfg.data.max_source_length, cfg.data.max_target_length) == (512, 50)
    cfg = _config("--model", "some/dir", "--data-dir", "x", "--order", "4", "--max-source-length", "256")
    assert (cfg.data.max_source_length, cfg.data.max_target_length) == (256, 50)
    cfg = _config("--model", "some/dir", "--data-dir", "x", "--order", "A")
    assert (cfg.data.max_source_length, cfg.data.max_target_length) == (None, None)


@pytest.mark.slow
def test_launch_with_a_missing_task_exits_2_with_one_line(benchmark, tmp_path) -> None:
    partial = tmp_path / "partial"
    (partial / "TC").mkdir(parents=True)
    os.symlink(benchmark / "TC" / "dbpedia", partial / "TC" / "dbpedia")
    env = one_rank_env()
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--model", "embedded",
                           "--data-dir", str(partial), "--order", "3"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gorp_ds: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "order 3: task yahoo is missing" in errors[0] and str(partial / "TC" / "yahoo") in errors[0]
