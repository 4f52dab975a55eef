"""Ranks do not outlive their launcher: when the process that started this rank dies (SIGKILL
included), the rank stops as on SIGTERM (pre-emption: finish the optimizer step, checkpoint it,
exit with status 75).

Which processes count. ``deepspeed`` is two processes: the runner (the ``deepspeed`` command)
starts ``python -m deepspeed.launcher.launch``, which starts the ranks. Killing the runner leaves
the per-node launcher running, and it never signals the ranks; so a rank watches its parent and,
when that parent is DeepSpeed's per-node launcher started by DeepSpeed's runner, the runner too.
Under ``torchrun`` (and ``deepspeed --module gorp_ds``, the same tree) the parent is the launcher.
A process started without a launcher (no ``RANK`` in its environment) watches nothing: a plain
``nohup python launch/train.py &`` outlives its shell as before.

How death is seen: a process whose parent dies is re-parented (to init or a sub-reaper), so its
parent pid changes. A daemon thread compares, once a second, this process's parent pid and (for
the runner) the launcher's parent pid, read from ``/proc/<pid>/stat``, with those seen at start;
no pid is ever signalled or compared by number alone, so a reused pid cannot mislead it. On a
change it sends SIGTERM to this process: the pre-emption handler (``preemption.py``) then stops
every rank after the same step, agreed by a collective; before the handler is installed (start-up,
nothing trained yet) SIGTERM ends the process at once.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..log import get_logger

log = get_logger(__name__)

POLL_S = 1.0
LAUNCH_MODULE = "deepspeed.launcher.launch"  # DeepSpeed's per-node launcher (started as python -m ...)
RUNNER_NAMES = ("deepspeed", "ds", "deepspeed.launcher.runner")  # DeepSpeed's runner: its script or module


@dataclass(frozen=True)
class Link:
    """A process (``pid``) whose parent (``parent``, with its command line) this rank depends on."""

    pid: int
    parent: int
    command: str


def read_cmdline(pid: int) -> list[str]:
    """The command line of ``pid`` (empty when it is gone or unreadable, or off Linux)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
    except OSError:
        return []


def read_parent(pid: int) -> int | None:
    """The parent pid of ``pid`` from ``/proc/<pid>/stat`` (None when gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode(errors="replace")
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[1]) if len(fields) > 1 else None


def is_deepspeed_launch(argv: list[str]) -> bool:
    return LAUNCH_MODULE in argv[:4]


def is_deepspeed_runner(argv: list[str]) -> bool:
    """``python .../bin/deepspeed ...``, ``deepspeed ...`` or ``python -m deepspeed.launcher.runner``."""
    return any(os.path.basename(part) in RUNNER_NAMES for part in argv[:3])


def launcher_chain(pid: int | None = None, cmdline: Callable[[int], list[str]] = read_cmdline,
                   parent_of: Callable[[int], int | None] = read_parent) -> list[Link]:
    """What ``pid`` (default: this process) depends on: its own parent, and DeepSpeed's runner
    when the parent is DeepSpeed's per-node launcher that the runner started."""
    pid = os.getpid() if pid is None else pid
    parent = os.getppid() if pid == os.getpid() else parent_of(pid)
    if parent is None or parent <= 1:
        return []
    launcher = cmdline(parent)
    chain = [Link(pid, parent, " ".join(launcher[:3]) or f"pid {parent}")]
    grandparent = parent_of(parent)
    if is_deepspeed_launch(launcher) and grandparent is not None and grandparent > 1:
        runner = cmdline(grandparent)
        if is_deepspeed_runner(runner):
            chain.append(Link(parent, grandparent, " ".join(runner[:3])))
    return chain


def broken_link(chain: list[Link], parent_of: Callable[[int], int | None] = read_parent) -> Link | None:
    """The first link whose process has another parent now (its parent died), or None."""
    for link in chain:
        now = os.getppid() if link.pid == os.getpid() else parent_of(link.pid)
        if now != link.parent:
            return link
    return None


_STARTED = False


def watch_launcher() -> None:
    """Start the watch once per process, when a launcher started this process (``RANK`` set)."""
    global _STARTED
    if _STARTED or "RANK" not in os.environ:
        return
    chain = launcher_chain()
    if not chain:
        return
    _STARTED = True
    thread = threading.Thread(target=_watch, args=(chain,), name="gorp_ds-launcher-watch", daemon=True)
    thread.start()


def _watch(chain: list[Link]) -> None:
    stop = threading.Event()
    while not stop.wait(POLL_S):
        link = broken_link(chain)
        if link is not None:
            os.write(2, (f"gorp_ds: rank {os.environ.get('RANK', '?')}: the launcher process {link.parent} "
                         f"({link.command}) is gone; stopping as on SIGTERM\n").encode())
            os.kill(os.getpid(), signal.SIGTERM)
            return
