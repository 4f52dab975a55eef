"""Tasks from any ``datasets`` source with ``sentence``/``label`` columns: ``"hf:<spec>"``.

Spec grammar (no hub access is assumed; everything stays generic)::

    hf:<dir>[?options]                 a directory written by save_to_disk (a DatasetDict with
                                       train/test splits) or a folder of data files that
                                       datasets.load_dataset(<dir>) understands (train.json, test.csv, ...)
    hf:<builder>?train=<files>&test=<files>[&options]
                                       datasets.load_dataset(<builder>, data_files={"train": [...],
                                       "test": [...]}), e.g. hf:json?train=a/train.json&test=a/test.json

Files are comma-separated; relative paths are resolved against ``data_dir`` when that exists, else
the working directory. Options: ``name`` (task name; default: the directory name), ``text`` and
``label`` (column names, default ``sentence``/``label``), ``train_split``/``test_split`` (default
``train``/``test``), ``labels`` (label words separated by ``|``). Label words come from
``labels``, else a ``ClassLabel`` feature, else a ``labels.json`` next to the data, else the sorted
distinct labels of the data. Integer labels without names become their decimal strings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from ..log import show_progress
from .errors import DataError
from .tasks import Example, Task, lone_surrogate
from .templates import instruction_for
from .tokenize import normalize_answer

__all__ = ["HF_PREFIX", "load_hf_task"]

HF_PREFIX = "hf:"
_OPTIONS = ("train", "test", "name", "text", "label", "train_split", "test_split", "labels")


def _parse(spec: str) -> tuple[str, dict[str, str]]:
    body = spec[len(HF_PREFIX) :] if spec.startswith(HF_PREFIX) else spec
    source, _, query = body.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False)) if query else {}
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise DataError(
            f"task {spec!r}: unknown option(s) {', '.join(unknown)}; known: {', '.join(_OPTIONS)}"
        )
    if not source.strip():
        raise DataError(
            f"task {spec!r}: nothing after 'hf:'; give a directory or a builder, e.g. hf:json?train=...&test=..."
        )
    return source.strip(), options


def _resolve(path: str, data_dir: str | None) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and data_dir is not None and (Path(data_dir) / p).exists():
        return Path(data_dir) / p
    return p


def _load(spec: str, source: str, opts: dict[str, str], data_dir: str | None) -> tuple[Any, Path | None]:
    """The DatasetDict-like object and the folder the data lives in (for labels.json / the name)."""
    import datasets  # lazy: importing datasets costs a second or two

    if not show_progress():  # every rank loads the data; one node's bars would share a line
        datasets.utils.disable_progress_bars()
    try:
        if "train" in opts or "test" in opts:
            files = {
                split: [str(_resolve(f, data_dir)) for f in opts[split].split(",") if f.strip()]
                for split in ("train", "test")
                if opts.get(split)
            }
            if not files:
                raise DataError(f"task {spec!r}: train= and test= name no files; give comma-separated paths")
            for paths in files.values():
                for f in paths:
                    if not Path(f).is_file():
                        raise DataError(f"task {spec!r}: data file {f} does not exist; fix the path")
            folder = Path(next(iter(files.values()))[0]).parent
            for paths in files.values():
                for f in paths:
                    _check_json_file(spec, Path(f))
            return datasets.load_dataset(source, data_files=files), folder
        folder = _resolve(source, data_dir)
        if not folder.is_dir():
            raise DataError(
                f"task {spec!r}: {folder} is not a directory; point hf: at a save_to_disk folder or a "
                f"folder of data files, or use hf:<builder>?train=<files>&test=<files>"
            )
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            return datasets.load_from_disk(str(folder)), folder
        for f in _data_files(folder):
            _check_json_file(spec, f)
        return datasets.load_dataset(str(folder)), folder
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; report them all the same way
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"task {spec!r}: datasets could not load it ({type(e).__name__}: {first})") from e


_SPLIT_WORDS = ("train", "test", "valid", "dev", "eval")


def _data_files(folder: Path) -> list[Path]:
    """The JSON files of a folder that ``datasets`` reads as data: those named after a split when
    there are any (it assigns files to splits by such names), else every one but labels.json."""
    found = sorted(f for f in folder.iterdir() if f.suffix in (".json", ".jsonl") and f.name != "labels.json")
    named = [f for f in found if any(word in f.name.lower() for word in _SPLIT_WORDS)]
    return named or found


def _check_json_file(spec: str, path: Path) -> None:
    """A ``.json``/``.jsonl`` data file must be UTF-8 JSON rows (a list of objects, or one object
    per line) before ``datasets`` reads it: its JSON builder crashes the whole process with a
    segmentation fault on a list holding anything but objects (``[null, {...}]``), where no error
    message is possible."""
    if path.suffix not in (".json", ".jsonl") or not path.is_file():
        return
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"task {spec!r}: {path} is not UTF-8 text ({e.reason} at byte {e.start}); re-save it as "
                        "UTF-8 JSON") from e
    if not text.strip():
        raise DataError(f"task {spec!r}: {path} is empty; it must hold JSON rows with the text and label columns")
    try:
        rows = json.loads(text)
        where = "row"
    except (ValueError, RecursionError):
        rows, where = [], "line"
        for number, line in enumerate(text.splitlines(), 1):
            try:
                rows.append(json.loads(line) if line.strip() else {})
            except (ValueError, RecursionError) as e:
                raise DataError(f"task {spec!r}: {path} is neither JSON nor JSON Lines (line {number}: "
                                f"{_short(e, 80)}); fix or re-export the file") from e
    for index, row in enumerate(rows if isinstance(rows, list) else [rows]):
        if not isinstance(row, dict):
            number = index if where == "row" else index + 1
            raise DataError(f"task {spec!r}: {path} {where} {number} is {_short(repr(row), 40)}, not an object; "
                            "each row must be an object with the text and label columns")


def _split(spec: str, dd: Any, split: str, option: str) -> Any:
    if not hasattr(dd, "keys"):
        raise DataError(
            f"task {spec!r}: the source is a single Dataset without splits; save a DatasetDict with "
            f"'train' and 'test' splits (or pass train=/test= files)"
        )
    if split not in dd:
        raise DataError(
            f"task {spec!r}: no {split!r} split (has: {', '.join(dd.keys())}); add it or set {option}=<split>"
        )
    return dd[split]


def _short(value: Any, limit: int = 160) -> str:
    """A value or exception as one line of at most ``limit`` characters."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_text(where: str, value: str) -> None:
    """Text that cannot be tokenized is refused when loaded (see :func:`.tasks.lone_surrogate`)."""
    index = lone_surrogate(value)
    if index is not None:
        raise DataError(f"{where} holds a lone UTF-16 surrogate {value[index]!r} at character {index}, which is not "
                        "a character and cannot be tokenized (half of an escaped surrogate pair); fix the escape or "
                        "remove it")


def _label_names(ds: Any, column: str) -> list[str] | None:
    feature = ds.features.get(column)
    names = getattr(feature, "names", None)
    return list(names) if names else None


def _examples(spec: str, ds: Any, split: str, text_col: str, label_col: str) -> list[Example]:
    for col in (text_col, label_col):
        if col not in ds.column_names:
            raise DataError(
                f"task {spec!r}: split {split!r} lacks column {col!r} (has: {', '.join(ds.column_names)}); "
                f"rename it or set {'text' if col == text_col else 'label'}=<column>"
            )
    names = _label_names(ds, label_col)
    out = []
    for i, (text, label) in enumerate(zip(ds[text_col], ds[label_col], strict=True)):
        if not isinstance(text, str):
            raise DataError(
                f"task {spec!r}: split {split!r} example {i} column {text_col!r} is {_short(repr(text), 60)}, "
                "not a string"
            )
        _check_text(f"task {spec!r}: split {split!r} example {i} column {text_col!r}", text)
        if not text.strip():
            raise DataError(f"task {spec!r}: split {split!r} example {i} column {text_col!r} is empty; "
                            "fill it in or filter the dataset")
        if isinstance(label, int) and not isinstance(label, bool):
            label = names[label] if names and 0 <= label < len(names) else str(label)
        if not isinstance(label, str):
            raise DataError(
                f"task {spec!r}: split {split!r} example {i} column {label_col!r} is {_short(repr(label), 60)}; "
                f"labels must be strings or class ids"
            )
        _check_text(f"task {spec!r}: split {split!r} example {i} column {label_col!r}", label)
        out.append(Example(text=text, label=label))
    return out


def _labels(
    spec: str, opts: dict[str, str], ds: Any, label_col: str, folder: Path | None, examples: list[Example]
) -> tuple[tuple[str, ...], str]:
    if opts.get("labels"):
        return tuple(x for x in opts["labels"].split("|") if x), "the labels= option"
    names = _label_names(ds, label_col)
    if names:
        return tuple(names), f"the ClassLabel of column {label_col!r}"
    if folder is not None and (folder / "labels.json").is_file():
        path = folder / "labels.json"
        try:
            data = json.loads(path.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8 JSON "
                            "or pass labels=a|b|c") from e
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise DataError(f"{path}: not valid JSON ({_short(e)}); fix it or pass labels=a|b|c") from e
        if not isinstance(data, list) or not data or not all(isinstance(x, str) for x in data):
            raise DataError(f'{path}: expected a non-empty JSON list of label strings, e.g. ["Good", "Bad"]')
        for i, word in enumerate(data):
            _check_text(f"{path}: entry {i}", word)
        return tuple(data), str(path)
    return tuple(sorted({e.label for e in examples})), "the data"


def load_hf_task(spec: str, data_dir: str | None = None) -> Task:
    """Load and validate the task described by ``spec`` (``"hf:..."``)."""
    source, opts = _parse(spec)
    dd, folder = _load(spec, source, opts, data_dir)
    text_col, label_col = opts.get("text") or "sentence", opts.get("label") or "label"
    splits: dict[str, list[Example]] = {}
    first = None
    for split, option in (("train", "train_split"), ("test", "test_split")):
        name = opts.get(option) or split
        ds = _split(spec, dd, name, option)
        first = first if first is not None else ds
        splits[split] = _examples(spec, ds, name, text_col, label_col)
        if not splits[split]:
            raise DataError(
                f"task {spec!r}: split {name!r} has no examples; add some or choose another split"
            )
    labels, origin = _labels(spec, opts, first, label_col, folder, splits["train"] + splits["test"])
    norms = [normalize_answer(x) for x in labels]
    if not all(norms) or len(set(norms)) != len(norms):
        raise DataError(
            f"task {spec!r}: label words {labels} from {origin} are empty or not distinct after normalisation"
        )
    allowed = set(labels)
    for split, examples in splits.items():
        for i, e in enumerate(examples):
            if e.label not in allowed:
                raise DataError(
                    f"task {spec!r}: {split} example {i} has label {e.label!r}, not in {origin} "
                    f"({', '.join(labels)}); fix the example or the label list"
                )
    task_name = opts.get("name") or (folder.name if folder is not None and folder.name else source)
    return Task(
        name=task_name,
        labels=labels,
        instruction=instruction_for(task_name, labels),
        train=splits["train"],
        test=splits["test"],
    )
