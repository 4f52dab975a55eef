"""Non-finite losses and gradients: detected once per optimizer step, the step skipped, the run
stopped after too many in a row.

The check costs no extra host sync: the step's mean loss was already read for logging once per
step, and now it is read together with an on-device "all gradients finite" flag (all-reduced over
the ranks, so every rank skips the same steps) in one host read, after the backward pass of the
step's last micro-batch and before its optimizer step. A bad step sets ``GORP.skip_next_step``:
moments, projectors, step counters and weights stay exactly as they were.

Two test faults (``gorp_ds/faults.py``: the process's fault plan, which the loop asks): a NaN
gradient in one step (:func:`poison_gradient`; the loss stays finite, so only the gradient check
can catch it, and under ZeRO the NaN lands in one rank's partition only), and a step left out
altogether, the reference run that a run whose NaN step was skipped must match exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from ..log import get_logger
from .progress import task_number

log = get_logger(__name__)
class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient; the launcher prints it (status 2)."""


def poison_gradient(engine: Any, optimizer: Any, task_index: int, step: int) -> Any:
    """Test fault: a removable hook that turns the first trained tensor's gradient into NaN."""
    name = optimizer.param_groups[0]["names"][0]
    log.info(f"fault plan: gradient of {name} set to NaN in task {task_number(task_index)}, step {step}")
    return engine.gorp.params_by_name[name].register_hook(lambda grad: torch.full_like(grad, float("nan")))


class NonFiniteGuard:
    """Counts bad steps; ``check`` is the step's single host read."""

    def __init__(self, method: str, max_bad_steps: int) -> None:
        self.method, self.max_bad_steps = method, max_bad_steps
        self.consecutive = 0  # bad steps in a row, up to the current one

    def check(self, engine: Any, optimizer: Any, mean_loss: torch.Tensor, where: str) -> tuple[float, bool]:
        """``(loss, finite)`` of the step about to be taken; a non-finite step is marked to be skipped."""
        finite = engine.gorp.gradients_finite(mean_loss)
        loss, ok = torch.stack([mean_loss.detach().float().reshape(()), finite.float()]).tolist()
        if ok == 1.0:
            self.consecutive = 0
            return loss, True
        optimizer.skip_next_step = True
        self.consecutive += 1
        log.warning(f"[{self.method}] {where}: non-finite loss or gradient (loss {loss}); step skipped, "
                    f"moments untouched ({self.consecutive} in a row, at most {self.max_bad_steps})")
        return loss, False

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_bad_steps
