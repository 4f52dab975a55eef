"""A two-node launch on one CPU machine gives the same run as one node with two ranks.

Two ``deepspeed --no_ssh`` launchers (node ranks 0 and 1, one process each) are started side by
side, the way launch/slurm/node.sh starts one per node, and compared with one launcher running
two processes. Both runs have two ranks, the same data order and the same partitions, so R, the
metrics and the final fp32 masters and GORP state must agree exactly.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.launch import TRAIN, clean_env, deepspeed, free_port

TIMEOUT_S = 120
DEEPSPEED = deepspeed()

# The first task's LoRA A factors are drawn by PEFT from torch's global generator, which the
# runner does not seed; DeepSpeed broadcasts rank 0's values, so the ranks of one run agree, but
# two launches differ. Seeding the generator before train.py runs makes launches repeatable.
SEEDED_TRAIN = f"""
import runpy, sys
import torch

torch.manual_seed(0)
sys.argv[0] = {str(TRAIN)!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_args(model_dir: Path, out: Path) -> list[str]:
    return ["--ds_config", str(REPO / "ds_configs" / "zero2.json"), "--model", str(model_dir), "--method", "gorp",
            "--max-steps-per-task", "4", "--save-every", "2", "--eval-samples", "8", "--max-train-per-task", "64",
            "--global-batch-size", "8", "--micro-batch-size", "2", "--lr-lora", "1e-2", "--lr-full", "1e-2",
            "--update-gap", "2", "--output-dir", str(out)]


def start(cmd: list[str], log: Path, cpus: set[int] | None = None, cwd: Path = REPO) -> subprocess.Popen:
    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=clean_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=pin)


def wait_all(jobs: dict) -> None:
    """Wait for every launcher (``{name: (process, log)}``) up to TIMEOUT_S; kill those still running."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for job, _log in jobs.values():
            job.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for job, _log in jobs.values():
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()


def finish(jobs: dict[str, tuple[subprocess.Popen, Path]]) -> None:
    """Wait for every launcher; on failure or timeout show the logs."""
    wait_all(jobs)
    failed = {name: log for name, (job, log) in jobs.items() if job.returncode != 0}
    if failed:
        tails = "\n".join(f"--- {name}:\n" + "\n".join(log.read_text().splitlines()[-25:]) for name, log in failed.items())
        pytest.fail(f"launcher(s) failed: {', '.join(failed)}\n{tails}")


def final_state(out: Path) -> list[dict]:
    import torch

    checkpoints = out / "gorp" / "checkpoints"
    tag = (checkpoints / "latest").read_text().strip()
    files = sorted((checkpoints / tag / "gorp_state").glob("rank_*.pt"))
    assert len(files) == 2
    return [torch.load(f, map_location="cpu", weights_only=False) for f in files]


def assert_same_state(a: dict, b: dict) -> None:
    import torch

    assert a["pieces"].keys() == b["pieces"].keys()
    for name, piece in a["pieces"].items():
        for key, value in piece.items():
            assert torch.equal(value, b["pieces"][name][key]), f"{name}.{key} differs"
    assert a["low_rank"].keys() == b["low_rank"].keys()
    for name, state in a["low_rank"].items():
        for key, value in state.items():
            assert torch.equal(value, b["low_rank"][name][key]), f"{name} low-rank {key} differs"
    assert a["shared"].keys() == b["shared"].keys()
    for name, basis in a["shared"].items():
        assert torch.equal(basis, b["shared"][name]), f"{name} shared space differs"


@pytest.mark.slow
def test_two_nodes_match_one_node(tmp_path: Path, tiny_model_dir: Path) -> None:
    entry = tmp_path / "seeded_train.py"
    entry.write_text(SEEDED_TRAIN)
    # `deepspeed --no_ssh` still needs a hostfile naming both nodes: without one the launcher
    # knows only localhost and refuses --num_nodes 2 (see launch/slurm/node.sh).
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    one, two = tmp_path / "one_node", tmp_path / "two_nodes"
    port_one, port_two = free_port(), free_port()
    while port_two == port_one:
        port_two = free_port()

    cpus = sorted(os.sched_getaffinity(0))
    jobs = {
        "one node, two ranks": (start([DEEPSPEED, "--num_gpus", "2", "--master_port", str(port_one), str(entry),
                                       *run_args(tiny_model_dir, one)], tmp_path / "one.log"), tmp_path / "one.log"),
    }
    for node in (0, 1):
        log = tmp_path / f"node{node}.log"
        cmd = [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2", "--node_rank", str(node),
               "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", str(port_two), str(entry),
               *run_args(tiny_model_dir, two)]
        # Each "node" gets a core of its own, as a separate machine would. The runner then uses
        # one thread per rank, as the one-node run does with two ranks on the same cores, so both
        # runs do the same floating-point reductions (and do not oversubscribe the cores).
        jobs[f"node {node}"] = (start(cmd, log, {cpus[node % len(cpus)]}), log)
    finish(jobs)

    a = json.loads((one / "gorp" / "results.json").read_text())
    b = json.loads((two / "gorp" / "results.json").read_text())
    assert a["world_size"] == b["world_size"] == 2
    assert a["tasks"] == b["tasks"]
    assert a["R"] == b["R"]
    assert a["metrics"] == b["metrics"]
    # R of a tiny random model is mostly zeros; the trained state is the sharper comparison.
    for state_a, state_b in zip(final_state(one), final_state(two), strict=True):
        assert_same_state(state_a, state_b)
    assert "node_rank=1" in (tmp_path / "node1.log").read_text()


@pytest.mark.slow
def test_data_missing_on_one_node_stops_both(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A data path that exists on node 0 but not on node 1. Both "nodes" share this machine's
    filesystem, so each launcher runs in its own working directory and the run names the data by
    a relative path (``--data-dir data``): node 0's directory holds ``data/``, node 1's does not,
    which is exactly what node 1 of a cluster without a shared filesystem sees. Node 1's first
    rank prints the one-line error with its host name; node 0 stops too (saying which rank and
    host saw the problem) instead of waiting in a collective; both launchers exit non-zero."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    task = tmp_path / "node0" / "data" / "TC" / "topics"
    task.mkdir(parents=True)
    (task / "labels.json").write_text(json.dumps(["World", "Sports"]))
    for split in ("train", "test"):
        rows = [{"sentence": f"{split} {i}", "label": ["World", "Sports"][i % 2]} for i in range(8)]
        (task / f"{split}.json").write_text(json.dumps(rows))
    (tmp_path / "node1").mkdir()
    out = tmp_path / "out"
    args = ["--ds_config", str(REPO / "ds_configs" / "zero2.json"), "--model", str(tiny_model_dir), "--method", "gorp",
            "--data-dir", "data", "--tasks", "TC/topics", "--max-steps-per-task", "1", "--global-batch-size", "2",
            "--output-dir", str(out)]
    jobs = {}
    for node in (0, 1):
        log = tmp_path / f"node{node}.log"
        cmd = [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2", "--node_rank", str(node),
               "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), str(TRAIN), *args]
        jobs[node] = (start(cmd, log, cwd=tmp_path / f"node{node}"), log)
    wait_all(jobs)
    logs = {node: log.read_text() for node, (_, log) in jobs.items()}
    for node, (job, _) in jobs.items():
        assert job.returncode not in (0, None, -signal.SIGKILL), f"node {node}: rc {job.returncode}\n{logs[node][-3000:]}"
    host = socket.gethostname()
    errors = {node: [line[line.index("gorp_ds: error:"):] for line in text.splitlines() if "gorp_ds: error:" in line]
              for node, text in logs.items()}
    assert len(errors[1]) == 1, logs[1][-3000:]
    assert errors[1][0].startswith(f"gorp_ds: error: {host}: --data-dir 'data' does not exist"), errors[1]
    assert "data.data_dir" not in errors[1][0]
    assert len(errors[0]) == 1 and "seen by rank 1" in errors[0][0], logs[0][-3000:]
    assert "Traceback" not in logs[0] + logs[1]
    assert not (out / "config.yaml").exists()  # stopped before the output directory was touched
