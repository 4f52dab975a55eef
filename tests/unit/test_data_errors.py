"""Every kind of bad input raises DataError with a one-line message naming the file/field and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gorp_ds.data import DataConfig, DataError, load_task_sequence


def make_task(root: Path, name: str = "mytask", labels=("yes", "no"), train=None, test=None) -> Path:
    folder = root / "TC" / name
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"sentence": f"s{i}", "label": labels[i % len(labels)]} for i in range(4)]
    (folder / "labels.json").write_text(json.dumps(list(labels)))
    (folder / "train.json").write_text(json.dumps(rows if train is None else train))
    (folder / "test.json").write_text(json.dumps(rows if test is None else test))
    return folder


def load_error(root: Path, **kw) -> str:
    kw.setdefault("tasks", ["mytask"])
    with pytest.raises(DataError) as info:
        load_task_sequence(DataConfig(data_dir=str(root), **kw))
    msg = str(info.value)
    assert "\n" not in msg and isinstance(info.value, ValueError)
    return msg


def test_valid_fixture_loads(tmp_path: Path) -> None:
    make_task(tmp_path)
    assert load_task_sequence(DataConfig(data_dir=str(tmp_path), tasks=["mytask"]))[0].labels == ("yes", "no")


@pytest.mark.parametrize("missing", ["train.json", "test.json", "labels.json"])
def test_missing_file(tmp_path: Path, missing: str) -> None:
    folder = make_task(tmp_path)
    (folder / missing).unlink()
    msg = load_error(tmp_path)
    assert str(folder / missing) in msg and "missing" in msg and "train.json, test.json, labels.json" in msg


def test_not_json(tmp_path: Path) -> None:
    folder = make_task(tmp_path)
    (folder / "train.json").write_text('[{"sentence": "a", "label": "yes"},\n oops]')
    msg = load_error(tmp_path)
    assert str(folder / "train.json") in msg and "not valid JSON" in msg and "line 2" in msg


def test_not_a_list(tmp_path: Path) -> None:
    folder = make_task(tmp_path, test={"sentence": "a", "label": "yes"})
    msg = load_error(tmp_path)
    assert str(folder / "test.json") in msg and "JSON list" in msg and "dict" in msg


@pytest.mark.parametrize("field", ["sentence", "label"])
def test_entry_lacks_field(tmp_path: Path, field: str) -> None:
    entry = {"sentence": "x", "label": "yes"}
    del entry[field]
    folder = make_task(tmp_path, train=[{"sentence": "a", "label": "no"}, entry])
    msg = load_error(tmp_path)
    assert str(folder / "train.json") in msg and "entry 1" in msg and f'"{field}"' in msg


def test_entry_not_an_object(tmp_path: Path) -> None:
    folder = make_task(tmp_path, train=[["a", "yes"]])
    msg = load_error(tmp_path)
    assert str(folder / "train.json") in msg and "entry 0" in msg and "not an object" in msg


@pytest.mark.parametrize(
    "field,value", [("sentence", 3), ("label", 1), ("sentence", None), ("label", ["yes"])]
)
def test_non_string_field(tmp_path: Path, field: str, value) -> None:
    entry = {"sentence": "x", "label": "yes", field: value}
    folder = make_task(
        tmp_path, test=[{"sentence": "a", "label": "no"}, {"sentence": "b", "label": "no"}, entry]
    )
    msg = load_error(tmp_path)
    assert (
        str(folder / "test.json") in msg
        and "entry 2" in msg
        and f'"{field}"' in msg
        and "not a string" in msg
    )


def test_label_not_in_labels_json(tmp_path: Path) -> None:
    rows = [
        {"sentence": "a", "label": "yes"},
        {"sentence": "b", "label": "no"},
        {"sentence": "c", "label": "maybe"},
    ]
    folder = make_task(tmp_path, train=rows)
    msg = load_error(tmp_path)
    assert str(folder / "train.json") in msg and "example 2" in msg and "'maybe'" in msg
    assert str(folder / "labels.json") in msg


@pytest.mark.parametrize("labels", [{"a": 1}, [], ["yes", 2], ["Good", "good."]])
def test_bad_labels_json(tmp_path: Path, labels) -> None:
    folder = make_task(tmp_path)
    (folder / "labels.json").write_text(json.dumps(labels))
    msg = load_error(tmp_path)
    assert str(folder / "labels.json") in msg


@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_task(tmp_path: Path, split: str) -> None:
    folder = make_task(tmp_path, **{split: []})
    msg = load_error(tmp_path)
    assert str(folder / f"{split}.json") in msg and f"no {split} examples" in msg


def test_unknown_task_lists_available(tmp_path: Path) -> None:
    make_task(tmp_path)
    make_task(tmp_path, name="other")
    msg = load_error(tmp_path, tasks=["mytask", "nosuch"])
    assert "'nosuch'" in msg and "TC/mytask" in msg and "TC/other" in msg and "emb_color" in msg
    with pytest.raises(DataError, match="unknown task 'dbpedia'.*emb_color"):
        load_task_sequence(DataConfig(tasks=["dbpedia"]))  # no data_dir: only embedded + hf: exist


def test_ambiguous_bare_name(tmp_path: Path) -> None:
    make_task(tmp_path)
    folder = tmp_path / "ZZ" / "mytask"
    folder.mkdir(parents=True)
    for f in ("train.json", "test.json", "labels.json"):
        (folder / f).write_text((tmp_path / "TC" / "mytask" / f).read_text())
    msg = load_error(tmp_path)
    assert "ambiguous" in msg and "TC/mytask" in msg and "ZZ/mytask" in msg


@pytest.mark.parametrize("order", ["D", "7", ""])
def test_unknown_order_lists_known(tmp_path: Path, order: str) -> None:
    msg = load_error(tmp_path, tasks=None, order=order)
    assert "unknown order" in msg and all(f"{k} = " in msg for k in "ABC")


def test_order_and_tasks_exclusive(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="mutually exclusive"):
        DataConfig(data_dir=str(tmp_path), order="A", tasks=["dbpedia"])


def test_order_needs_data_dir() -> None:
    with pytest.raises(DataError, match="data_dir is not set"):
        load_task_sequence(DataConfig(order="A"))


def test_data_dir_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    msg = load_error(missing)
    assert str(missing) in msg and "does not exist" in msg
    file = tmp_path / "file.txt"
    file.write_text("x")
    assert "is not a directory" in load_error(file)


def test_data_dir_without_tasks_or_order(tmp_path: Path) -> None:
    msg = load_error(tmp_path, tasks=None)
    assert "neither data.order nor data.tasks" in msg


def test_duplicate_task_in_sequence(tmp_path: Path) -> None:
    make_task(tmp_path)
    msg = load_error(tmp_path, tasks=["mytask", "TC/mytask"])
    assert "'mytask'" in msg and "once" in msg


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"tasks": "dbpedia"}, "data.tasks"),
        ({"tasks": []}, "data.tasks"),
        ({"tasks": ["ok", 3]}, "data.tasks"),
        ({"max_train_per_task": 0}, "data.max_train_per_task"),
        ({"eval_samples": -5}, "data.eval_samples"),
        ({"max_length": 4}, "data.max_length"),
        ({"seed": "0"}, "data.seed"),
        ({"order": 1}, "data.order"),
    ],
)
def test_bad_config_values(kw: dict, field: str) -> None:
    with pytest.raises(DataError, match=field):
        DataConfig(**kw)


# ------------------------------------------------ encodings, surrogates, sizes (issue 28)
def test_byte_order_mark_is_read_as_utf8(tmp_path: Path) -> None:
    """A UTF-8 file that starts with a byte-order mark (Windows editors write one) is valid UTF-8:
    it loads, and the examples are the file's."""
    folder = make_task(tmp_path)
    rows = [{"sentence": "café", "label": "yes"}, {"sentence": "naïve", "label": "no"}]
    (folder / "train.json").write_bytes(json.dumps(rows, ensure_ascii=False).encode("utf-8-sig"))
    (task,) = load_task_sequence(DataConfig(data_dir=str(tmp_path), tasks=["mytask"]))
    assert [(e.text, e.label) for e in task.train] == [("café", "yes"), ("naïve", "no")]


@pytest.mark.parametrize("encoding,byte", [("utf-16", 0), ("latin-1", 18), ("cp1252", 18)])
def test_other_encodings_are_refused_with_the_byte(tmp_path: Path, encoding: str, byte: int) -> None:
    folder = make_task(tmp_path)
    (folder / "test.json").write_bytes(json.dumps([{"sentence": "café", "label": "yes"}],
                                                  ensure_ascii=False).encode(encoding))
    msg = load_error(tmp_path)
    assert str(folder / "test.json") in msg and "not UTF-8" in msg and f"at byte {byte}" in msg


@pytest.mark.parametrize("text", ["", "  \n", "\ufeff"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    folder = make_task(tmp_path)
    (folder / "labels.json").write_text(text, encoding="utf-8")
    msg = load_error(tmp_path)
    assert str(folder / "labels.json") in msg and "empty" in msg


def test_json_too_deep_or_numbers_too_long(tmp_path: Path) -> None:
    """What Python's json module raises besides JSONDecodeError (RecursionError, ValueError) is a
    DataError naming the file too."""
    folder = make_task(tmp_path)
    (folder / "train.json").write_text("[" * 100_000 + "]" * 100_000)
    msg = load_error(tmp_path)
    assert str(folder / "train.json") in msg and "nested too deeply" in msg
    (folder / "train.json").write_text('[{"sentence": "a", "label": ' + "7" * 5000 + "}]")
    msg = load_error(tmp_path)
    assert str(folder / "train.json") in msg and "not readable JSON" in msg and "digits" in msg


@pytest.mark.parametrize("field", ["sentence", "label"])
def test_lone_surrogate_names_file_entry_and_field(tmp_path: Path, field: str) -> None:
    """JSON may spell a lone UTF-16 surrogate (\\ud800); it is not a character and no tokenizer
    encodes it, so the entry is refused (not repaired: what trains is what the file says)."""
    entry = {"sentence": "fine", "label": "yes"}
    entry[field] = entry[field][:2] + "\ud800" + entry[field][2:]
    folder = make_task(tmp_path, train=[{"sentence": "a", "label": "no"}, entry])  # json.dumps writes \ud800
    assert "\\ud800" in (folder / "train.json").read_text()
    msg = load_error(tmp_path)
    assert str(folder / "train.json") in msg and "entry 1" in msg and f'"{field}"' in msg
    assert "surrogate" in msg and "'\\ud800'" in msg and "at character 2" in msg
    msg.encode("utf-8")  # the message itself prints


def test_lone_surrogate_in_labels_json(tmp_path: Path) -> None:
    folder = make_task(tmp_path, labels=("yes", "no\udfff"))
    msg = load_error(tmp_path)
    assert str(folder / "labels.json") in msg and "entry 1" in msg and "surrogate" in msg


def test_escaped_surrogate_pair_is_one_character(tmp_path: Path) -> None:
    """A pair of escapes (\\ud83d\\ude00) is one legal character, and loads as it."""
    folder = make_task(tmp_path)
    (folder / "train.json").write_text('[{"sentence": "smile \\ud83d\\ude00", "label": "yes"}]')
    (task,) = load_task_sequence(DataConfig(data_dir=str(tmp_path), tasks=["mytask"]))
    assert task.train[0].text == "smile \U0001F600"


def test_huge_values_stay_a_short_line(tmp_path: Path) -> None:
    """A wrong-type or unknown value of a megabyte is quoted cut, so the error stays one short line."""
    folder = make_task(tmp_path, test=[{"sentence": "a", "label": "x" * 1_000_000}])
    msg = load_error(tmp_path)
    assert str(folder / "test.json") in msg and "example 0" in msg and len(msg) < 400
    folder = make_task(tmp_path, test=[{"sentence": ["y" * 1_000_000], "label": "yes"}])
    msg = load_error(tmp_path)
    assert '"sentence" is list' in msg and len(msg) < 400


def test_a_label_too_long_for_the_budget_is_refused_per_task(tmp_path: Path) -> None:
    """check_fits (the session runs it once per task before training) refuses a label that cannot
    fit the length budget, naming the task, instead of failing at the first batch holding it."""
    from transformers import AutoTokenizer

    from gorp_ds.data.tokenize import check_fits, encode_for_training
    from tests.support.tiny_model import make_tokenizer

    tokenizer_dir = tmp_path / "tok"
    make_tokenizer(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    make_task(tmp_path, labels=("yes", "no " * 200))
    (task,) = load_task_sequence(DataConfig(data_dir=str(tmp_path), tasks=["mytask"]))
    with pytest.raises(DataError) as err:
        check_fits(tokenizer, task, 128)
    assert str(err.value).startswith("task mytask:") and "label words" in str(err.value) and len(str(err.value)) < 600
    with pytest.raises(DataError):  # what the first batch holding that label would have raised
        encode_for_training(tokenizer, task, task.train[1], 128)
    check_fits(tokenizer, task, 4096)  # a budget that fits: every example encodes within it
    assert all(len(encode_for_training(tokenizer, task, e, 4096)["input_ids"]) <= 4096 for e in task.train)
