"""The real ``deepspeed`` launcher around 2 CPU ranks (gorp, tiny LLaMA, the arguments of
test_cl_faults): the launcher killed or terminated mid-task, user errors printed once, resume
without ``latest``, and nothing left in /dev/shm.

One output directory goes through this chain, and must end exactly like gorp in the uninterrupted
six-method launch (made once per session, shared with test_cl_faults and test_cl_end_to_end):

1. ``deepspeed`` (plain, as a user runs it); the ranks pause after task 1 step 3 (``GORP_DS_PAUSE_AT``)
   and the ``deepspeed`` process gets SIGKILL. Its per-node launcher and the ranks outlive it; the
   ranks notice, checkpoint step 3, write the requeue marker and exit: no process of the launch is
   left.
2. ``latest`` deleted; ``launch/slurm/node.sh`` (the command a SLURM job runs on each node, under a
   stand-in ``scontrol``) with ``--resume``: it resumes from the newest complete tag; the ranks
   pause after task 2 step 1 and every process of the task gets SIGTERM, as slurmstepd sends it.
   DeepSpeed's per-node launcher stops its ranks and exits with 1; the ranks checkpoint step 1 and
   exit with 75; node.sh reports 75 (the requeue marker) and writes it for train.sbatch.
3. ``latest`` deleted again; ``--resume auto``: finishes, bit-identical to the uninterrupted run.

The user-error launches (below) are independent of the chain and run beside it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.support import REPO
from tests.support.launch import RUN_ARGS, TRAIN, clean_env, deepspeed, free_port, launch, six_method_run
from tests.support.resume_checks import assert_resumed_equals_uninterrupted
from tests.support.side_by_side import side_by_side

pytestmark = pytest.mark.slow
GORP_ONLY = ("--method", "gorp")
NODE_SH = REPO / "launch" / "slurm" / "node.sh"
SCONTROL = '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo localhost\n'


def _run_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--ds_config", str(REPO / "ds_configs" / "zero2.json"), "--model", str(model_dir), *RUN_ARGS,
            "--output-dir", str(out), *GORP_ONLY, *extra]


def _latest(out: Path) -> str | None:
    latest = out / "gorp" / "checkpoints" / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def _shm_files(port: int) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def _wait_for(paths: list[Path], proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.is_file() for p in paths):
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)


def _running(process: psutil.Process) -> bool:
    try:  # an ended orphan may stay a zombie until its new parent reaps it: it runs no more
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(processes: list[psutil.Process], timeout: float = 120) -> list[int]:
    """The pids still running after ``timeout`` (none, when every process ended)."""
    deadline = time.monotonic() + timeout
    while any(map(_running, processes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p.pid for p in processes if _running(p)]


def _interrupted_launch(tmp: Path, name: str, command: list[str], env: dict[str, str], pause: str,
                        interrupt) -> dict:
    """Start ``command`` in its own session, wait until both ranks pause after ``pause``
    (``task,step``), call ``interrupt(process)``, wait for every process of the launch to end."""
    log = tmp / f"{name}.log"
    prefix = tmp / f"{name}_pause"
    env = dict(env, GORP_DS_PAUSE_AT=f"{pause},{prefix}")
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_for([Path(f"{prefix}.rank{r}") for r in range(2)], proc, log)
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        ranks = [int(Path(f"{prefix}.rank{r}").read_text()) for r in range(2)]
        assert set(ranks) <= {p.pid for p in tree}
        buffers = [sorted({line.split(None, 5)[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
                           if "deepspeed_allreduce_buffer_" in line}) for pid in ranks]
        interrupt(proc)
        status = proc.wait(timeout=240)
        left = _wait_gone(tree[1:])  # the command itself is this process's child, reaped above
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return {"status": status, "left": left, "tree": len(tree), "out": log.read_text(), "buffers": buffers}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir) -> Path:
    return six_method_run(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def launches(tmp_path_factory, tiny_model_dir, reference) -> dict:
    """The chain, and beside it (independent launches, side by side) the user-error launches."""
    tmp = tmp_path_factory.mktemp("launcher")
    chain, errors = side_by_side(
        lambda: _chain(tmp / "chain", tiny_model_dir),
        lambda: {tuple(flags): _user_error_launch(tmp / f"error_{number}", tiny_model_dir, flags)
                 for number, (flags, _) in enumerate(USER_ERRORS)})
    return {"chain": chain, "errors": errors}


@pytest.fixture(scope="module")
def chain(launches) -> dict:
    return launches["chain"]


def _chain(tmp: Path, tiny_model_dir: Path) -> dict:
    tmp.mkdir()
    out = tmp / "run"
    record: dict = {"out": out}

    # 1. the plain `deepspeed` command, SIGKILLed
    port = free_port()
    marker = tmp / "requeue_1"
    command = [deepspeed(), "--num_gpus", "2", "--master_port", str(port), str(TRAIN),
               *_run_args(tiny_model_dir, out)]
    first = _interrupted_launch(tmp, "kill", command, clean_env(GORP_DS_REQUEUE_FILE=str(marker)), "0,3",
                                lambda proc: proc.kill())
    first.update(latest=_latest(out), marker=marker.read_text() if marker.is_file() else None,
                 shm=_shm_files(port), port=port)
    record["kill"] = first

    # 2. node.sh (a SLURM job's command on each node) with --resume, no `latest`; SIGTERM to every process
    (out / "gorp" / "checkpoints" / "latest").unlink()
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    status_dir = tmp / "status"
    status_dir.mkdir()
    port = free_port()
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}{Path(deepspeed()).parent}{os.pathsep}{os.environ['PATH']}",
                    SLURM_NODEID="0", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="localhost",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GPUS_PER_NODE="2", LAUNCHER="deepspeed",
                    NODE_STATUS_DIR=str(status_dir), TMPDIR=str(tmp))
    second = _interrupted_launch(tmp, "term", ["bash", str(NODE_SH), *_run_args(tiny_model_dir, out, "--resume")],
                                 env, "1,1", lambda proc: os.killpg(proc.pid, signal.SIGTERM))
    node_status = status_dir / "node0"
    second.update(latest=_latest(out), node_status=node_status.read_text().strip() if node_status.is_file() else None,
                  shm=_shm_files(port), markers_left=sorted(p.name for p in tmp.glob("gorp-requeue-*")))
    record["term"] = second

    # 3. --resume auto, no `latest`: to the end
    (out / "gorp" / "checkpoints" / "latest").unlink()
    proc = launch(tiny_model_dir, out, *GORP_ONLY, "--resume", "auto")
    record["last"] = {"status": proc.returncode, "out": proc.stdout + proc.stderr}
    return record


def test_killed_launcher_leaves_no_rank_and_a_checkpoint_of_the_step(chain) -> None:
    first = chain["kill"]
    assert first["tree"] >= 4, "deepspeed, its per-node launcher and two ranks"
    assert first["left"] == [], f"processes of the launch still running: {first['left']}\n{first['out'][-3000:]}"
    assert first["status"] == -signal.SIGKILL
    assert first["latest"] == "task01_step000003", first["out"][-3000:]
    assert first["marker"] == "75 task01_step000003\n"
    assert first["out"].count("is gone; stopping as on SIGTERM") == 2, "each rank saw its launcher go"
    assert first["out"].count("pre-empted by a signal: checkpoint 'task01_step000003' written") == 1
    assert "Traceback" not in first["out"]
    assert first["shm"] == []
    # DeepSpeed's CPU all-reduce buffers, named as deepspeed_patches.CPU_ALLREDUCE_BUFFER says: each
    # rank maps both ranks' buffers, unlinked from /dev/shm at start-up ("(deleted)") while in use.
    port = first["port"]
    expected = [f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{r} (deleted)" for r in range(2)]
    assert first["buffers"] == [expected, expected]


def test_terminated_job_step_checkpoints_and_reports_75(chain) -> None:
    second = chain["term"]
    assert second["left"] == [], f"processes of the launch still running: {second['left']}\n{second['out'][-3000:]}"
    assert "there is no 'latest' file; falling back to the newest complete checkpoint 'task01_step000003'" \
        in second["out"], second["out"][-3000:]
    assert "resumed at task 1, step 3" in second["out"]
    assert second["latest"] == "task02_step000001"
    # DeepSpeed's launcher, signalled itself, exits with 1; the ranks' marker makes it 75 for train.sbatch.
    assert "the launcher exited with status 1 after its ranks checkpointed" in second["out"], second["out"][-3000:]
    assert second["status"] == 75 and second["node_status"] == "75"
    assert second["out"].count("pre-empted by a signal: checkpoint 'task02_step000001' written") == 1
    assert "Traceback" not in second["out"]
    assert second["shm"] == [] and second["markers_left"] == []


def test_resume_auto_without_latest_equals_uninterrupted(chain, reference) -> None:
    last = chain["last"]
    assert last["status"] == 0, last["out"][-3000:]
    assert "falling back to the newest complete checkpoint 'task02_step000001'" in last["out"]
    assert "resumed at task 2, step 1" in last["out"], last["out"][-3000:]
    assert_resumed_equals_uninterrupted(chain["out"], reference, merges=4)


# ------------------------------------------------------------------------ user errors, printed once
# Local rank 0 prints; the launcher stops every rank as soon as one exits with an error. Rank 0 is
# started 3 s late here (a wrapper in front of the script), so the other rank always meets the error
# first: the worst order, where rank 0 used to be stopped before it printed.
DELAY_RANK0 = f'#!/bin/sh\n[ "$LOCAL_RANK" = 0 ] && sleep 3\nexec {sys.executable} -u {TRAIN} "$@"\n'


USER_ERRORS = [
    (["--max-length", "7"], "--max-length must be >= 8, got 7"),
    (["--update-gap", "0"], "--update-gap must be >= 1, got 0"),
    (["--lr-plain", "-1"], "--lr-plain must be >= 0, got -1.0"),
    (["--no-such-flag"], "launch/train.py: unrecognized arguments: --no-such-flag ('launch/train.py --help' lists the flags)"),
]


def _user_error_launch(folder: Path, tiny_model_dir: Path, flags: list[str]) -> subprocess.CompletedProcess:
    folder.mkdir()
    wrapper = folder / "delayed_rank0"
    wrapper.write_text(DELAY_RANK0)
    wrapper.chmod(0o755)
    command = [deepspeed(), "--num_gpus", "2", "--master_port", str(free_port()), "--no_python", str(wrapper),
               "--model", str(tiny_model_dir), "--output-dir", str(folder / "run"), *flags]
    return subprocess.run(command, env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("flags, expected", USER_ERRORS)
def test_user_error_is_printed_once_before_the_ranks_exit(launches, flags, expected) -> None:
    proc = launches["errors"][tuple(flags)]
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    assert "usage:" not in output, output[-3000:]  # a bad flag too: one line, not argparse's usage
    errors = [line for line in output.splitlines() if "gorp_ds: error:" in line]
    assert len(errors) == 1 and errors[0].endswith(expected), output[-3000:]
