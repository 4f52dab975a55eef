"""Pre-emption: SIGTERM or SIGUSR1 make every rank finish its optimizer step, checkpoint that step
and exit with :data:`REQUEUE_STATUS`, which the SLURM batch script takes as "requeue me".

A signal only sets a flag. Once per optimizer step the ranks agree on it with one tiny all-reduce
on the CPU (gloo) side group (ranks are signalled at different moments, or only some of them), so
all stop after the same step and no GPU synchronisation is added. A second signal more than
:data:`GRACE_S` after the first (duplicates from SLURM and the launcher arrive together), or the
deadline (``GORP_DS_PREEMPT_DEADLINE`` seconds after the first signal, default 90: SLURM's warning
comes 120 s before the kill), exits at once with the same status; the checkpoint commit protocol
leaves the last complete checkpoint in place whatever is interrupted.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from ..zero import side_group

REQUEUE_STATUS = 75  # EX_TEMPFAIL: "temporary failure, try again" (launch/slurm/train.sbatch requeues)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
GRACE_S = 5.0
DEADLINE_ENV = "GORP_DS_PREEMPT_DEADLINE"


class Preempted(Exception):
    """Raised after the pre-emption checkpoint is committed; the launcher exits with REQUEUE_STATUS."""

    def __init__(self, checkpoint: str | None) -> None:
        self.checkpoint = checkpoint
        where = f"checkpoint {checkpoint!r} written" if checkpoint else "no checkpoint written (checkpoints are off)"
        super().__init__(f"pre-empted by a signal: {where}; exiting with status {REQUEUE_STATUS} (requeue)")


def _say(text: str) -> None:
    os.write(2, f"gorp_ds: {text}\n".encode())  # no logging lock inside a signal handler


class Preemption:
    def __init__(self) -> None:
        self.first_signal: float | None = None
        self.installed = False

    def install(self) -> Preemption:
        """Install the handlers (main thread only; a no-op elsewhere or when installed)."""
        if not self.installed and threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, self._on_signal)
            self.installed = True
        return self

    def _on_signal(self, signum: int, frame) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self.first_signal is None:
            self.first_signal = now
            deadline = float(os.environ.get(DEADLINE_ENV, "90"))
            _say(f"{name}: finishing this optimizer step, then checkpointing and exiting "
                 f"(status {REQUEUE_STATUS}); a second signal or {deadline:.0f} s exit at once")
            timer = threading.Timer(deadline, self._exit_now, args=(f"pre-emption deadline of {deadline:.0f} s",))
            timer.daemon = True
            timer.start()
        elif now - self.first_signal > GRACE_S:
            self._exit_now(f"second {name}")

    @staticmethod
    def _exit_now(why: str) -> None:
        _say(f"{why}: exiting at once with status {REQUEUE_STATUS}; the last complete checkpoint stays in place")
        os._exit(REQUEUE_STATUS)

    @property
    def requested(self) -> bool:
        return self.first_signal is not None

    def should_stop(self) -> bool:
        """True on every rank when any rank was signalled (collective: call it on every rank at
        the same points of the run)."""
        return side_group.any_rank(self.requested)


_CURRENT = Preemption()


def current() -> Preemption:
    """The process's pre-emption state (handlers are installed by the runner)."""
    return _CURRENT
