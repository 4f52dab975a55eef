"""Data settings of a run (the ``"data"`` section of the project's run config)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DataError

__all__ = ["DataConfig"]


@dataclass
class DataConfig:
    """Which tasks to load, in which order, and how much of them.

    * ``data_dir``: root of a CL_Benchmark-style folder (``<type>/<task>/{train,test,labels}.json``);
      ``None`` selects the embedded suite (unless ``tasks`` names ``hf:`` sources).
    * ``tasks``: a custom sequence: embedded names (``"emb_color"``), CL_Benchmark folder names
      (``"dbpedia"``, ``"TC/dbpedia"``) or paths relative to ``data_dir``, or ``"hf:<spec>"`` for any
      ``datasets`` source with ``sentence``/``label`` columns (see :mod:`gorp_ds.data.hf_source`).
    * ``order``: a named CL_Benchmark order: ``"1"`` … ``"6"`` (the O-LoRA / GORP papers' orders) or
      the substitutes ``"A"``, ``"B"``, ``"C"`` (needs ``data_dir``; not together with ``tasks``).
    * ``max_train_per_task`` / ``eval_samples``: caps, applied by deterministic sampling (train with
      ``seed``; the evaluation subset is fixed across seeds so runs compare on the same examples).
    * ``max_length``: token budget per example; long inputs are cut from the left of the input text.
    """

    data_dir: str | None = None
    tasks: list[str] | None = None
    order: str | None = None
    max_train_per_task: int | None = None
    eval_samples: int | None = None
    max_length: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check types and combinations; raises :class:`DataError` naming the setting and the fix."""
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise DataError(f"data.data_dir must be a path string or null, got {self.data_dir!r}")
        if self.tasks is not None:
            if isinstance(self.tasks, str) or not isinstance(self.tasks, (list, tuple)):
                raise DataError(
                    f'data.tasks must be a list of task names, got {self.tasks!r}; e.g. ["dbpedia", "amazon"]'
                )
            if not self.tasks:
                raise DataError("data.tasks is an empty list; name at least one task or leave it null")
            bad = [t for t in self.tasks if not isinstance(t, str) or not t.strip()]
            if bad:
                raise DataError(f"data.tasks entries must be non-empty strings, got {bad[0]!r}")
        if self.order is not None and not isinstance(self.order, str):
            raise DataError(f"data.order must be one of 1-6, A, B, C or null, got {self.order!r}")
        if self.order is not None and self.tasks is not None:
            raise DataError(
                f"data.order={self.order!r} and data.tasks={self.tasks!r} are mutually exclusive; set only one"
            )
        for key in ("max_train_per_task", "eval_samples"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise DataError(f"data.{key} must be a positive integer or null, got {value!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 8:
            raise DataError(f"data.max_length must be an integer >= 8 (tokens), got {self.max_length!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise DataError(f"data.seed must be an integer, got {self.seed!r}")
