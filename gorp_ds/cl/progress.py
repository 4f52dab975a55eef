"""Where a method's run stands (:class:`Progress`), and the one numbering of tasks a user sees.

Inside the code a task is its index in the schedule, from 0: ``range(len(schedule))``, the
data-order and LoRA-initialisation seeds, the ``GORP_DS_*_AT`` test hooks. Everything a user sees
numbers tasks from 1: log lines, checkpoint tags, ``progress.json``, the ``task`` of a
``config_changes`` entry, the per-task timings (``train_s/<n>``, ``tokens/<n>``) and the exports
after each task (``export/task_<n>``). :func:`task_number` is the one conversion from index to
number, :meth:`Progress.from_state` the one way back; nothing else adds or subtracts one. (Rows of
R are counted, not numbered: row ``n`` is measured after ``n`` tasks, so it is also "after task n".)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# Timings kept per task, keyed "<prefix><task number>" (eval_s/ is keyed by R's row, export_*/ by label).
PER_TASK_TIMINGS = ("train_s/", "tokens/")
_TAG = re.compile(r"task(\d+)_step(\d+)")


def task_number(index: int) -> int:
    """The number users see for the task at ``index`` (0-based) in the schedule: from 1."""
    return index + 1


@dataclass
class Progress:
    """Where a method's run stands; stored in every checkpoint, and in ``progress.json`` after each row of R."""

    # The position: `step` optimizer steps done of the task at index `task` (0-based; users see
    # task_number(task)). The runner moves it to (task + 1, 0) once the task is closed.
    task: int = 0
    step: int = 0
    rows: dict[int, list[float]] = field(default_factory=dict)  # R rows measured so far
    timings: dict[str, float] = field(default_factory=dict)  # per task: PER_TASK_TIMINGS
    global_step: int = 0
    # Settings changed on a resume, as users see them: {"field", "old", "new", "task" (its number,
    # from 1), "step", "global_step"}.
    changes: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient

    @property
    def number(self) -> int:
        """The number (from 1) of the position's task; ``len(schedule) + 1`` once every task is closed."""
        return task_number(self.task)

    @property
    def tag(self) -> str:
        """The checkpoint tag of this position, ``task<NN>_step<SSSSSS>``: ``SSSSSS`` optimizer
        steps done of task ``NN`` (numbered from 1). ``task02_step000004``: 4 steps into task 2;
        ``task03_step000000``: task 2 closed (LoRA merge, its row of R, S extended), task 3 not
        started; a run of T tasks ends at ``task<T+1>_step000000``. Order tags with :func:`tag_position`."""
        return f"task{self.number:02d}_step{self.step:06d}"

    def record_change(self, key: str, old: Any, new: Any) -> None:
        """A setting changed on resuming here: the new value applies from this position on."""
        self.changes.append({"field": key, "old": old, "new": new, "task": self.number, "step": self.step,
                             "global_step": self.global_step})

    def to_state(self) -> dict[str, Any]:
        """JSON-able: the checkpoint's ``progress`` and ``progress.json``. The position is
        ``task_number`` (from 1) and ``step`` (optimizer steps done of that task)."""
        return {"task_number": self.number, "step": self.step, "rows": {str(k): v for k, v in self.rows.items()},
                "timings": self.timings, "global_step": self.global_step, "changes": self.changes,
                "skipped_steps": self.skipped_steps}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        """Inverse of :meth:`to_state`. Also reads the format written before tasks were numbered
        from 1, told apart by its key: ``task``, the 0-based index, where ``task_number`` is now. Its
        changes' ``task`` and per-task timing keys were indices too, and are renumbered."""
        changes, timings = list(state.get("changes", [])), dict(state["timings"])
        if "task_number" in state:
            index = state["task_number"] - 1
        else:
            index = state["task"]
            changes = [{**change, "task": task_number(change["task"])} for change in changes]
            timings = {_renumbered(key): value for key, value in timings.items()}
        return cls(index, state["step"], {int(k): v for k, v in state["rows"].items()}, timings,
                   state["global_step"], changes, int(state.get("skipped_steps", 0)))


def _renumbered(key: str) -> str:
    """A timing key of the 0-based format (``train_s/0``: the first task) as it is keyed now (``train_s/1``)."""
    prefix = next((p for p in PER_TASK_TIMINGS if key.startswith(p)), None)
    return key if prefix is None else f"{prefix}{task_number(int(key[len(prefix):]))}"


def tag_position(name: str) -> tuple[int, int] | None:
    """``(task number, step)`` of a checkpoint tag, ``None`` for any other name. Tags are ordered by
    it, as numbers: ``task100_…`` comes after ``task99_…`` and ``step1000000`` after ``step999999``,
    which a string sort of the zero-padded names would get wrong."""
    match = _TAG.fullmatch(name)
    return None if match is None else (int(match[1]), int(match[2]))


def tags_to_prune(names: Iterable[str], keep: int, newest: str) -> list[str]:
    """The checkpoint tags among ``names`` (a checkpoint folder's entries) to delete so that
    ``keep`` remain: the earliest in the run, never ``newest`` (the one just committed)."""
    tags = sorted((name for name in names if tag_position(name) is not None), key=tag_position)
    return [tag for tag in tags if tag != newest][: max(0, len(tags) - keep)]
