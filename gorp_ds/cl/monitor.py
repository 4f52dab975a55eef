"""Scalars for TensorBoard through DeepSpeed's monitor, and for W&B through the project's own run
(``wandb_log.py``: DeepSpeed never writes to W&B); rank 0 writes; no-op when both are disabled."""

from __future__ import annotations

from typing import Any

from .wandb_log import WandbRun


class Monitor:
    def __init__(self, engine: Any, wandb: WandbRun | None = None) -> None:
        monitor = getattr(engine, "monitor", None)
        self._monitor = monitor if monitor is not None and getattr(monitor, "enabled", False) else None
        self._wandb = wandb

    @property
    def enabled(self) -> bool:
        return self._monitor is not None or self._wandb is not None

    def write(self, events: list[tuple[str, float, int]]) -> None:
        if self._monitor is not None and events:
            self._monitor.write_events([(tag, float(value), int(step)) for tag, value, step in events])
        if self._wandb is not None and events:
            self._wandb.write([(tag, float(value), int(step)) for tag, value, step in events])

    def close(self) -> None:
        """Finish the method's W&B run (TensorBoard's writer closes with the engine)."""
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

    def metrics(self, metrics: dict[str, float | None], step: int) -> None:
        self.write([(f"metrics/{k}", v, step) for k, v in metrics.items() if v is not None])
