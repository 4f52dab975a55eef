"""Which processes a rank watches (gorp_ds/cl/launcher_watch.py), on stand-in process tables: its
parent always; DeepSpeed's runner too when the parent is DeepSpeed's per-node launcher that the
runner started; a link is broken when the process's parent pid changed (its parent died)."""

from __future__ import annotations

import os

from gorp_ds.cl.launcher_watch import Link, broken_link, launcher_chain

RUNNER = ["/venv/bin/python", "/venv/bin/deepspeed", "--num_gpus", "2", "launch/train.py"]
LAUNCH = ["/venv/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=", "launch/train.py"]
TORCHRUN = ["/venv/bin/python", "/venv/bin/torchrun", "--nproc_per_node", "2", "launch/train.py"]
SHELL = ["/bin/bash", "launch/slurm/node.sh"]


def chain_for(table: dict[int, tuple[int, list[str]]], pid: int = 100) -> list[Link]:
    """``table``: pid -> (parent pid, command line)."""
    return launcher_chain(pid, cmdline=lambda p: table.get(p, (0, []))[1], parent_of=lambda p: table.get(p, (None,))[0])


def test_deepspeed_rank_watches_the_launcher_and_the_runner() -> None:
    table = {100: (50, []), 50: (40, LAUNCH), 40: (30, RUNNER), 30: (1, SHELL)}
    assert chain_for(table) == [Link(100, 50, " ".join(LAUNCH[:3])), Link(50, 40, " ".join(RUNNER[:3]))]
    # `python -m deepspeed.launcher.runner` is the runner too
    table[40] = (30, ["/venv/bin/python", "-m", "deepspeed.launcher.runner", "launch/train.py"])
    assert [link.parent for link in chain_for(table)] == [50, 40]


def test_other_launchers_and_a_launch_without_the_runner_watch_the_parent_only() -> None:
    assert [link.parent for link in chain_for({100: (50, []), 50: (30, TORCHRUN), 30: (1, SHELL)})] == [50]
    # DeepSpeed's per-node launcher started by pdsh's remote shell, not by the runner
    assert [link.parent for link in chain_for({100: (50, []), 50: (30, LAUNCH), 30: (1, SHELL)})] == [50]
    assert chain_for({100: (1, [])}) == [], "already an orphan: nothing to watch"


def test_a_link_breaks_when_the_parent_changes() -> None:
    chain = [Link(os.getpid(), os.getppid(), "x"), Link(50, 40, "runner")]
    assert broken_link(chain, parent_of=lambda p: {50: 40}[p]) is None
    assert broken_link(chain, parent_of=lambda p: {50: 1}[p]) == chain[1], "the runner died: re-parented to init"
    assert broken_link(chain, parent_of=lambda p: None) == chain[1], "the launcher itself is gone"
    assert broken_link([Link(os.getpid(), os.getppid() + 1, "x")]) is not None
