"""Task folders that declare their kind and metric: ``<data_dir>/[<type>/]<task>/task.json``.

The folder sits where a CL_Benchmark task would (``--tasks <task>`` or ``<type>/<task>``
finds it); ``task.json`` declares the task::

    {"kind": "instruction", "metric": "rougeL", "max_new_tokens": 64}

- ``kind`` (required): ``classification`` (the CL_Benchmark files ``train.json``, ``test.json``,
  ``labels.json`` beside it), ``instruction`` (records ``{"instruction", "input", "output"}``; the
  answer is ``output``) or ``chat`` (records ``{"messages": [{"role", "content"}, …]}``; the last
  message is the assistant's answer, the ones before it are rendered by the tokenizer's chat template).
- ``metric`` (default: ``accuracy`` for classification, ``rougeL`` for instruction, ``exact_match``
  for chat): a key of :data:`~gorp_ds.data.metrics.TASK_METRICS`. ``accuracy`` needs a label set, so
  only a classification task may declare it.
- ``max_new_tokens`` (default: the longest label + 1 for classification, :data:`DEFAULT_NEW_TOKENS`
  otherwise; at most :data:`MAX_NEW_TOKENS`): tokens generated for each test example.
- ``instruction`` (optional): the instruction of records that have none.

Instruction and chat records are in ``train.jsonl`` / ``test.jsonl`` (one JSON object a line) or
``train.json`` / ``test.json`` (a JSON list). Every problem is a one-line :class:`DataError` naming the
file, the record and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .cl_benchmark import load_cl_task
from .errors import DataError
from .metrics import TASK_METRICS
from .tasks import Example, Task

__all__ = ["DEFAULT_METRIC", "DEFAULT_NEW_TOKENS", "KINDS", "MAX_NEW_TOKENS", "TASK_FILE", "load_task_folder"]

TASK_FILE = "task.json"
KINDS = ("classification", "instruction", "chat")
DEFAULT_METRIC = {"classification": "accuracy", "instruction": "rougeL", "chat": "exact_match"}
#: Generation length of a free-form task that declares none, and the most any task may declare
#: (greedy generation costs one forward pass a token).
DEFAULT_NEW_TOKENS = 64
MAX_NEW_TOKENS = 1024
_FIELDS = ("kind", "metric", "max_new_tokens", "instruction")
_ROLES = ("system", "user", "assistant")
_INSTRUCTION_FORMAT = 'each record must be {"instruction": "...", "input": "...", "output": "..."}'
_CHAT_FORMAT = 'each record must be {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "<answer>"}]}'


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); fix the file") from e


def read_declaration(folder: Path) -> dict[str, Any]:
    """``task.json`` checked: known fields, a known kind, a metric that fits the kind, a bounded length."""
    path = folder / TASK_FILE
    spec = _load_json(path)
    if not isinstance(spec, dict):
        raise DataError(f'{path}: expected a JSON object such as {{"kind": "instruction", "metric": "rougeL"}}')
    unknown = sorted(set(spec) - set(_FIELDS))
    if unknown:
        raise DataError(f"{path}: unknown field {unknown[0]!r}; known fields: {', '.join(_FIELDS)}")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise DataError(f'{path}: field "kind" is {kind!r}; set it to one of {", ".join(KINDS)}')
    metric = spec.get("metric", DEFAULT_METRIC[kind])
    if metric not in TASK_METRICS:
        raise DataError(f'{path}: field "metric" is {metric!r}, an unknown metric; use one of {", ".join(TASK_METRICS)}')
    if TASK_METRICS[metric].needs_labels and kind != "classification":
        raise DataError(f'{path}: field "metric" is {metric!r}, which scores against a label set, but a {kind} task '
                        f"has none; use one of {', '.join(m for m, v in TASK_METRICS.items() if not v.needs_labels)}")
    tokens = spec.get("max_new_tokens")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= MAX_NEW_TOKENS):
        raise DataError(f'{path}: field "max_new_tokens" is {tokens!r}; give an integer from 1 to {MAX_NEW_TOKENS}')
    instruction = spec.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise DataError(f'{path}: field "instruction" is {instruction!r}; give a string')
    return {"kind": kind, "metric": metric, "max_new_tokens": tokens, "instruction": instruction}


def _records(folder: Path, split: str) -> tuple[Path, list[tuple[str, Any]]]:
    """The split's records as (where, record) pairs; ``where`` names the line or entry."""
    for name in (f"{split}.jsonl", f"{split}.json"):
        path = folder / name
        if path.is_file():
            break
    else:
        raise DataError(f"{folder}: no {split}.jsonl or {split}.json; a task folder with {TASK_FILE} needs both splits")
    if path.suffix == ".json":
        data = _load_json(path)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got a JSON {type(data).__name__}")
        return path, [(f"entry {i}", r) for i, r in enumerate(data)]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from e
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {number} is not valid JSON ({e.msg} at column {e.colno}); "
                            "one JSON object per line") from e
    return path, out


def _string(path: Path, where: str, record: dict, key: str, fmt: str, *, empty: bool = False) -> str:
    if key not in record:
        raise DataError(f'{path}: {where} lacks field "{key}"; {fmt}')
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f'{path}: {where} field "{key}" is {type(value).__name__} {value!r}, not a string; {fmt}')
    if not empty and not value.strip():
        raise DataError(f'{path}: {where} field "{key}" is empty; fill it in or remove the record')
    return value


def _instruction_example(path: Path, where: str, record: Any, default: str | None) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{path}: {where} is a {type(record).__name__}, not an object; {_INSTRUCTION_FORMAT}")
    if "instruction" in record or default is None:
        instruction = _string(path, where, record, "instruction", _INSTRUCTION_FORMAT)
    else:
        instruction = default
    text = _string(path, where, record, "input", _INSTRUCTION_FORMAT, empty=True) if "input" in record else ""
    return Example(text=text, label=_string(path, where, record, "output", _INSTRUCTION_FORMAT), instruction=instruction)


def _chat_example(path: Path, where: str, record: Any) -> Example:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise DataError(f'{path}: {where} has no "messages" list; {_CHAT_FORMAT}')
    turns = []
    for i, message in enumerate(record["messages"]):
        at = f"{where} message {i}"
        if not isinstance(message, dict):
            raise DataError(f"{path}: {at} is a {type(message).__name__}, not an object; {_CHAT_FORMAT}")
        role = _string(path, at, message, "role", _CHAT_FORMAT)
        if role not in _ROLES:
            raise DataError(f'{path}: {at} field "role" is {role!r}; use one of {", ".join(_ROLES)}')
        turns.append((role, _string(path, at, message, "content", _CHAT_FORMAT)))
    if len(turns) < 2 or turns[-1][0] != "assistant":
        raise DataError(f'{path}: {where} field "messages" must end with an assistant message (the answer) after at '
                        f"least one other message; {_CHAT_FORMAT}")
    user = [content for role, content in turns[:-1] if role == "user"]
    return Example(text=user[-1] if user else turns[-2][1], label=turns[-1][1], messages=tuple(turns[:-1]))


def load_task_folder(folder: str | Path, name: str | None = None) -> Task:
    """Load and validate a folder with a ``task.json`` (see the module docstring)."""
    folder = Path(folder)
    name = name or folder.name
    spec = read_declaration(folder)
    if spec["kind"] == "classification":
        task = load_cl_task(folder, name)
    else:
        splits = {}
        for split in ("train", "test"):
            path, records = _records(folder, split)
            if spec["kind"] == "instruction":
                splits[split] = [_instruction_example(path, where, r, spec["instruction"]) for where, r in records]
            else:
                splits[split] = [_chat_example(path, where, r) for where, r in records]
            if not splits[split]:
                raise DataError(f"{path}: task {name} has no {split} records; add some")
        task = Task(name=name, labels=(), instruction=spec["instruction"] or "", train=splits["train"],
                    test=splits["test"], kind=spec["kind"])
    task.metric = spec["metric"]
    task.max_new_tokens = spec["max_new_tokens"] or (None if task.labels else DEFAULT_NEW_TOKENS)
    return task
