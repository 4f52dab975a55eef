"""Resolve a :class:`DataConfig` into a validated task sequence.

Task specs are resolved in this order: ``"hf:..."`` -> :mod:`hf_source`; an embedded name
(``emb_*``) -> :mod:`embedded`; anything else -> a folder under ``data_dir``: with a ``task.json``
a declared task (:mod:`task_files`: classification, instruction or chat), else a CL_Benchmark folder.
"""

from __future__ import annotations

import random
from pathlib import Path

from .cl_benchmark import available_tasks, find_task_dir, load_cl_task
from .config import DataConfig
from .embedded import EMBEDDED_DEFAULT, embedded_task
from .errors import DataError
from .hf_source import HF_PREFIX, load_hf_task
from .task_files import TASK_FILE, load_task_folder
from .tasks import Task

__all__ = ["EMBEDDED_DEFAULT", "ORDERS", "PAPER_ORDERS", "SUBSTITUTE_ORDERS", "load_task_sequence", "resolve_task"]

#: The O-LoRA / GORP papers' standard orders as CL_Benchmark paths (``<type>/<task>``): 1-3 are the
#: 4-task text-classification orders, 4-6 the 15-task orders of the long benchmark.
PAPER_ORDERS: dict[str, tuple[str, ...]] = {
    "1": ("TC/dbpedia", "SC/amazon", "TC/yahoo", "TC/agnews"),
    "2": ("TC/dbpedia", "SC/amazon", "TC/agnews", "TC/yahoo"),
    "3": ("TC/yahoo", "SC/amazon", "TC/agnews", "TC/dbpedia"),
    "4": ("NLI/MNLI", "NLI/CB", "WiC/WiC", "COPA/COPA", "QQP/QQP", "BoolQA/BoolQA", "NLI/RTE", "SC/IMDB",
          "SC/yelp", "SC/amazon", "SC/SST-2", "TC/dbpedia", "TC/agnews", "MultiRC/MultiRC", "TC/yahoo"),
    "5": ("MultiRC/MultiRC", "BoolQA/BoolQA", "WiC/WiC", "NLI/MNLI", "NLI/CB", "COPA/COPA", "QQP/QQP", "NLI/RTE",
          "SC/IMDB", "SC/SST-2", "TC/dbpedia", "TC/agnews", "SC/yelp", "SC/amazon", "TC/yahoo"),
    "6": ("SC/yelp", "SC/amazon", "NLI/MNLI", "NLI/CB", "COPA/COPA", "QQP/QQP", "NLI/RTE", "SC/IMDB", "SC/SST-2",
          "TC/dbpedia", "TC/agnews", "TC/yahoo", "MultiRC/MultiRC", "BoolQA/BoolQA", "WiC/WiC"),
}

#: Substitutes for the 4-task orders built from the tasks available here (yelp stands in for
#: yahoo, which this project's data lacks): not the papers' orders.
SUBSTITUTE_ORDERS: dict[str, tuple[str, ...]] = {
    "A": ("dbpedia", "amazon", "yelp", "agnews"),
    "B": ("agnews", "yelp", "amazon", "dbpedia"),
    "C": ("yelp", "dbpedia", "agnews", "amazon"),
}

#: Every named order: ``--order 1`` … ``--order 6`` and ``--order A|B|C``.
ORDERS: dict[str, tuple[str, ...]] = {**SUBSTITUTE_ORDERS, **PAPER_ORDERS}


def _unknown(spec: str, data_dir: str | None) -> DataError:
    known = list(EMBEDDED_DEFAULT)
    where = "the embedded suite"
    if data_dir is not None:
        known += available_tasks(data_dir)
        where += f" and {data_dir}"
    return DataError(
        f"unknown task {spec!r}; available in {where}: {', '.join(known)} "
        f"(or use hf:<path> for a datasets source)"
    )


def resolve_task(spec: str, data_dir: str | None) -> Task:
    """Load one task from its spec (see module docstring); raises :class:`DataError`."""
    spec = spec.strip()
    if spec.startswith(HF_PREFIX):
        return load_hf_task(spec, data_dir)
    if spec in EMBEDDED_DEFAULT:
        return embedded_task(spec)
    if data_dir is None:
        raise _unknown(spec, None)
    folder = find_task_dir(data_dir, spec)
    if folder is None:
        raise _unknown(spec, data_dir)
    if (folder / TASK_FILE).is_file():  # a declared task: kind, metric, generation length
        return load_task_folder(folder)
    return load_cl_task(folder)


def _sample(items: list, cap: int | None, key: str) -> list:
    """A deterministic subset of at most ``cap`` items, in their original order."""
    if cap is None or len(items) <= cap:
        return items
    keep = sorted(random.Random(key).sample(range(len(items)), cap))
    return [items[i] for i in keep]


def _check_paper_order(key: str, data_dir: str) -> None:
    """Every task of a paper order must be at its CL_Benchmark path; name the first that is not."""
    root = Path(data_dir).expanduser()
    for path in PAPER_ORDERS[key]:
        folder = root / path
        if not (folder / "labels.json").is_file():
            raise DataError(
                f"order {key}: task {path.rsplit('/', 1)[-1]} is missing from --data-dir: expected "
                f"{folder}/{{train,test,labels}}.json (order {key} = {' -> '.join(p.rsplit('/', 1)[-1] for p in PAPER_ORDERS[key])})"
            )


def _specs(cfg: DataConfig) -> list[str]:
    if cfg.order is not None:
        key = cfg.order.strip().upper()
        if key not in ORDERS:
            raise DataError(
                f"unknown order {cfg.order!r}; known orders: 1-6 (the papers' orders: "
                + "; ".join(f"{k} = {' -> '.join(p.rsplit('/', 1)[-1] for p in v)}" for k, v in PAPER_ORDERS.items() if k < "4")
                + "; 4-6 have 15 tasks), substitutes "
                + "; ".join(f"{k} = {' -> '.join(v)}" for k, v in SUBSTITUTE_ORDERS.items())
                + " (or list data.tasks for a custom sequence)"
            )
        if cfg.data_dir is None:
            raise DataError(
                f"order {key} uses the CL_Benchmark tasks, but data.data_dir is not set; "
                f"point it at a CL_Benchmark folder (e.g. data/CL_Benchmark)"
            )
        if key in PAPER_ORDERS:
            _check_paper_order(key, cfg.data_dir)
        return list(ORDERS[key])
    if cfg.tasks is not None:
        return list(cfg.tasks)
    if cfg.data_dir is None:
        return list(EMBEDDED_DEFAULT)
    raise DataError(
        f"data.data_dir={cfg.data_dir!r} is set but neither data.order nor data.tasks; "
        f"set order to 1-6 or A, B, C, or list the tasks"
    )


def load_task_sequence(cfg: DataConfig) -> list[Task]:
    """The validated task sequence described by ``cfg`` (caps applied); raises :class:`DataError`.

    With neither ``data_dir`` nor ``tasks`` nor ``order`` this is the embedded suite in
    :data:`EMBEDDED_DEFAULT` order.
    """
    cfg.validate()
    if cfg.data_dir is not None:
        root = Path(cfg.data_dir).expanduser()
        if not root.is_dir():
            raise DataError(
                f"data.data_dir {cfg.data_dir!r} {'is not a directory' if root.exists() else 'does not exist'}; "
                f"fix the path (or leave it null for the embedded suite)"
            )
    tasks: list[Task] = []
    names: dict[str, str] = {}
    for spec in _specs(cfg):
        task = resolve_task(spec, cfg.data_dir)
        if task.name in names:
            raise DataError(
                f"tasks {names[task.name]!r} and {spec!r} both load a task named {task.name!r}; "
                f"each task may appear once per sequence (use hf:...&name=<other> to rename)"
            )
        names[task.name] = spec
        task.train = _sample(task.train, cfg.max_train_per_task, f"train:{cfg.seed}:{task.name}")
        task.test = _sample(task.test, cfg.eval_samples, f"eval:{task.name}")
        tasks.append(task)
    return tasks
