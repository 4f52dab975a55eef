"""Weights & Biases: the run's scalars in one W&B run per method, each at the step the project gives it.

The DeepSpeed config's ``wandb`` section (``{"enabled": true, "project": ..., "group": ..., "team":
...}``, DeepSpeed's own fields) turns it on. gorp_ds takes that section out of the config before
DeepSpeed sees it (:func:`take_wandb_section`) and writes to W&B itself, on rank 0.

Why not DeepSpeed's W&B monitor: DeepSpeed logs ``Train/Samples/lr`` with the *sample* count as
W&B's step (16, 32, 48, … with a global batch of 16), and W&B's own step must never decrease, so
every scalar the project then logged at its optimizer step (1, 2, 3, …) was dropped with "Tried to
log to step 3 that is less than the current step 48". Here DeepSpeed writes to TensorBoard only
(its lr scalar stays there; the project logs every group's learning rate itself as
``train/lr/<role>``), and the project never passes W&B's internal ``step``: each scalar is logged
against a step metric of its own (``define_metric``) — ``global_step`` (optimizer steps over the
whole task sequence) for training and optimizer scalars and the metrics, ``R_row`` (the row of R:
0 before training, t after task t) for the accuracy rows — so no write can be out of order and W&B
keeps every value at the step TensorBoard shows it at. One W&B run per method (named after it),
like TensorBoard's per-method folder: the second method's steps start at 1 again.

A resumed run continues its W&B run: the run's id is kept in the method's directory
(:data:`ID_FILE`, written when the run is first opened) and passed back to ``wandb.init`` with
``resume="allow"``. Steps between the checkpoint and the interruption are logged again after the
resume, as TensorBoard's event file gets them again; each is then in W&B's history twice, at the
same step.
"""

from __future__ import annotations

import importlib.util
import os
from collections import defaultdict
from typing import Any

from ..log import get_logger
from ..safe_write import write_file

log = get_logger(__name__)

# The step metric of a tag: the accuracy rows are numbered by R's row, everything else by the
# optimizer step of the run (what the Monitor's callers pass as ``step``).
ROW_AXIS, STEP_AXIS = "R_row", "global_step"
ROW_PREFIX = "R/"
# DeepSpeed's fields of the section (deepspeed.monitor.config.WandbConfig); anything else is a typo.
FIELDS = ("enabled", "project", "group", "team")
#: The method's W&B run id, in its output directory: a resume continues that run.
ID_FILE = "wandb_run_id"


def wandb_enabled(ds_config: dict[str, Any]) -> bool:
    section = ds_config.get("wandb")
    return isinstance(section, dict) and bool(section.get("enabled", False))


def wandb_problem(ds_config: dict[str, Any]) -> str | None:
    """Why the ``wandb`` section cannot be used (the field and the fix), or None. Checked at
    start-up, before anything is built."""
    section = ds_config.get("wandb")
    if section is None:
        return None
    if not isinstance(section, dict):
        return f"'wandb' is {section!r}, not an object; write it as an object, e.g. \"wandb\": {{\"enabled\": true}}"
    unknown = sorted(set(section) - set(FIELDS))
    if unknown:
        return f"'wandb.{unknown[0]}' is not a W&B setting; use only {', '.join(FIELDS)}"
    if section.get("enabled") and importlib.util.find_spec("wandb") is None:
        return ("'wandb.enabled' is true but the wandb package is not installed; pip install 'gorp_ds[wandb]' "
                "(or pip install wandb), or set \"enabled\": false")
    return None


def take_wandb_section(ds_config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The DeepSpeed config without its ``wandb`` section (DeepSpeed must not write to W&B: see
    the module's docstring), and the section when it is enabled."""
    rest = {k: v for k, v in ds_config.items() if k != "wandb"}
    return rest, (dict(ds_config["wandb"]) if wandb_enabled(ds_config) else None)


class WandbRun:
    """One method's W&B run (rank 0 only): ``write`` takes the Monitor's ``(tag, value, step)`` events."""

    def __init__(self, section: dict[str, Any], name: str, config: dict[str, Any] | None = None,
                 run_id: str | None = None) -> None:
        import wandb

        self._run = wandb.init(project=section.get("project") or "gorp_ds", group=section.get("group"),
                               entity=section.get("team"), name=name, config=config, id=run_id,
                               resume="allow" if run_id else None)
        self.id: str = self._run.id
        for axis in (STEP_AXIS, ROW_AXIS):
            self._run.define_metric(axis, hidden=True)
        self._defined: set[str] = set()

    def write(self, events: list[tuple[str, float, int]]) -> None:
        """One W&B row per (axis, step): ``{tag: value, …, axis: step}``, W&B's own step left to count rows."""
        rows: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
        for tag, value, step in events:
            axis = ROW_AXIS if tag.startswith(ROW_PREFIX) else STEP_AXIS
            if tag not in self._defined:  # a tag's axis is fixed once, when it is first written
                self._run.define_metric(tag, step_metric=axis)
                self._defined.add(tag)
            rows[(axis, step)][tag] = value
        for (axis, step), values in rows.items():
            self._run.log({**values, axis: step})

    def finish(self) -> None:
        self._run.finish()


def open_wandb(section: dict[str, Any] | None, name: str, rank: int, config: dict[str, Any] | None = None,
               out_dir: str | None = None) -> WandbRun | None:
    """The method's W&B run on rank 0 when the section is enabled; None elsewhere. With ``out_dir``
    (the method's output directory) the run's id is kept there, and a later open (a resume)
    continues the same W&B run."""
    if section is None or rank != 0:
        return None
    id_file = os.path.join(out_dir, ID_FILE) if out_dir is not None else None
    run_id = None
    if id_file is not None and os.path.isfile(id_file):
        with open(id_file, encoding="utf-8") as handle:
            run_id = handle.read().strip() or None
    project = section.get("project") or "gorp_ds"
    log.info(f"[{name}] W&B run '{name}' in project {project}" + (f", continuing run {run_id}" if run_id else ""))
    run = WandbRun(section, name, config, run_id)
    if id_file is not None and run.id != run_id:
        write_file(id_file, run.id + "\n", what="the W&B run id", site="results")
    return run
