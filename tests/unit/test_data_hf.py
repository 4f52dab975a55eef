"""``hf:`` sources: save_to_disk folders, data-file folders and builder specs (all offline, in tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gorp_ds.data import DataConfig, DataError, load_task_sequence

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def rows(n: int, labels=("pos", "neg")) -> list[dict]:
    return [{"sentence": f"text {i}", "label": labels[i % len(labels)]} for i in range(n)]


def test_save_to_disk_with_class_labels(tmp_path: Path) -> None:
    feats = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["Bad", "Good"])}
    )
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "label": [0, 1, 1]}, features=feats),
        test=datasets.Dataset.from_dict({"sentence": ["d"], "label": [0]}, features=feats),
    )
    dd.save_to_disk(str(tmp_path / "SST-2"))
    (task,) = load_task_sequence(DataConfig(tasks=[f"hf:{tmp_path / 'SST-2'}"]))
    assert task.name == "SST-2" and task.labels == ("Bad", "Good")
    assert [e.label for e in task.train] == ["Bad", "Good", "Good"] and task.test[0].text == "d"
    assert "good or bad" in task.instruction  # the known SST-2 template


def test_builder_spec_with_data_files_relative_to_data_dir(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "reviews"
    folder.mkdir(parents=True)
    (folder / "tr.json").write_text(json.dumps(rows(6)))
    (folder / "te.json").write_text(json.dumps(rows(2)))
    spec = "hf:json?train=reviews/tr.json&test=reviews/te.json&name=rev"
    (task,) = load_task_sequence(DataConfig(data_dir=str(tmp_path / "data"), tasks=[spec], eval_samples=1))
    assert task.name == "rev" and task.labels == ("neg", "pos")  # sorted distinct labels
    assert len(task.train) == 6 and len(task.test) == 1
    assert task.instruction == "Classify the input (rev). Answer with one of: neg, pos."


def test_folder_of_csv_files_with_column_options(tmp_path: Path) -> None:
    folder = tmp_path / "mycsv"
    folder.mkdir()
    for split, n in (("train", 4), ("test", 2)):
        lines = ["txt,y"] + [f"row {i},{'yes' if i % 2 else 'no'}" for i in range(n)]
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    (folder / "labels.json").write_text(json.dumps(["yes", "no"]))
    (task,) = load_task_sequence(DataConfig(tasks=[f"hf:{folder}?text=txt&label=y"]))
    assert task.name == "mycsv" and task.labels == ("yes", "no")
    assert task.train[1].text == "row 1" and task.train[1].label == "yes"


def _error(spec: str, **kw) -> str:
    with pytest.raises(DataError) as info:
        load_task_sequence(DataConfig(tasks=[spec], **kw))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_hf_errors(tmp_path: Path) -> None:
    only_train = tmp_path / "only_train"
    datasets.DatasetDict(train=datasets.Dataset.from_list(rows(3))).save_to_disk(str(only_train))
    assert "no 'test' split" in _error(f"hf:{only_train}")
    wrong_cols = tmp_path / "wrong_cols"
    ds = datasets.Dataset.from_dict({"text": ["a"], "label": ["x"]})
    datasets.DatasetDict(train=ds, test=ds).save_to_disk(str(wrong_cols))
    msg = _error(f"hf:{wrong_cols}")
    assert "lacks column 'sentence'" in msg and "text=<column>" in msg
    assert "does not exist" in _error("hf:json?train=/nonexistent/a.json&test=/nonexistent/b.json")
    assert "not a directory" in _error(f"hf:{tmp_path / 'missing_dir'}")
    assert "unknown option(s) bogus" in _error(f"hf:{wrong_cols}?bogus=1")
    assert "not in the labels= option" in _error(f"hf:{wrong_cols}?text=text&labels=a|b")
    single = tmp_path / "single"
    datasets.Dataset.from_list(rows(3)).save_to_disk(str(single))
    assert "single Dataset without splits" in _error(f"hf:{single}")
    assert "name no files" in _error("hf:json?train=&test=")
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "ok.json").write_text(json.dumps(rows(2)))
    msg = _error(f"hf:json?train={tmp_path / 'broken.json'}&test={tmp_path / 'ok.json'}")
    assert str(tmp_path / "broken.json") in msg and "neither JSON nor JSON Lines (line 1" in msg
    # A list holding a non-object crashed the process inside the datasets JSON builder (segfault).
    (tmp_path / "nulls.json").write_text('[null, {"sentence": "a", "label": "x"}]')
    msg = _error(f"hf:json?train={tmp_path / 'nulls.json'}&test={tmp_path / 'ok.json'}")
    assert str(tmp_path / "nulls.json") in msg and "row 0 is None, not an object" in msg
    (tmp_path / "latin.json").write_bytes('[{"sentence": "café", "label": "x"}]'.encode("latin-1"))
    msg = _error(f"hf:json?train={tmp_path / 'latin.json'}&test={tmp_path / 'ok.json'}")
    assert str(tmp_path / "latin.json") in msg and "not UTF-8" in msg
