"""Result files: ``results.json``, a markdown table, a heatmap of R, the predictions, ``progress.json``
and the methods summary. Each file is written whole through :mod:`gorp_ds.safe_write` (temporary
file, rename): a full disk or a read-only file system is one :class:`~gorp_ds.safe_write.WriteError`
naming the file, and the files written before it stay as they were.

Rank 0 writes; :func:`on_rank0` makes every rank stop together when its write fails."""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..data.tasks import Task
from ..safe_write import WriteError, write_file, write_json
from .agree import agree_on_errors
from .metrics import eval_task_metrics

T = TypeVar("T")


def on_rank0(rank: int, write: Callable[[], T]) -> T | None:
    """``write()`` on rank 0 (None elsewhere); when it fails with a WriteError every rank raises
    (rank 0 its own error, the others the same message naming rank 0), so that no rank is left
    waiting in a collective for one that stopped. Collective."""
    error, result = None, None
    if rank == 0:
        try:
            result = write()
        except WriteError as err:
            error = err
    agree_on_errors(error)
    return result


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def r_matrix(rows: dict[int, list[float]], tasks: int) -> list[list[float] | None]:
    """(T+1)×T list of lists; rows that were not measured are ``None``."""
    return [rows.get(i) for i in range(tasks + 1)]


def _row_label(i: int, task_names: list[str], eval_only: bool) -> str:
    if eval_only:
        return "evaluated"
    return "before training" if i == 0 else f"task {i} ({task_names[i - 1]})"


def _column_names(task_names: list[str], task_metrics: list[str] | None) -> list[str]:
    """A column's header names its metric (``task (rougeL)``) when a task is not scored by accuracy."""
    if task_metrics and any(m != "accuracy" for m in task_metrics):
        return [f"{n} ({m})" for n, m in zip(task_names, task_metrics)]
    return task_names


def markdown_table(method: str, task_names: list[str], r: list[list[float] | None], metrics: dict[str, Any],
                   eval_only: bool = False, task_metrics: list[str] | None = None) -> str:
    """R as a table; a column's header names its metric (``task (rougeL)``) when a task is not scored by accuracy."""
    shown = _column_names(task_names, task_metrics)
    header = "| after \\ on | " + " | ".join(shown) + " |"
    lines = [f"## {method}", "", header, "|" + "---|" * (len(task_names) + 1)]
    for i, row in enumerate(r):
        label = _row_label(i, task_names, eval_only)
        cells = " | ".join(_fmt(v) for v in row) if row is not None else " | ".join("–" for _ in task_names)
        lines.append(f"| {label} | {cells} |")
    lines += ["", "| AA | BWT | FWT | forgetting |", "|---|---|---|---|",
              f"| {_fmt(metrics['AA'])} | {_fmt(metrics['BWT'])} | {_fmt(metrics['FWT'])} | {_fmt(metrics['forgetting'])} |"]
    return "\n".join(lines) + "\n"


def eval_tasks_table(result: dict[str, Any]) -> str:
    """The eval tasks' rows (--eval-tasks, never trained) and their metrics; "" without eval tasks."""
    section = result.get("eval_tasks")
    if not section:
        return ""
    names, rows = section["tasks"], section["R"]
    shown = _column_names(names, section.get("task_metrics"))
    lines = ["", "Eval tasks (never trained):", "", "| after \\ on | " + " | ".join(shown) + " |",
             "|" + "---|" * (len(names) + 1)]
    for i, row in enumerate(rows):
        cells = " | ".join(_fmt(v) for v in row) if row is not None else " | ".join("–" for _ in names)
        lines.append(f"| {_row_label(i, result['tasks'], bool(result.get('eval_only')))} | {cells} |")
    m = section["metrics"]
    lines += ["", "| eval mean | generalisation |", "|---|---|", f"| {_fmt(m['eval_mean'])} | {_fmt(m['generalisation'])} |"]
    return "\n".join(lines) + "\n"


def heatmap(method: str, task_names: list[str], r: list[list[float] | None], eval_only: bool = False,
            task_metrics: list[str] | None = None) -> bytes:
    """R as a PNG image (its bytes: written like every other file, whole or not at all)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[np.nan] * len(task_names) if row is None else row for row in r], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(task_names), 1.0 + 0.6 * len(r)))
    image = ax.imshow(values, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(task_names)), task_names, rotation=30, ha="right")
    ax.set_yticks(range(len(r)), ["evaluated"] if eval_only else ["before"] + [f"after {i}" for i in range(1, len(r))])
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.0f}", ha="center", va="center",
                        color="white" if values[i, j] < 60 else "black", fontsize=8)
    mixed = task_metrics and any(m != "accuracy" for m in task_metrics)
    scale = "each task's metric, 0-100" if mixed else "accuracy %"
    ax.set_title(f"R ({scale}) — {method}")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    image_bytes = io.BytesIO()
    fig.savefig(image_bytes, format="png", dpi=120)
    plt.close(fig)
    return image_bytes.getvalue()


def is_finished(result: dict[str, Any]) -> bool:
    """Whether a method's ``results.json`` is its last write (a --resume skips the method). The
    runner writes it before the final export with ``finished`` false, so that a failed export
    keeps R; results from before the field existed were only written last."""
    return result.get("finished", True) is not False


def write_method_results(out_dir: str, result: dict[str, Any], note: str = "") -> None:
    """``results.json``, ``results.md``, ``R.png`` in ``out_dir``, each written whole. ``note``: what a
    failed write leaves intact (the checkpoint to resume from), for its message."""
    eval_only = bool(result.get("eval_only"))
    task_metrics = result.get("task_metrics")
    write_json(os.path.join(out_dir, "results.json"), result, what="the results", site="results", note=note)
    table = markdown_table(result["method"], result["tasks"], result["R"], result["metrics"], eval_only=eval_only,
                           task_metrics=task_metrics) + eval_tasks_table(result)
    write_file(os.path.join(out_dir, "results.md"), table, what="the results table", site="results", note=note)
    write_file(os.path.join(out_dir, "R.png"), heatmap(result["method"], result["tasks"], result["R"], eval_only,
                                                       task_metrics),
               what="the heatmap of R", site="results", note=note)


def eval_tasks_section(full: Sequence[list[float] | None], trained: int, eval_tasks: list[Task], predictions: bool,
                       row_names: Sequence[int | str] | None = None) -> dict[str, Any]:
    """``{"eval_tasks": {"tasks", "task_metrics", "R", "metrics", "predictions"}}`` for --eval-tasks
    (nothing without them): their matrix cut from the measured rows' columns after the ``trained``
    tasks' (the runner: (T+1) × E; --eval-only: 1 × E), each column's metric, metrics.eval_task_metrics
    of it (eval_mean, generalisation) and the JSONL of each cell, numbered after the trained tasks'
    columns. ``row_names``: each row's name in the predictions files (default its index; --eval-only: "eval")."""
    if not eval_tasks:
        return {}
    e = [None if row is None else row[trained:] for row in full]
    names = [t.name for t in eval_tasks]
    keys = list(range(len(e))) if row_names is None else list(row_names)
    return {"eval_tasks": {
        "tasks": names, "task_metrics": [t.metric for t in eval_tasks], "R": e, "metrics": eval_task_metrics(e),
        "predictions": [[predictions_file(key, trained + k, n) for k, n in enumerate(names)]
                        if row is not None and predictions else None for key, row in zip(keys, e)]}}


def predictions_file(row: int | str, column: int, task: str) -> str:
    """Where R[row][column]'s predictions go, relative to the method's directory."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", task)
    prefix = f"R{row:02d}" if isinstance(row, int) else row
    return f"predictions/{prefix}_{column + 1:02d}_{safe}.jsonl"


def write_predictions(out_dir: str, row: int | str, task_names: list[str],
                      predictions: list[list[dict[str, Any]]], note: str = "") -> list[str]:
    """One JSONL per task (one line per test example, in test-set order), each written whole;
    returns the relative paths."""
    paths = []
    for column, (task, records) in enumerate(zip(task_names, predictions)):
        relative = predictions_file(row, column, task)
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        write_file(os.path.join(out_dir, relative), lines, what=f"the predictions on {task}", site="predictions",
                   note=note)
        paths.append(relative)
    return paths


def write_progress(out_dir: str, state: dict[str, Any], note: str = "") -> None:
    """``progress.json``: where the run stands and the rows of R so far."""
    write_json(os.path.join(out_dir, "progress.json"), state, what="the progress record", site="progress", note=note)


def summary_table(results: list[dict[str, Any]]) -> str:
    # --eval-tasks add two columns: the eval tasks' mean after the sequence and its generalisation.
    unseen = any(r.get("eval_tasks") for r in results)
    extra = (" eval mean | generalisation |", "---|---|") if unseen else ("", "")
    lines = ["| method | AA | BWT | FWT | forgetting | train s | peak memory GiB |" + extra[0],
             "|---|---|---|---|---|---|---|" + extra[1]]
    for r in results:
        m = r["metrics"]
        e = (r.get("eval_tasks") or {}).get("metrics", {})
        cells = f" {_fmt(e.get('eval_mean'))} | {_fmt(e.get('generalisation'))} |" if unseen else ""
        lines.append(f"| {r['method']} | {_fmt(m['AA'])} | {_fmt(m['BWT'])} | {_fmt(m['FWT'])} | "
                     f"{_fmt(m['forgetting'])} | {r['timings']['train_s']:.0f} | {_gib(r.get('peak_memory_gib'))} |" + cells)
    return "\n".join(lines) + "\n"


def _gib(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.2f}"


def write_summary(out_dir: str, results: list[dict[str, Any]]) -> str:
    table = summary_table(results)
    text = "# Methods compared\n\n" + table + "\n" + "".join(
        "\n" + markdown_table(r["method"], r["tasks"], r["R"], r["metrics"], task_metrics=r.get("task_metrics"))
        + eval_tasks_table(r) for r in results)
    note = "every method's results.json is written"
    write_file(os.path.join(out_dir, "summary.md"), text, what="the methods summary", site="summary", note=note)
    write_json(os.path.join(out_dir, "summary.json"), {r["method"]: {**r["metrics"], **(r.get("eval_tasks") or {}).get("metrics", {})} for r in results},
               what="the methods summary", site="summary", note=note)
    return table
