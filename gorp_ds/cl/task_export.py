"""The runner's per-task export of a LoRA method (``--export-adapters``, default on): after task t,
``export/task_XX/adapter/`` (the task's LoRA as a PEFT adapter on the model before the task),
``export/task_XX/full_delta.safetensors`` (the ``full`` targets' change, gorp and galore) and the
prompt record; the files themselves are gorp_ds/export/peft_adapter.py's and prompt_record.py's.

The full targets' values at a task's start are kept in ``<method>/.task_start/task_XX.safetensors``
until the next task ends (a resume in mid-task, or from the task's own end before its checkpoint,
still finds them) and removed when the method finishes. Methods without adapters (``MethodSpec.
adapters`` False: seq-ft) get no adapter: every weight trains, which only a whole model holds.
"""

from __future__ import annotations

import os
import shutil

from ..export.peft_adapter import (
    ADAPTER_DIR,
    FULL_DELTA_NAME,
    full_target_names,
    write_adapter,
    write_full_delta,
    write_task_start,
)
from ..log import get_logger
from ..models.loading import DTYPES
from .agree import agreed
from .progress import Progress, task_number
from .prompt_record import write_prompt_record
from .session import MethodSession

log = get_logger(__name__)

START_DIR = ".task_start"


def task_dir(out_dir: str, task_index: int) -> str:
    """``<method>/export/task_XX`` (the per-task export's directory, numbered from 1)."""
    return os.path.join(out_dir, "export", f"task_{task_number(task_index):02d}")


class TaskExports:
    """Called by the runner around every task; every rank calls (the masters' gathers are collective)."""

    def __init__(self, session: MethodSession) -> None:
        self.session = session
        self.enabled = session.cfg.runner.export_adapters and session.spec.adapters
        self.full = self.enabled and bool(full_target_names(session.engine.gorp))
        self.start_dir = os.path.join(session.out_dir, START_DIR)
        self.dtype = DTYPES[session.cfg.base_model.dtype]
        if session.cfg.runner.export_adapters and not session.spec.adapters and session.rank == 0:
            log.info(f"[{session.method}] no per-task adapters: {session.method} trains every weight, so only the "
                     "merged export holds a task's model")

    def _start_path(self, task_index: int) -> str:
        return os.path.join(self.start_dir, f"task_{task_number(task_index):02d}.safetensors")

    def task_started(self, task_index: int, progress: Progress) -> None:
        """At a task's first step (not on a resume in mid-task): the full targets' values now."""
        if self.full and progress.step == 0:
            session = self.session
            agreed(lambda: write_task_start(session.engine.module, session.engine.gorp, self.dtype,
                                            self._start_path(task_index)))

    def task_finished(self, task_index: int, task_name: str) -> None:
        """After the task's merge (``close_adapters``): its adapter, full delta and the prompt record."""
        if self.enabled:
            agreed(lambda: self._write_task(task_index, task_name))

    def _write_task(self, task_index: int, task_name: str) -> None:
        session = self.session
        directory = task_dir(session.out_dir, task_index)
        delta_bytes = write_full_delta(session.engine.module, session.engine.gorp, self.dtype,
                                       self._start_path(task_index), os.path.join(directory, FULL_DELTA_NAME)) \
            if self.full else None
        if session.rank != 0:
            return
        if self.full and delta_bytes is None:
            return  # warned: an adapter without the full targets' change would not give the task's model
        if len(session.merges) != task_index + 1:  # the merges of this run (replayed on resume) are one per task
            log.warning(f"[{session.method}] {len(session.merges)} LoRA merges after task {task_number(task_index)}: "
                        "no adapter written for it")
            return
        adapter_bytes = write_adapter(session.engine.module, session.merges[-1], os.path.join(directory, ADAPTER_DIR),
                                      session.cfg.base_model.model)
        write_prompt_record(session.tasks, session.tokenizer, session.cfg, session.method, directory)
        for name in os.listdir(self.start_dir) if os.path.isdir(self.start_dir) else []:
            number = name.removeprefix("task_").split(".", 1)[0]
            if number.isdigit() and int(number) < task_number(task_index):  # earlier tasks' starts: not needed
                os.remove(os.path.join(self.start_dir, name))
        extra = f", full delta {delta_bytes / 2**20:,.2f} MiB" if delta_bytes is not None else ""
        log.info(f"[{session.method}] task {task_number(task_index)} ({task_name}): PEFT adapter in "
                 f"{os.path.join(directory, ADAPTER_DIR)} ({adapter_bytes / 2**20:,.2f} MiB){extra}")

    def close(self) -> None:
        """The method is done: the kept task-start values go."""
        if self.session.rank == 0:
            shutil.rmtree(self.start_dir, ignore_errors=True)

