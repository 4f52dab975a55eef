"""Continual-learning metrics as pure functions of the matrix R of per-task scores (docs/algorithm.md §7).

``R`` has ``T + 1`` rows and ``T`` columns: ``R[i][j]`` is task ``j``'s own metric (0-100: accuracy in
percent for classification, ROUGE-L or exact match for free-form tasks; gorp_ds/data/metrics.py) on
task ``j`` (0-based column) after training tasks ``1..i``; row 0 is the model before any training. Rows that
were not measured (multi-task training has only rows 0 and T) are ``None``.

With 1-based task indices as in docs/algorithm.md, column ``j`` holds task ``j+1``:
- AA = mean_j R[T][j]
- BWT = mean_{j<T} (R[T][j] − R[j][j])
- FWT = mean_{j≥2} (R[j−1][j] − R[0][j])
- Forgetting = mean_{j<T} (max_{1≤i<T} R[i][j] − R[T][j])

Eval tasks (``--eval-tasks``, never trained) have their own ``(T + 1) × E`` matrix ``E_R`` with the
same rows: ``E_R[i][k]`` is eval task ``k``'s own metric after training tasks ``1..i``.
- eval mean = mean_k E_R[T][k]
- generalisation = mean_k (E_R[T][k] − E_R[0][k]): what training the sequence did to unseen tasks
``--eval-only`` measures one row (the evaluated model, no row before training): its eval mean, no
generalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float] | None]


def _check(r: Matrix) -> int:
    tasks = len(r) - 1
    if tasks < 1:
        raise ValueError("R needs at least two rows (before training and after task 1)")
    for i, row in enumerate(r):
        if row is not None and len(row) != tasks:
            raise ValueError(f"R row {i} has {len(row)} entries, expected {tasks}")
    if r[tasks] is None:
        raise ValueError("R's last row (after the final task) is required")
    return tasks


def average_accuracy(r: Matrix) -> float:
    tasks = _check(r)
    return sum(r[tasks]) / tasks


def backward_transfer(r: Matrix) -> float | None:
    tasks = _check(r)
    if tasks < 2 or any(r[i] is None for i in range(1, tasks)):
        return None
    return sum(r[tasks][j] - r[j + 1][j] for j in range(tasks - 1)) / (tasks - 1)


def forward_transfer(r: Matrix) -> float | None:
    tasks = _check(r)
    if tasks < 2 or r[0] is None or any(r[i] is None for i in range(1, tasks)):
        return None
    # task j (1-based, j >= 2) sits in column j-1; R[j-1] is the row after training task j-1.
    return sum(r[j - 1][j - 1] - r[0][j - 1] for j in range(2, tasks + 1)) / (tasks - 1)


def forgetting(r: Matrix) -> float | None:
    tasks = _check(r)
    if tasks < 2 or any(r[i] is None for i in range(1, tasks)):
        return None
    total = 0.0
    for j in range(tasks - 1):  # task j+1 (1-based)
        best = max(r[i][j] for i in range(1, tasks))
        total += best - r[tasks][j]
    return total / (tasks - 1)


def all_metrics(r: Matrix) -> dict[str, float | None]:
    return {"AA": average_accuracy(r), "BWT": backward_transfer(r), "FWT": forward_transfer(r),
            "forgetting": forgetting(r)}


def eval_task_metrics(e: Matrix) -> dict[str, float | None]:
    """``eval_mean`` and ``generalisation`` of the eval tasks' matrix ``e`` (``T + 1`` rows, one
    column per eval task; see the module docstring; ``--eval-only``: one row). ``generalisation`` is
    None without row 0 (one row is only the last)."""
    if not e or e[-1] is None or not e[-1]:
        raise ValueError("the eval tasks' matrix needs a last row (after the final task) with at least one task")
    columns = len(e[-1])
    for i, row in enumerate(e):
        if row is not None and len(row) != columns:
            raise ValueError(f"eval-task row {i} has {len(row)} entries, expected {columns}")
    after, before = e[-1], e[0] if len(e) > 1 else None
    return {"eval_mean": sum(after) / columns,
            "generalisation": None if before is None else sum(a - b for a, b in zip(after, before)) / columns}
