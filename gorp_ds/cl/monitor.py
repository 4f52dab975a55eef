"""Scalars for TensorBoard (rank 0 writes; a no-op when disabled), for W&B through the project's
own run (``wandb_log.py``: DeepSpeed never writes to W&B, its sample-count steps would make W&B drop
the project's scalars), and for DeepSpeed's other monitors (CSV, Comet) where its config enables them.

The TensorBoard event file is written here, in the calling thread, not by DeepSpeed's monitor
(``session.py`` hands DeepSpeed the ``tensorboard`` section disabled). DeepSpeed's monitor uses
torch's ``SummaryWriter``, which writes from a background thread: a full disk there prints that
thread's traceback, and the error reaches the training loop only at a later write, from inside
``engine.step()``. A handful of scalars per step is a few hundred bytes, so writing them
synchronously costs microseconds and every failure is known where it happened.

A failed write does not stop rank 0 on its own (the other ranks would wait in the next collective
for it): the monitor keeps the failure, drops further events, and :meth:`Monitor.raise_failure`
(collective) stops every rank together at the next point where all of them ask: after a checkpoint,
at each row of R, and at the end of a method. Creating the event file is agreed at once.
"""

from __future__ import annotations

import io
import os
import socket
import time
from typing import Any

from ..safe_write import WriteError, guarded
from .agree import agree_on_errors
from .wandb_log import WandbRun

WHAT = "the TensorBoard events"


class EventFile:
    """One TensorBoard event file (tfrecord framing of ``Event`` protos), appended and flushed by
    the caller's thread."""

    def __init__(self, log_dir: str) -> None:
        from tensorboard.compat.proto import event_pb2

        self.path = os.path.join(log_dir, f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                                          f"{os.getpid()}.0")
        first = self._framed([event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")])
        with guarded(self.path, WHAT, need=len(first), site="tensorboard_open"):
            os.makedirs(log_dir, exist_ok=True)
            self.handle = open(self.path, "ab")
            self.handle.write(first)
            self.handle.flush()

    @staticmethod
    def _framed(events: list[Any]) -> bytes:
        from tensorboard.summary.writer.record_writer import RecordWriter

        buffer = io.BytesIO()
        writer = RecordWriter(buffer)
        for event in events:
            writer.write(event.SerializeToString())
        return buffer.getvalue()

    def write_scalars(self, events: list[tuple[str, float, int]]) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        now = time.time()
        data = self._framed([event_pb2.Event(wall_time=now, step=step, summary=summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])) for tag, value, step in events])
        with guarded(self.path, WHAT, need=len(data), site="tensorboard_flush"):
            self.handle.write(data)
            self.handle.flush()

    def close(self) -> None:
        try:
            self.handle.close()
        except OSError:
            pass  # a failed flush was already kept as the monitor's failure


class Monitor:
    def __init__(self, engine: Any, tensorboard: dict[str, Any] | None = None, rank: int = 0,
                 wandb: WandbRun | None = None) -> None:
        """``tensorboard``: the DeepSpeed config's ``tensorboard`` section (``enabled``,
        ``output_path``, ``job_name``); the events go to ``<output_path>/<job_name>/``. Collective
        when TensorBoard is enabled (creating the event file is agreed by every rank)."""
        monitor = getattr(engine, "monitor", None)
        self._deepspeed = monitor if monitor is not None and getattr(monitor, "enabled", False) else None
        self._events: EventFile | None = None
        self._failure: WriteError | None = None
        self._board = bool(tensorboard and tensorboard.get("enabled"))
        self._wandb = wandb
        if self._board:
            error = None
            if rank == 0:
                log_dir = os.path.join(tensorboard.get("output_path") or "tensorboard", tensorboard.get("job_name") or "")
                try:
                    self._events = EventFile(log_dir)
                except WriteError as err:
                    error = err
            agree_on_errors(error)

    @property
    def enabled(self) -> bool:
        return self._board or self._deepspeed is not None or self._wandb is not None

    def write(self, events: list[tuple[str, float, int]]) -> None:
        if not events:
            return
        events = [(tag, float(value), int(step)) for tag, value, step in events]
        if self._events is not None and self._failure is None:
            try:
                self._events.write_scalars(events)
            except WriteError as err:  # kept for raise_failure; later events are dropped
                self._failure = err
        if self._deepspeed is not None:
            self._deepspeed.write_events(events)
        if self._wandb is not None:
            self._wandb.write(events)

    def raise_failure(self, note: str = "") -> None:
        """Stop every rank with rank 0's failed TensorBoard write, if there was one. Collective."""
        if not self._board:
            return
        error = None if self._failure is None else self._failure.noted(note)
        agree_on_errors(error)

    def close(self) -> None:
        """Close the event file and finish the method's W&B run."""
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def train_step(self, step: int, loss: float, optimizer: Any, *, tokens_per_s: float, step_seconds: float,
                   skipped_steps: int = 0) -> None:
        """Per-step scalars; all host values (the caller read the loss in the step's one device read)."""
        if not self.enabled:
            return
        events = [("train/loss", loss, step), ("train/tokens_per_s", tokens_per_s, step),
                  ("train/step_seconds", step_seconds, step)]
        # Detached groups (full targets trained from projected gradients) have learning rates too.
        for group in [*optimizer.param_groups, *getattr(optimizer, "detached_groups", [])]:
            events.append((f"train/lr/{group['role']}", group["lr"], step))
        events.append(("train/skipped_nonfinite_steps", skipped_steps, step))
        self.write(events)

    def optimizer_stats(self, step: int, *, refresh_ms: float, projector_failures: int,
                        grad_norm: float | None = None) -> None:
        """Device statistics, written at logging intervals: projector refresh time since the previous
        interval, projector failures so far, and the gradient norm of the interval's last step."""
        events = [("gorp/projector_failures", projector_failures, step)]
        if grad_norm is not None:
            events.append(("train/grad_norm", grad_norm, step))
        if refresh_ms > 0:
            events.append(("gorp/projector_refresh_ms", refresh_ms, step))
        self.write(events)

    def shared_space(self, step: int, sizes: dict[str, int]) -> None:
        """Columns of S per module (and their mean) after a task boundary."""
        events = [(f"gorp/S_columns/{name}", size, step) for name, size in sorted(sizes.items())]
        if sizes:
            events.append(("gorp/S_columns_mean", sum(sizes.values()) / len(sizes), step))
        self.write(events)

    def accuracy_row(self, row_index: int, task_names: list[str], row: list[float]) -> None:
        self.write([(f"R/{j + 1:02d}_{name}", value, row_index) for j, (name, value) in enumerate(zip(task_names, row))])

    def eval_task_row(self, row_index: int, task_names: list[str], row: list[float]) -> None:
        """The eval tasks' (--eval-tasks, never trained) accuracies in one row of R, and their mean."""
        if task_names:
            self.write([*((f"eval_tasks/{name}", value, row_index) for name, value in zip(task_names, row)),
                        ("eval_tasks/mean", sum(row) / len(row), row_index)])

    def metrics(self, metrics: dict[str, float | None], step: int) -> None:
        self.write([(f"metrics/{k}", v, step) for k, v in metrics.items() if v is not None])
