"""Data settings of a run (the run file's ``data:`` section)."""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import SettingError, check_settings, setting
from .errors import DataError

__all__ = ["DataConfig", "DataSettingError", "MAX_DRAWN_PER_TASK", "MAX_SEED"]

PROMPT_FORMATS = ("plain", "chat")  # gorp_ds.data.prompting.PROMPT_FORMATS
# Most example draws (optimizer steps × global batch) one task's batch order may hold.
# gorp_ds.data.sampling.global_batch_order builds the whole order up front as Python lists on every
# rank, about 50 bytes a draw at its peak (measured: an int object and two list slots), so 2**24
# draws take ~0.8 GB. A budget beyond that (--epochs 1e12, --max-steps-per-task 1e12) would grow
# memory until MemoryError rather than train; 2**24 is ~16M examples a task, far more than any task
# of the CL benchmarks holds.
MAX_DRAWN_PER_TASK = 2**24
# The data order's generator reads only the seed's low 32 bits (sampling.epoch_permutation), so a
# larger seed would silently give the same order as a smaller one; torch.manual_seed takes < 2**64.
MAX_SEED = 2**32 - 1


class DataSettingError(SettingError, DataError):
    """A data setting with a bad value (both a :class:`DataError` and a :class:`SettingError`)."""


@dataclass(kw_only=True)
class DataConfig:
    """Which tasks to load, in which order, how much of them, and how they become tokens.

    ``max_train_per_task`` / ``eval_samples`` are applied by deterministic sampling (train with
    ``seed``, the run's seed; the evaluation subset is fixed across seeds so runs compare on the
    same examples).
    """

    data_dir: str | None = setting(None, "CL_Benchmark-layout directory (<type>/<task>/{train,test,labels}.json); "
                                         "none: the embedded tasks (or hf: sources)", on_resume="fixed")
    tasks: list[str] | None = setting(None, "task sequence: embedded names, task folders or paths relative to "
                                            "--data-dir, or hf:<dataset>", on_resume="fixed")
    order: str | None = setting(None, "named order: 1-3 (the papers' 4-task orders), 4-6 (their 15-task orders), "
                                      "shared10 (ten tasks of the long orders; docs/protocol.md) or A, B, C (4-task "
                                      "substitutes); needs --data-dir; not with --tasks", on_resume="fixed")
    allow_substitutes: bool = setting(False, "run a named order whose tasks are not all in --data-dir without the "
                                             "missing ones (they are named in the log; docs/protocol.md)", on_resume="fixed")
    eval_tasks: list[str] | None = setting(None, "tasks evaluated in every row of R and never trained (the "
                                                 "generalisation to unseen tasks); specs as for --tasks", on_resume="fixed")
    max_train_per_task: int | None = setting(None, "cap on each task's training examples (none: all)", minimum=1, on_resume="fixed")
    eval_samples: int | None = setting(500, "test examples per task used for R (none: the whole split)", minimum=1, on_resume="fixed")
    max_length: int = setting(256, "token budget per example; long inputs are cut from the left of the input "
                                   "text", minimum=8, on_resume="fixed")
    max_source_length: int | None = setting(None, "prompt tokens (none: max_length minus the answer; 512 for "
                                                  "orders 1-6)", minimum=8, on_resume="fixed")
    max_target_length: int | None = setting(None, "answer and generation tokens (none: the longest label + 1; "
                                                  "50 for orders 1-6)", minimum=1, on_resume="fixed")
    prompt_format: str = setting("plain", "plain text prompts, or chat: through the tokenizer's chat template",
                                 choices=PROMPT_FORMATS, on_resume="fixed")
    seed: int = setting(0, "sampling seed (the run's --seed)", run=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check types and combinations; raises :class:`DataSettingError` naming the setting and the fix."""

        def bad(name: str, problem: str) -> DataSettingError:
            return DataSettingError(name, problem, "data")

        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise bad("data_dir", f"must be a path string or null, got {self.data_dir!r}")
        if self.tasks is not None:
            if isinstance(self.tasks, str) or not isinstance(self.tasks, (list, tuple)):
                raise bad("tasks", f'must be a list of task names, got {self.tasks!r}; e.g. ["dbpedia", "amazon"]')
            if not self.tasks:
                raise bad("tasks", "is an empty list; name at least one task or leave it null")
            wrong = [t for t in self.tasks if not isinstance(t, str) or not t.strip()]
            if wrong:
                raise bad("tasks", f"entries must be non-empty strings, got {wrong[0]!r}")
        if self.eval_tasks is not None:
            if isinstance(self.eval_tasks, str) or not isinstance(self.eval_tasks, (list, tuple)):
                raise bad("eval_tasks", f'must be a list of task names, got {self.eval_tasks!r}; e.g. ["emb_fruit"]')
            wrong = [t for t in self.eval_tasks if not isinstance(t, str) or not t.strip()]
            if wrong:
                raise bad("eval_tasks", f"entries must be non-empty strings, got {wrong[0]!r}")
        if not isinstance(self.allow_substitutes, bool):
            raise bad("allow_substitutes", f"must be true or false, got {self.allow_substitutes!r}")
        if self.order is not None and not isinstance(self.order, str):
            raise bad("order", f"must be one of 1-6, shared10, A, B, C or null, got {self.order!r}")
        if self.order is not None and self.tasks is not None:
            raise DataSettingError("order", "and {tasks} are mutually exclusive (a named order is a task "
                                   "sequence); set only one", "data", others=("tasks",))
        for key in ("max_train_per_task", "eval_samples", "max_length", "max_source_length", "max_target_length",
                    "seed"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise bad(key, f"must be an integer{' or null' if key != 'max_length' else ''}, got {value!r}")
        check_settings(self, "data", DataSettingError)
