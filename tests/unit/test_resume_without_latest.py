"""A checkpoint folder whose ``latest`` is gone still resumes: the run directory counts committed
tags as a checkpoint (``--resume`` and ``--resume auto``), export/eval find it, and loading takes the
newest complete tag and says which and why. (The 2-rank launch that resumes this way and ends
bit-identical to an uninterrupted run is tests/integration/test_cl_launcher.py.)"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from gorp_ds.cl.restore import find_checkpoint
from gorp_ds.cl.run_dir import _has_checkpoint
from gorp_ds.log import get_logger
from gorp_ds.zero.checkpoint_io import commit_checkpoint, resolve_tag


def _tags(folder: Path, *tags: str) -> None:
    for tag in tags:  # one process: the commit protocol's agreements are local
        commit_checkpoint(str(folder), tag, {"gorp_state/rank_00000.pt": {"x": torch.ones(2)}}, rank=0)
        time.sleep(0.01)  # manifests' creation times differ


def test_committed_tags_without_latest_are_a_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "gorp" / "checkpoints"
    assert not _has_checkpoint(tmp_path / "run", "gorp")
    _tags(folder, "task01_step000002", "task01_step000004", "task02_step000000")
    os.remove(folder / "latest")
    (folder / "task02_step000002").mkdir()  # an interrupted save's folder (no manifest) is no candidate
    assert _has_checkpoint(tmp_path / "run", "gorp")
    assert find_checkpoint(str(tmp_path / "run" / "gorp")) == (str(folder), None)
    assert find_checkpoint(str(folder)) == (str(folder), None)
    assert find_checkpoint(str(folder / "task01_step000004")) == (str(folder), "task01_step000004")
    assert find_checkpoint(str(tmp_path / "run")) is None

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    get_logger().addHandler(handler)
    try:
        assert resolve_tag(str(folder)) == "task02_step000000"
    finally:
        get_logger().removeHandler(handler)
    (message,) = [r.getMessage() for r in records]
    assert "there is no 'latest' file; falling back to the newest complete checkpoint 'task02_step000000'" in message
