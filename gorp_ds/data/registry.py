"""Resolve a :class:`DataConfig` into a validated task sequence.

Task specs are resolved in this order: ``"hf:..."`` -> :mod:`hf_source`; an embedded name
(``emb_*``) -> :mod:`embedded`; anything else -> a folder under ``data_dir``: with a ``task.json``
a declared task (:mod:`task_files`: classification, instruction or chat), else a CL_Benchmark folder.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..log import get_logger
from .cl_benchmark import available_tasks, find_task_dir, load_cl_task
from .config import DataConfig
from .embedded import EMBEDDED_DEFAULT, EMBEDDED_TASKS, embedded_task
from .errors import DataError
from .hf_source import HF_PREFIX, load_hf_task
from .task_files import TASK_FILE, load_task_folder
from .tasks import Task

log = get_logger(__name__)

__all__ = ["EMBEDDED_DEFAULT", "ORDERS", "PAPER_ORDERS", "SHARED_ORDERS", "SUBSTITUTE_ORDERS", "available_in_order",
           "load_eval_tasks", "load_task_sequence", "resolve_task"]

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

#: The ten tasks of the project's shared CL_Benchmark copy (docs/protocol.md) as one sequence:
#: order 4 without the five tasks that copy lacks (MNLI, WiC, QQP, BoolQA, yahoo), so it is what
#: ``--order 4 --allow-substitutes`` runs there, under a name of its own.
SHARED_ORDERS: dict[str, tuple[str, ...]] = {
    "SHARED10": ("NLI/CB", "COPA/COPA", "NLI/RTE", "SC/IMDB", "SC/yelp", "SC/amazon", "SC/SST-2", "TC/dbpedia",
                 "TC/agnews", "MultiRC/MultiRC"),
}

#: Every named order: ``--order 1`` … ``--order 6``, ``--order shared10`` and ``--order A|B|C``
#: (keys upper case; ``--order`` is matched case-insensitively).
ORDERS: dict[str, tuple[str, ...]] = {**SUBSTITUTE_ORDERS, **PAPER_ORDERS, **SHARED_ORDERS}
#: Orders written as CL_Benchmark paths, checked task by task against --data-dir.
_PATH_ORDERS: dict[str, tuple[str, ...]] = {**PAPER_ORDERS, **SHARED_ORDERS}


def _unknown(spec: str, data_dir: str | None) -> DataError:
    known = list(EMBEDDED_TASKS)
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
    if spec in EMBEDDED_TASKS:
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


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def available_in_order(key: str, data_dir: str) -> tuple[list[str], list[str]]:
    """The tasks of the path order ``key`` found in ``data_dir`` (in the order's order) and the
    missing ones, as CL_Benchmark paths."""
    root = Path(data_dir).expanduser()
    present = [p for p in _PATH_ORDERS[key] if (root / p / "labels.json").is_file()]
    return present, [p for p in _PATH_ORDERS[key] if p not in present]


def _check_path_order(key: str, cfg: DataConfig) -> list[str]:
    """The tasks to run for a path order. Every task must be at its CL_Benchmark path; with
    ``allow_substitutes`` the missing ones are left out (the substitution rule, docs/protocol.md:
    nothing is put in their place, since every task of the shared copy already appears in each long
    order and a stand-in picked from whatever else a folder holds would change the benchmark
    silently); the missing tasks and the sequence that runs are logged."""
    assert cfg.data_dir is not None
    present, missing = available_in_order(key, cfg.data_dir)
    shown = "shared10" if key == "SHARED10" else key
    if not missing:
        return present
    if not cfg.allow_substitutes or not present:
        folder = Path(cfg.data_dir).expanduser() / missing[0]
        names = ", ".join(_name(p) for p in missing)
        raise DataError(
            f"order {shown}: task {_name(missing[0])} is missing from --data-dir: expected "
            f"{folder}/{{train,test,labels}}.json (order {shown} = {' -> '.join(map(_name, _PATH_ORDERS[key]))}; "
            f"missing: {names}); add the tasks"
            + (", or pass data.allow_substitutes to run the order without them" if present else "")
        )
    log.warning(f"order {shown}: {len(missing)} of {len(_PATH_ORDERS[key])} tasks are missing from {cfg.data_dir} "
                f"({', '.join(_name(p) for p in missing)}); data.allow_substitutes: they are left out, running "
                f"{len(present)} tasks: {' -> '.join(map(_name, present))}")
    return present


def _specs(cfg: DataConfig) -> list[str]:
    if cfg.order is not None:
        key = cfg.order.strip().upper()
        if key not in ORDERS:
            raise DataError(
                f"unknown order {cfg.order!r}; known orders: 1-6 (the papers' orders: "
                + "; ".join(f"{k} = {' -> '.join(p.rsplit('/', 1)[-1] for p in v)}" for k, v in PAPER_ORDERS.items() if k < "4")
                + "; 4-6 have 15 tasks), shared10 (the ten shared tasks), substitutes "
                + "; ".join(f"{k} = {' -> '.join(v)}" for k, v in SUBSTITUTE_ORDERS.items())
                + " (or list data.tasks for a custom sequence)"
            )
        if cfg.data_dir is None:
            raise DataError(
                f"order {key} uses the CL_Benchmark tasks, but data.data_dir is not set; "
                f"point it at a CL_Benchmark folder (e.g. data/CL_Benchmark)"
            )
        if key in _PATH_ORDERS:
            return _check_path_order(key, cfg)
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


def load_eval_tasks(cfg: DataConfig, trained: list[Task]) -> list[Task]:
    """The tasks of ``cfg.eval_tasks``: evaluated in every row of R, never trained (only their test
    split is kept, capped like the trained tasks'). An eval task that is also trained raises
    :class:`DataError` (it would not be unseen)."""
    if not cfg.eval_tasks:
        return []
    seen = {t.name: "the trained sequence" for t in trained}
    tasks: list[Task] = []
    for spec in cfg.eval_tasks:
        task = resolve_task(spec, cfg.data_dir)
        if task.name in seen:
            raise DataError(
                f"data.eval_tasks: {spec!r} loads task {task.name!r}, which is also in {seen[task.name]}; an "
                f"eval task is never trained: remove it from data.eval_tasks or from the sequence"
            )
        seen[task.name] = "data.eval_tasks"
        task.train = []  # never trained: nothing of it may reach a batch
        task.test = _sample(task.test, cfg.eval_samples, f"eval:{task.name}")
        tasks.append(task)
    return tasks
