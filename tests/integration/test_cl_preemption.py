"""Pre-emption signals in one process: the flag, the second signal and the deadline. (The 2-rank
stop-at-the-same-step, checkpoint and resume is in test_cl_faults.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.support import REPO

CHILD = f"""
import os, signal, sys, time
sys.path.insert(0, {str(REPO)!r})
from gorp_ds.cl import preemption
preemption.GRACE_S = float(sys.argv[1])
state = preemption.current().install()
assert not state.should_stop()
os.kill(os.getpid(), signal.SIGTERM)
assert state.should_stop(), "a signal sets the flag"
print("flag set", flush=True)
if sys.argv[2] == "again":
    time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGUSR1)
time.sleep(20)
sys.exit(3)  # not reached: the second signal or the deadline exits first
"""


def _run(grace: str, mode: str, deadline: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    env = {"GORP_DS_PREEMPT_DEADLINE": deadline, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", CHILD, grace, mode], env=env, capture_output=True, text=True,
                          timeout=60)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("grace, mode, deadline, status, message", [
    ("0.05", "again", "30", 75, "second SIGUSR1: exiting at once"),
    ("5", "again", "1", 75, "pre-emption deadline of 1 s"),  # the quick repeat is a duplicate, not a second signal
    ("5", "once", "1", 75, "pre-emption deadline of 1 s"),
])
def test_second_signal_or_deadline_exits_at_once(grace, mode, deadline, status, message) -> None:
    proc, elapsed = _run(grace, mode, deadline)
    assert proc.returncode == status, proc.stderr
    assert "flag set" in proc.stdout
    assert "SIGTERM: finishing this optimizer step" in proc.stderr
    assert message in proc.stderr and "the last complete checkpoint stays in place" in proc.stderr
    assert elapsed < 15


def test_requeue_status_is_the_documented_one() -> None:
    from gorp_ds.cl.preemption import REQUEUE_STATUS, SIGNALS

    assert REQUEUE_STATUS == 75 and set(SIGNALS) == {signal.SIGTERM, signal.SIGUSR1}
    assert "PREEMPT_STATUS=75" in (REPO / "launch" / "slurm" / "train.sbatch").read_text()


WATCHED = f"""
import os, sys, time
sys.path.insert(0, {str(REPO)!r})
from gorp_ds.cl import launcher_watch, preemption
launcher_watch.POLL_S = 0.1
state = preemption.current().install()
launcher_watch.watch_launcher()
print("watching", os.getpid(), flush=True)
deadline = time.monotonic() + 60
while not state.requested and time.monotonic() < deadline:
    time.sleep(0.05)
print("requested" if state.requested else "never requested", flush=True)
"""
LAUNCHER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=open(sys.argv[2], "w"), stderr=subprocess.STDOUT)
time.sleep(120)
"""


@pytest.mark.parametrize("launcher_signal", [signal.SIGKILL, signal.SIGTERM])
def test_rank_stops_as_on_sigterm_when_its_launcher_dies(tmp_path, launcher_signal) -> None:
    """A rank (RANK set by its launcher) whose launcher process dies gets the pre-emption request;
    the launcher here is a plain process, killed or terminated (it does not signal its child)."""
    out = tmp_path / "rank.log"
    env = {"PATH": "/usr/bin:/bin", "RANK": "0", "GORP_DS_PREEMPT_DEADLINE": "60"}
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, WATCHED, str(out)], env=env)
    try:
        deadline = time.monotonic() + 60
        while "watching" not in (out.read_text() if out.exists() else ""):
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.1)
        rank = int(out.read_text().split()[1])
        launcher.send_signal(launcher_signal)
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 30
        while _running(rank):
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    text = out.read_text()
    assert f"the launcher process {launcher.pid} " in text and "is gone; stopping as on SIGTERM" in text, text
    assert "SIGTERM: finishing this optimizer step" in text and text.rstrip().endswith("requested"), text


def _running(pid: int) -> bool:
    try:  # the orphaned rank may stay a zombie until its new parent reaps it
        with open(f"/proc/{pid}/status") as handle:
            return "State:\tZ" not in handle.read()
    except OSError:
        return False
