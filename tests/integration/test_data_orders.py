"""``--order 1`` … ``--order 6``: the O-LoRA / GORP papers' task orders, resolved on a
CL_Benchmark-layout folder; a missing task stops the launch with one line naming it and its path
(``--allow-substitutes`` runs the order without the missing tasks, naming them); ``--order shared10``
is the ten shared tasks; the papers' 512/50 source/target lengths are the default for orders 1-6.
``--eval-tasks`` load only their test split and may not repeat a trained task."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gorp_ds.cl import add_arguments, build_run_config
from gorp_ds.data import DataConfig, load_task_sequence, registry
from gorp_ds.data.errors import DataError
from gorp_ds.data.registry import PAPER_ORDERS, SUBSTITUTE_ORDERS, load_eval_tasks
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


# The ten tasks of ../shared/cl_benchmark (its README), written out independently of the registry.
SHARED = ["agnews", "dbpedia", "amazon", "yelp", "SST-2", "IMDB", "RTE", "CB", "COPA", "MultiRC"]
MISSING_FROM_SHARED = ["MNLI", "WiC", "QQP", "BoolQA", "yahoo"]


def _subset(benchmark: Path, root: Path, names: list[str]) -> Path:
    """A CL_Benchmark folder holding only ``names`` (links into the 15-task fixture)."""
    for name in names:
        (root / TYPE_OF[name]).mkdir(parents=True, exist_ok=True)
        os.symlink(benchmark / TYPE_OF[name] / name, root / TYPE_OF[name] / name)
    return root


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def warnings_logged():
    handler = _Records()
    registry.log.addHandler(handler)
    yield handler.lines
    registry.log.removeHandler(handler)


@pytest.mark.parametrize("order", ["4", "5", "6"])
def test_a_long_order_with_missing_tasks_is_refused_in_one_line_naming_them_and_the_flag(benchmark, tmp_path,
                                                                                          order) -> None:
    shared = _subset(benchmark, tmp_path / "shared", SHARED)
    with pytest.raises(DataError) as err:
        load_task_sequence(DataConfig(data_dir=str(shared), order=order))
    message = str(err.value)
    first = next(t for t in PUBLISHED[order].split() if t in MISSING_FROM_SHARED)
    assert "\n" not in message
    assert message.startswith(f"order {order}: task {first} is missing from --data-dir: expected "
                              f"{shared / TYPE_OF[first] / first}/"), message
    in_order = [t for t in PUBLISHED[order].split() if t in MISSING_FROM_SHARED]
    assert f"missing: {', '.join(in_order)})" in message
    assert message.endswith("or pass data.allow_substitutes to run the order without them"), message


@pytest.mark.parametrize("order", ["1", "4", "5", "6"])
def test_allow_substitutes_runs_the_order_without_the_missing_tasks_and_names_them(benchmark, tmp_path, order,
                                                                                   warnings_logged) -> None:
    shared = _subset(benchmark, tmp_path / "shared", SHARED)
    tasks = load_task_sequence(DataConfig(data_dir=str(shared), order=order, allow_substitutes=True))
    kept = [t for t in PUBLISHED[order].split() if t in SHARED]  # the published order, missing tasks left out
    assert [t.name for t in tasks] == kept
    assert len(kept) == (3 if order == "1" else 10)
    missing = [t for t in PUBLISHED[order].split() if t not in SHARED]
    assert warnings_logged == [
        f"order {order}: {len(missing)} of {len(PUBLISHED[order].split())} tasks are missing from {shared} "
        f"({', '.join(missing)}); data.allow_substitutes: they are left out, running {len(kept)} tasks: "
        + " -> ".join(kept)]


def test_allow_substitutes_changes_nothing_when_every_task_is_there(benchmark, warnings_logged) -> None:
    tasks = load_task_sequence(DataConfig(data_dir=str(benchmark), order="5", allow_substitutes=True))
    assert [t.name for t in tasks] == PUBLISHED["5"].split() and warnings_logged == []


def test_an_order_with_no_task_present_is_refused_even_with_the_flag(benchmark, tmp_path) -> None:
    only_wic = _subset(benchmark, tmp_path / "wic", ["WiC"])
    with pytest.raises(DataError, match=r"^order 1: task dbpedia is missing .*missing: dbpedia, amazon, yahoo, "
                                        r"agnews\); add the tasks$"):
        load_task_sequence(DataConfig(data_dir=str(only_wic), order="1", allow_substitutes=True))


def test_shared10_is_order_4_on_the_ten_shared_tasks(benchmark, tmp_path) -> None:
    shared = _subset(benchmark, tmp_path / "shared", SHARED)
    expected = [t for t in PUBLISHED["4"].split() if t in SHARED]
    for spelling in ("shared10", "SHARED10", "Shared10"):
        assert [t.name for t in load_task_sequence(DataConfig(data_dir=str(shared), order=spelling))] == expected
    assert sorted(expected) == sorted(SHARED)
    nine = _subset(benchmark, tmp_path / "nine", [t for t in SHARED if t != "COPA"])
    with pytest.raises(DataError, match=r"^order shared10: task COPA is missing from --data-dir"):
        load_task_sequence(DataConfig(data_dir=str(nine), order="shared10"))


@pytest.mark.skipif(not REAL.is_dir(), reason="shared/cl_benchmark not present")
def test_real_shared_data_runs_order_4_with_substitutes_as_shared10() -> None:
    with pytest.raises(DataError, match="order 4: task MNLI is missing .*missing: MNLI, WiC, QQP, BoolQA, yahoo"):
        load_task_sequence(DataConfig(data_dir=str(REAL), order="4", eval_samples=2, max_train_per_task=2))
    substituted = load_task_sequence(DataConfig(data_dir=str(REAL), order="4", allow_substitutes=True,
                                                eval_samples=2, max_train_per_task=2))
    shared10 = load_task_sequence(DataConfig(data_dir=str(REAL), order="shared10", eval_samples=2,
                                             max_train_per_task=2))
    assert [t.name for t in substituted] == [t.name for t in shared10] == [
        t for t in PUBLISHED["4"].split() if t in SHARED]


def test_eval_tasks_keep_only_their_test_split_and_are_never_trained(benchmark) -> None:
    cfg = DataConfig(data_dir=str(benchmark), tasks=["dbpedia", "amazon"], eval_tasks=["CB", "emb_fruit"],
                     eval_samples=1)
    trained = load_task_sequence(cfg)
    unseen = load_eval_tasks(cfg, trained)
    assert [t.name for t in trained] == ["dbpedia", "amazon"] and [t.name for t in unseen] == ["CB", "emb_fruit"]
    assert [len(t.train) for t in unseen] == [0, 0] and [len(t.test) for t in unseen] == [1, 1]
    assert all(len(t.train) == 2 for t in trained)  # the trained tasks are untouched
    assert load_eval_tasks(DataConfig(data_dir=str(benchmark), tasks=["CB"]), trained) == []


@pytest.mark.parametrize(("eval_tasks", "needle"), [
    (["TC/dbpedia"], "data.eval_tasks: 'TC/dbpedia' loads task 'dbpedia', which is also in the trained sequence; "
                     "an eval task is never trained: remove it from data.eval_tasks or from the sequence"),
    (["CB", "NLI/CB"], "data.eval_tasks: 'NLI/CB' loads task 'CB', which is also in data.eval_tasks;"),
])
def test_an_eval_task_that_is_trained_or_repeated_is_refused_in_one_line(benchmark, eval_tasks, needle) -> None:
    cfg = DataConfig(data_dir=str(benchmark), tasks=["dbpedia", "amazon"], eval_tasks=eval_tasks)
    with pytest.raises(DataError) as err:
        load_eval_tasks(cfg, load_task_sequence(cfg))
    assert needle in str(err.value) and "\n" not in str(err.value)


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
