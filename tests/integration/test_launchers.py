"""The `gorp-ds` entry runs under each launcher: torchrun and deepspeed's --module, two CPU ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.launch import clean_env, free_port

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_gorp_ds_train_under_a_launcher(launcher: str, tmp_path: Path, tiny_model_dir: Path) -> None:
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
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((out / "gorp" / "results.json").read_text())
    assert result["world_size"] == 2 and len(result["R"]) == 2
