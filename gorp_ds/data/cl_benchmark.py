"""Loader for O-LoRA's CL_Benchmark layout: ``<data_dir>/<type>/<task>/{train,test,labels}.json``.

``train.json``/``test.json`` are JSON lists of ``{"sentence": str, "label": str}``; ``labels.json``
is the list of label words. Everything is validated on load; any problem raises a one-line
:class:`DataError` naming the file, the entry/field and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import DataError
from .tasks import Example, Task, lone_surrogate
from .templates import instruction_for
from .tokenize import normalize_answer

__all__ = ["TASK_FILES", "available_tasks", "find_task_dir", "load_cl_task"]

TASK_FILES = ("train.json", "test.json", "labels.json")
_ENTRY_FORMAT = 'each entry must be {"sentence": "<text>", "label": "<label word>"}'


def _read_json(path: Path) -> Any:
    """The JSON value of a UTF-8 file (a leading byte-order mark allowed: it is valid UTF-8 that
    Windows editors write), or a DataError naming the file and the fix."""
    if not path.is_file():
        what = "not a file" if path.exists() else "file missing"
        raise DataError(f"{path}: {what}; a CL_Benchmark task folder needs {', '.join(TASK_FILES)}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8 JSON"
        ) from e
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e}); fix its permissions or replace it") from e
    if not text.strip():
        raise DataError(f"{path}: the file is empty; it must hold a JSON list (see the CL_Benchmark layout)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); fix or re-export the file"
        ) from e
    except RecursionError as e:
        raise DataError(f"{path}: JSON nested too deeply to read; a task file is a flat list of objects") from e
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise DataError(f"{path}: not readable JSON ({' '.join(str(e).split())[:120]}); fix or re-export the file") from e


def _check_text(path: Path, where: str, value: str) -> None:
    """Text that cannot be tokenized is refused when loaded (see :func:`.tasks.lone_surrogate`)."""
    index = lone_surrogate(value)
    if index is not None:
        raise DataError(
            f"{path}: {where} holds a lone UTF-16 surrogate {value[index]!r} at character {index}, which is not a "
            "character and cannot be tokenized (half of an escaped surrogate pair); fix the escape or remove it"
        )


def _shown(value: Any, limit: int = 60) -> str:
    """``repr`` of a value from a file, cut to ``limit`` characters (a huge value stays a short line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown_list(labels: tuple[str, ...], count: int = 20) -> str:
    """The label words for a message: at most ``count``, each at most 40 characters."""
    more = f", ... ({len(labels) - count} more)" if len(labels) > count else ""
    return ", ".join(x if len(x) <= 40 else x[:37] + "..." for x in labels[:count]) + more


def _load_labels(path: Path) -> tuple[str, ...]:
    data = _read_json(path)
    if not isinstance(data, list) or not data:
        raise DataError(f'{path}: expected a non-empty JSON list of label words, e.g. ["Good", "Bad"]')
    seen: dict[str, str] = {}
    for i, label in enumerate(data):
        if not isinstance(label, str) or not normalize_answer(label):
            raise DataError(f"{path}: entry {i} is {_shown(label)}; every label must be a non-empty string "
                            "(of letters or digits, not only punctuation)")
        _check_text(path, f"entry {i}", label)
        norm = normalize_answer(label)
        if norm in seen:
            raise DataError(
                f"{path}: labels {seen[norm]!r} and {label!r} are the same after normalisation "
                f"(case/punctuation), so answers could not be told apart; make them distinct"
            )
        seen[norm] = label
    return tuple(data)


def _load_examples(path: Path, labels: tuple[str, ...], labels_path: Path) -> list[Example]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON list of examples, got a JSON {type(data).__name__}; {_ENTRY_FORMAT}"
        )
    allowed = set(labels)
    examples: list[Example] = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: entry {i} is a {type(entry).__name__}, not an object; {_ENTRY_FORMAT}")
        for key in ("sentence", "label"):
            if key not in entry:
                raise DataError(f'{path}: entry {i} lacks field "{key}"; {_ENTRY_FORMAT}')
            if not isinstance(entry[key], str):
                raise DataError(
                    f'{path}: entry {i} field "{key}" is {type(entry[key]).__name__} {_shown(entry[key])}, '
                    f"not a string; {_ENTRY_FORMAT}"
                )
            _check_text(path, f'entry {i} field "{key}"', entry[key])
        if not entry["sentence"].strip():
            raise DataError(f'{path}: entry {i} has an empty "sentence" (nothing to learn from or answer); '
                            "fill it in or remove the entry")
        if entry["label"] not in allowed:
            raise DataError(
                f"{path}: example {i} has label {_shown(entry['label'])}, which is not in {labels_path} "
                f"({_shown_list(labels)}); add it to labels.json or fix the example"
            )
        examples.append(Example(text=entry["sentence"], label=entry["label"]))
    return examples


def load_cl_task(folder: str | Path, name: str | None = None) -> Task:
    """Load and validate one task folder; the task name defaults to the folder name."""
    folder = Path(folder)
    name = name or folder.name
    labels_path = folder / "labels.json"
    labels = _load_labels(labels_path)
    splits = {}
    for split in ("train", "test"):
        path = folder / f"{split}.json"
        splits[split] = _load_examples(path, labels, labels_path)
        if not splits[split]:
            raise DataError(
                f"{path}: task {name} has no {split} examples; add some (the file is an empty list)"
            )
    return Task(
        name=name,
        labels=labels,
        instruction=instruction_for(name, labels),
        train=splits["train"],
        test=splits["test"],
    )


def _is_task_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in (*TASK_FILES, "task.json"))  # task_files.TASK_FILE


def available_tasks(data_dir: str | Path) -> list[str]:
    """Task folders under ``data_dir`` (depth 1 or 2), as ``"type/task"`` or ``"task"`` paths."""
    root = Path(data_dir)
    found: list[str] = []
    if not root.is_dir():
        return found
    for child in sorted(root.iterdir()):
        if _is_task_dir(child):
            found.append(child.name)
        elif child.is_dir():
            found.extend(f"{child.name}/{g.name}" for g in sorted(child.iterdir()) if _is_task_dir(g))
    return found


def find_task_dir(data_dir: str | Path, spec: str) -> Path | None:
    """Resolve ``spec`` (``"dbpedia"``, ``"TC/dbpedia"`` or a path relative to ``data_dir``) to a
    folder, or ``None`` if nothing matches. Bare names are looked up one level down too, exactly
    first and then case-insensitively; an ambiguous bare name raises :class:`DataError`."""
    root = Path(data_dir)
    spec = spec.replace("\\", "/").strip().rstrip("/")
    direct = root / spec
    if direct.is_dir():
        return direct
    if "/" in spec:
        return None
    tasks = available_tasks(root)
    for match in (
        lambda t: t.rsplit("/", 1)[-1] == spec,
        lambda t: t.rsplit("/", 1)[-1].lower() == spec.lower(),
    ):
        hits = [t for t in tasks if match(t)]
        if len(hits) > 1:
            raise DataError(
                f"task {spec!r} is ambiguous in {root}: {', '.join(hits)}; name it with its type folder"
            )
        if hits:
            return root / hits[0]
    return None
