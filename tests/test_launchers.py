"""The `gorp-ds` entry runs under each launcher: torchrun and deepspeed's --module, two CPU ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_gorp_ds_train_under_a_launcher(launcher: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    bin_dir = Path(sys.executable).parent
    port = str(_free_port())
    command = ([str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", port, "-m", "gorp_ds"]
               if launcher == "torchrun" else
               [str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", port, "--module", "gorp_ds"])
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    proc = subprocess.run([*command, "train", "--model", str(tiny_model_dir), "--tasks", "emb_color",
                           "--max-steps-per-task", "2", "--eval-samples", "4", "--global-batch-size", "4",
                           "--micro-batch-size", "2", "--export", "false", "--output-dir", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((out / "gorp" / "results.json").read_text())
    assert result["world_size"] == 2 and len(result["R"]) == 2
