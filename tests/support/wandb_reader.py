"""Reading an offline W&B run back with W&B's own reader: ``wandb leet inspect --json <run>.wandb``
prints every record of the run's transaction log (the file ``wandb sync`` uploads) as one JSON
object per line. Nothing of gorp_ds is used: this is the independent view of what W&B stored."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def wandb_cli() -> str:
    """The ``wandb`` command next to the interpreter running the tests."""
    return str(Path(sys.executable).parent / "wandb")


def has_inspect() -> bool:
    """Whether this wandb has ``wandb leet inspect`` (the reader below)."""
    proc = subprocess.run([wandb_cli(), "leet", "inspect", "--help"], capture_output=True, text=True)
    return proc.returncode == 0 and "--json" in proc.stdout


def read_records(run_file: Path) -> list[dict]:
    proc = subprocess.run([wandb_cli(), "leet", "inspect", "--json", str(run_file)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def offline_runs(wandb_dir: Path) -> dict[str, Path]:
    """``{run name: its .wandb file}`` of every offline run under ``wandb_dir`` (WANDB_DIR)."""
    runs = {}
    for run_file in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        header = next(r for r in read_records(run_file) if r["type"] == "run")
        name = header["run"].get("display_name")
        assert name not in runs, f"two W&B runs named {name}"
        runs[name] = run_file
    return runs


def history_by_axis(run_file: Path, axes: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """Every logged scalar of the run: ``{tag: [(step, value), …]}`` in logging order, the step read
    from the row's step metric (the one of ``axes`` the row holds; exactly one must be there)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for record in read_records(run_file):
        if record["type"] != "history":
            continue
        item = record["history"]["item"]
        present = [axis for axis in axes if axis in item]
        if len(present) != 1:
            pytest.fail(f"W&B history row without exactly one step axis of {axes}: {item}")
        step = item[present[0]]
        assert step == int(step), item
        for tag, value in item.items():
            if tag.startswith("_") or tag in axes:
                continue
            scalars.setdefault(tag, []).append((int(step), float(value)))
    return scalars
