"""The `gorp-ds` entry runs under each launcher: torchrun and deepspeed's --module, two CPU ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.launch import clean_env, free_port
from tests.support.side_by_side import side_by_side

pytestmark = pytest.mark.slow


LAUNCHERS = ["torchrun", "deepspeed"]


@pytest.fixture(scope="module")
def launches(tmp_path_factory, tiny_model_dir: Path) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Each launcher's run and output directory; the two launches are independent and run side by side."""
    root = tmp_path_factory.mktemp("launchers")
    return dict(zip(LAUNCHERS, side_by_side(*(lambda name=name: _launch(name, root / name, tiny_model_dir)
                                              for name in LAUNCHERS))))


def _launch(launcher: str, tmp_path: Path, tiny_model_dir: Path) -> tuple[subprocess.CompletedProcess, Path]:
    tmp_path.mkdir()
    bin_dir = Path(sys.executable).parent
    port = str(free_port())
    command = ([str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", port, "-m", "gorp_ds"]
               if launcher == "torchrun" else
               [str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", port, "--module", "gorp_ds"])
    out = tmp_path / "out"
    env = clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([*command, "train", "--model", str(tiny_model_dir), "--tasks", "emb_color",
                           "--max-steps-per-task", "2", "--eval-samples", "4", "--global-batch-size", "4",
                           "--micro-batch-size", "2", "--export", "false", "--output-dir", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    return proc, out


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_gorp_ds_train_under_a_launcher(launches, launcher: str) -> None:
    proc, out = launches[launcher]
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((out / "gorp" / "results.json").read_text())
    assert result["world_size"] == 2 and len(result["R"]) == 2
