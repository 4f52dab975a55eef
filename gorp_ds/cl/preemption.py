"""Pre-emption: SIGTERM or SIGUSR1 make every rank finish its optimizer step, checkpoint that step
and exit with :data:`REQUEUE_STATUS`, which the SLURM batch script takes as "requeue me".

A signal only sets a flag. Once per optimizer step the ranks agree on it with one tiny all-reduce
on the CPU (gloo) side group (ranks are signalled at different moments, or only some of them), so
all stop after the same step and no GPU synchronisation is added. A second signal more than
:data:`GRACE_S` after the first (duplicates from SLURM and the launcher arrive together), or the
deadline (``GORP_DS_PREEMPT_DEADLINE`` seconds after the first signal, default 90: SLURM's warning
comes 120 s before the kill), exits at once with the same status; the checkpoint commit protocol
leaves the last complete checkpoint in place whatever is interrupted.

The requeue marker: a launcher's own exit status is not the ranks' when the launcher itself was
signalled or killed (``deepspeed`` dies of SIGTERM with -15; DeepSpeed's per-node launcher, when
signalled, stops its ranks and exits with 1), so a job script cannot rely on seeing 75. When
``GORP_DS_REQUEUE_FILE`` names a file, each node's local rank 0 writes it (atomically) whenever the
ranks exit with :data:`REQUEUE_STATUS`; ``launch/slurm/node.sh`` sets it, and reports 75 when the
file exists after its launcher returned, whatever the launcher's status.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from ..log import local_rank
from ..zero import side_group

REQUEUE_STATUS = 75  # EX_TEMPFAIL: "temporary failure, try again" (launch/slurm/train.sbatch requeues)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
GRACE_S = 5.0
DEADLINE_ENV = "GORP_DS_PREEMPT_DEADLINE"
REQUEUE_FILE_ENV = "GORP_DS_REQUEUE_FILE"


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
        write_requeue_marker(None)
        os._exit(REQUEUE_STATUS)

    @property
    def requested(self) -> bool:
        return self.first_signal is not None

    def should_stop(self) -> bool:
        """True on every rank when any rank was signalled (collective: call it on every rank at
        the same points of the run)."""
        return side_group.any_rank(self.requested)


def write_requeue_marker(checkpoint: str | None) -> None:
    """Leave the requeue marker (``GORP_DS_REQUEUE_FILE``; each node's local rank 0) before the
    rank exits with :data:`REQUEUE_STATUS`; its text names the checkpoint written, if any. Only
    ``os`` calls: it also runs in the signal handler's and the deadline timer's exits."""
    path = os.environ.get(REQUEUE_FILE_ENV)
    if not path or local_rank() != 0:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, f"{REQUEUE_STATUS} {checkpoint or '-'}\n".encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:  # the status itself is still 75; the job script may then miss a requeue
        _say(f"cannot write the requeue marker {path}: {os.strerror(err.errno or 0)}")


_CURRENT = Preemption()


def current() -> Preemption:
    """The process's pre-emption state (handlers are installed by the runner)."""
    return _CURRENT
