"""Settings declared once: the field helper every component's config dataclass uses.

A component (optimizer, LoRA, targets, model, data, runner) owns one keyword-only dataclass whose
fields are its run settings. Each field is declared with :func:`setting`: its one default, its help
text and its declarative checks (choices, bounds). The run layer (``gorp_ds.cl.config``) builds the
command line, the run file's sections and ``--print-config`` from these fields, so adding a setting
is one line in one dataclass.

This module imports nothing from the project and nothing heavy: every layer may use it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Any

__all__ = ["SettingError", "setting", "check_settings", "RESUME_POLICIES"]

# What ``--resume`` does when a setting differs from the run being resumed (declared on each field):
# - "fixed": refused, naming the field (it defines which run this is: changing it would relabel R's
#   columns, mix training across tasks or load state of another shape);
# - "changes": allowed; the new value applies from the resumed step and is recorded as a change;
# - "ignored": allowed and no change to the results (checkpoint cadence, outputs written, ...): a
#   finished method is still skipped;
# - "launch": how this launch treats the output directory, not what the run is (never compared).
RESUME_POLICIES = ("fixed", "changes", "ignored", "launch")


class SettingError(ValueError):
    """A setting with a bad value. ``name`` is the field, ``problem`` the rest of the sentence
    ("must be >= 1, got 0"); the run layer re-words it with the flag or file key the user wrote."""

    def __init__(self, name: str, problem: str, section: str | None = None, others: tuple[str, ...] = ()) -> None:
        # ``problem`` may name other fields of the same section as ``{field}``: each is written the
        # way the user wrote it (``--tasks``, ``data.tasks``) when the message is rendered.
        self.name, self.problem, self.section, self.others = name, problem, section, tuple(others)
        super().__init__(self.render(lambda field: f"{section}.{field}" if section else field))

    def render(self, spelling: Callable[[str], str]) -> str:
        """The message with every field named by ``spelling(field)``. Only the ``{field}`` of
        ``others`` is replaced: the rest is text, a user's value with braces included (``got '{}'``
        was a KeyError of str.format)."""
        problem = self.problem
        for other in self.others:
            problem = problem.replace("{" + other + "}", spelling(other))
        return f"{spelling(self.name)} {problem}"


def setting(default: Any, help: str, *, choices: tuple[Any, ...] | None = None, minimum: float | None = None,
            above: float | None = None, maximum: float | None = None, flat: str | None = None,
            aliases: tuple[str, ...] = (), bare: Any = None, run: bool = True, on_resume: str = "changes") -> Any:
    """A dataclass field that is a run setting.

    ``choices``: allowed values (each element, for a list); ``minimum`` / ``maximum``: inclusive
    bounds; ``above``: exclusive lower bound. ``flat``: the setting's name outside its section (flat
    run-file key, ``--flag``) when it is not the field name (or the section's prefix plus it);
    ``aliases``: further flag spellings. ``bare``: the value of the flag given without a value
    (booleans: true). ``run=False``: a field of the dataclass that is no run setting (passed in
    by the caller, e.g. the data section's sampling seed, which is the runner's seed). ``on_resume``:
    what ``--resume`` does when the value differs from the resumed run's (:data:`RESUME_POLICIES`).
    """
    if on_resume not in RESUME_POLICIES:
        raise ValueError(f"on_resume must be one of {RESUME_POLICIES}, got {on_resume!r}")
    meta = {"help": help, "choices": choices, "minimum": minimum, "above": above, "maximum": maximum,
            "flat": flat, "aliases": tuple(aliases), "bare": bare, "run": run, "on_resume": on_resume}
    if isinstance(default, (list, dict, tuple)) and not isinstance(default, str):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _describe(bound: float) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def check_settings(obj: Any, section: str | None = None, error: type[SettingError] | None = None) -> None:
    """The declared checks of every field of ``obj``: finite floats, choices, bounds. ``None``
    values (settings that mean "derive it") are not checked. ``error``: the SettingError subclass raised."""
    error = error or SettingError
    for f in dataclasses.fields(obj):
        if not f.metadata or "help" not in f.metadata:
            continue
        meta, value = f.metadata, getattr(obj, f.name)
        if value is None or isinstance(value, bool):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                raise error(f.name, f"must be a finite number, got {item}", section)
            if meta["choices"] is not None and item not in meta["choices"]:
                raise error(f.name, f"must be one of {', '.join(map(str, meta['choices']))}, got {item!r}",
                                   section)
            if not isinstance(item, (int, float)):
                continue
            if meta["minimum"] is not None and item < meta["minimum"]:
                raise error(f.name, f"must be >= {_describe(meta['minimum'])}, got {item}", section)
            if meta["above"] is not None and item <= meta["above"]:
                raise error(f.name, f"must be > {_describe(meta['above'])}, got {item}", section)
            if meta["maximum"] is not None and item > meta["maximum"]:
                raise error(f.name, f"must be <= {_describe(meta['maximum'])}, got {item}", section)
