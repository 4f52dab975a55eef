"""CL_Benchmark loader: layout, templates, caps, orders (fixture written to tmp_path), real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gorp_ds.data import ORDERS, DataConfig, Example, load_task_sequence
from gorp_ds.data.cl_benchmark import available_tasks
from gorp_ds.data.templates import instruction_for
from tests.support import REPO

REAL = REPO.parent / "shared" / "cl_benchmark"

LABELS = {
    ("TC", "agnews"): ["World", "Sports", "Business", "Science or Technology"],
    ("TC", "dbpedia"): ["Company", "Artist", "Film"],
    ("SC", "amazon"): ["very negative", "negative", "neutral", "positive", "very positive"],
    ("SC", "yelp"): ["very negative", "negative", "neutral", "positive", "very positive"],
    ("SC", "SST-2"): ["Good", "Bad"],
    ("SC", "IMDB"): ["Good", "Bad"],
}


def write_task(
    root: Path, kind: str, name: str, labels: list[str], n_train: int = 12, n_test: int = 6
) -> Path:
    folder = root / kind / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.json").write_text(json.dumps(labels))
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [{"sentence": f"{name} {split} text {i}", "label": labels[i % len(labels)]} for i in range(n)]
        (folder / f"{split}.json").write_text(json.dumps(rows))
    return folder


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    for (kind, name), labels in LABELS.items():
        write_task(tmp_path, kind, name, labels)
    write_task(tmp_path, "XX", "mytask", ["alpha", "beta"])
    return tmp_path


def test_layout_and_examples(bench: Path) -> None:
    assert available_tasks(bench) == [
        "SC/IMDB",
        "SC/SST-2",
        "SC/amazon",
        "SC/yelp",
        "TC/agnews",
        "TC/dbpedia",
        "XX/mytask",
    ]
    (task,) = load_task_sequence(DataConfig(data_dir=str(bench), tasks=["dbpedia"]))
    assert task.name == "dbpedia"
    assert task.labels == ("Company", "Artist", "Film")
    assert len(task.train) == 12 and len(task.test) == 6
    assert task.train[0] == Example(text="dbpedia train text 0", label="Company")
    assert task.test[5] == Example(text="dbpedia test text 5", label="Film")


def test_spec_forms_resolve_to_same_folder(bench: Path) -> None:
    for spec in ("SST-2", "SC/SST-2", "sst-2", "SC/SST-2/"):
        (task,) = load_task_sequence(DataConfig(data_dir=str(bench), tasks=[spec]))
        assert task.name == "SST-2" and task.labels == ("Good", "Bad")


def test_templates_known_and_generic(bench: Path) -> None:
    seq = load_task_sequence(
        DataConfig(data_dir=str(bench), tasks=["agnews", "amazon", "yelp", "IMDB", "mytask"])
    )
    by_name = {t.name: t for t in seq}
    assert "news article" in by_name["agnews"].instruction
    assert "World, Sports, Business, Science or Technology" in by_name["agnews"].instruction
    assert "product" in by_name["amazon"].instruction and "business" in by_name["yelp"].instruction
    assert "movie review" in by_name["IMDB"].instruction
    assert by_name["mytask"].instruction == "Classify the input (mytask). Answer with one of: alpha, beta."
    assert len({t.instruction for t in seq}) == len(seq)
    t = by_name["agnews"]
    ex = t.test[0]
    assert t.prompt(ex) == f"{t.instruction}\nInput: {ex.text}\nAnswer:"
    assert t.target(ex) == " World"
    assert instruction_for("TC/dbpedia", ["A"]) == instruction_for("dbpedia", ["A"])


def test_named_orders(bench: Path) -> None:
    assert ORDERS["A"] == ("dbpedia", "amazon", "yelp", "agnews")
    for key in ("A", "B", "C", "b"):
        seq = load_task_sequence(DataConfig(data_dir=str(bench), order=key))
        assert tuple(t.name for t in seq) == ORDERS[key.upper()]


def test_custom_sequence_keeps_order_and_mixes_sources(bench: Path) -> None:
    seq = load_task_sequence(
        DataConfig(data_dir=str(bench), tasks=["IMDB", "emb_fruit", "XX/mytask", "agnews"])
    )
    assert [t.name for t in seq] == ["IMDB", "emb_fruit", "mytask", "agnews"]


def test_caps_deterministic(bench: Path) -> None:
    write_task(bench, "XX", "big", ["a", "b", "c"], n_train=300, n_test=100)

    def load(seed: int):
        return load_task_sequence(
            DataConfig(data_dir=str(bench), tasks=["big"], max_train_per_task=40, eval_samples=25, seed=seed)
        )[0]

    a, b, c = load(0), load(0), load(1)
    assert len(a.train) == 40 and len(a.test) == 25
    assert a.train == b.train and a.test == b.test
    assert a.train != c.train  # the train sample follows the seed
    assert a.test == c.test  # the evaluation subset is the same for every seed
    full = [e.text for e in load_task_sequence(DataConfig(data_dir=str(bench), tasks=["big"]))[0].train]
    idx = [full.index(e.text) for e in a.train]
    assert idx == sorted(idx)  # a subset in original order
    # caps larger than the data leave it untouched
    (d,) = load_task_sequence(DataConfig(data_dir=str(bench), tasks=["big"], max_train_per_task=10_000))
    assert len(d.train) == 300


@pytest.mark.skipif(not REAL.is_dir(), reason="shared/cl_benchmark not present")
@pytest.mark.parametrize("order", ["A", "B", "C"])
def test_real_benchmark_orders(order: str) -> None:
    seq = load_task_sequence(DataConfig(data_dir=str(REAL), order=order, eval_samples=500))
    assert [t.name for t in seq] == list(ORDERS[order])
    sizes = {"dbpedia": (5700, 14), "amazon": (5000, 5), "yelp": (4000, 5), "agnews": (4000, 4)}
    for t in seq:
        assert (len(t.train), len(t.labels)) == sizes[t.name]
        assert len(t.test) == 500
        assert all(e.label in t.labels for e in t.train)


@pytest.mark.skipif(not REAL.is_dir(), reason="shared/cl_benchmark not present")
def test_real_binary_sentiment_tasks() -> None:
    seq = load_task_sequence(DataConfig(data_dir=str(REAL), tasks=["SST-2", "IMDB"]))
    assert [(t.name, t.labels) for t in seq] == [("SST-2", ("Good", "Bad")), ("IMDB", ("Good", "Bad"))]
