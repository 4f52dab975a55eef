"""launch/slurm/train.sbatch under stand-in SLURM and launcher executables.

``srun``, ``scontrol``, ``deepspeed`` and ``torchrun`` are small Python programs written into a
temporary bin directory placed first on PATH. They record what they were asked to do instead of
doing it; the stand-in ``srun`` runs its command once per node of the allocation, all nodes at the
same time, with ``SLURM_NODEID``/``SLURM_PROCID`` set and the output sent to that node's log file,
the way a real step with one task per node would (and, like ``--kill-on-bad-exit``, stopping the
other nodes with SIGTERM when one fails). The stand-in launchers act as a node's launcher and
ranks together: they exit with ``FAKE_LAUNCH_STATUS`` (``FAKE_LAUNCH_STATUS_NODE<N>`` for one node)
and, on USR1, with the training's pre-emption status 75. The batch script is run from a copy in a
spool directory, as sbatch does, with the repository as the submission directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO

SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
JOB_ID = 731942

NODELISTS = {
    1: ("gpu017", ["gpu017"]),
    2: ("gpu[017-018]", ["gpu017", "gpu018"]),
    4: ("gpu[017-018,020],h200-3", ["gpu017", "gpu018", "gpu020", "h200-3"]),
}

SCONTROL = r'''
import json, os, re, sys

def expand(nodelist):
    hosts = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = match.groups()
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return hosts

records = os.environ["FAKE_RECORDS"]
with open(os.path.join(records, "scontrol.jsonl"), "a") as out:
    out.write(json.dumps(sys.argv[1:]) + "\n")
if sys.argv[1:3] == ["show", "hostnames"]:
    print("\n".join(expand(sys.argv[3] if len(sys.argv) > 3 else os.environ["SLURM_JOB_NODELIST"])))
elif sys.argv[1:3] == ["show", "node"]:
    name = sys.argv[3]
    addr = os.environ.get("FAKE_NODE_ADDR", "10.1.0.{}").format(sum(map(ord, name)) % 250)
    print(f"NodeName={name} Arch=x86_64 CoresPerSocket=32\n   NodeAddr={addr} NodeHostName={name} Version=22.05.8")
elif sys.argv[1] != "requeue":
    sys.exit(f"stand-in scontrol: unsupported {sys.argv[1:]}")
'''

SRUN = r'''
import json, os, signal, subprocess, sys, time

args = sys.argv[1:]
options = {}
while args and args[0].startswith("-"):
    key, _, value = args.pop(0).partition("=")
    options[key] = value
records = os.environ["FAKE_RECORDS"]
with open(os.path.join(records, "srun.jsonl"), "a") as out:
    out.write(json.dumps({"options": options, "command": args}) + "\n")
nodes = int(options.get("--nodes", os.environ["SLURM_JOB_NUM_NODES"]))
tasks = []

def forward(signum, frame):  # slurmstepd signals every process of the step
    for task in tasks:
        if task.poll() is None:
            os.killpg(task.pid, signum)

signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGUSR1, forward)
for node in range(nodes):  # the nodes run at the same time, as in a real step
    env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_LOCALID="0",
               SLURM_STEP_NUM_NODES=str(nodes), SLURM_STEP_NUM_TASKS=str(nodes))
    log = options["--output"].replace("%x", os.environ["SLURM_JOB_NAME"]).replace(
        "%j", os.environ["SLURM_JOB_ID"]).replace("%n", str(node))
    with open(log, "a" if options.get("--open-mode") == "append" else "w") as out:
        tasks.append(subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
# --kill-on-bad-exit: a task that fails gets the others stopped with SIGTERM
killed = False
while any(task.poll() is None for task in tasks):
    if not killed and options.get("--kill-on-bad-exit") == "1" and any(t.poll() not in (None, 0) for t in tasks):
        killed = True
        for task in tasks:
            if task.poll() is None:
                os.killpg(task.pid, signal.SIGTERM)
    time.sleep(0.02)
codes = [task.returncode for task in tasks]
sys.exit(max(c if c >= 0 else 128 - c for c in codes))
'''

LAUNCHER = r'''
import json, os, signal, sys, time

argv = sys.argv[1:]
if argv == ["--help"]:  # the batch script's early check that the launcher runs
    sys.exit(int(os.environ.get("FAKE_HELP_STATUS", "0")))
node = os.environ["SLURM_NODEID"]
# DeepSpeed's launcher stops its ranks on TERM (exit 1 here, as it does without a rank's status);
# the ranks checkpoint on USR1 and exit with 75. Installed first: node.sh ignores both.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(int(os.environ.get("FAKE_TERM_STATUS", "143"))))
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))
hostfile = next((a.split("=", 1)[1] for a in argv if a.startswith("--hostfile=")), None)
keys = ["SLURM_NODEID", "SLURM_PROCID", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "LAUNCHER", "PATH"]
record = {
    "launcher": os.path.basename(sys.argv[0]),
    "argv": argv,
    "env": {k: os.environ.get(k) for k in keys},
    "cwd": os.getcwd(),
    "hostfile": open(hostfile).read() if hostfile else None,
    "pid": os.getpid(),
}
records = os.environ["FAKE_RECORDS"]
name = f"launch-node{os.environ['SLURM_NODEID']}-{os.getpid()}.json"
with open(os.path.join(records, name + ".tmp"), "w") as out:
    json.dump(record, out)
os.replace(os.path.join(records, name + ".tmp"), os.path.join(records, name))  # whole or not at all
print(f"stand-in {record['launcher']} on node {os.environ['SLURM_NODEID']}", flush=True)
if os.environ.get("FAKE_ORPHAN_RANK_S"):  # a rank that outlives its killed launcher, then leaves the marker
    import subprocess
    rank = ("import os, sys, time; time.sleep(float(sys.argv[1])); "
            "open(os.environ['GORP_DS_REQUEUE_FILE'], 'w').write('75 task03_step000007\\n')")
    subprocess.Popen([sys.executable, "-c", rank, os.environ["FAKE_ORPHAN_RANK_S"], "launch/train.py"])
time.sleep(float(os.environ.get(f"FAKE_LAUNCH_SLEEP_NODE{node}", os.environ.get("FAKE_LAUNCH_SLEEP", "0"))))
sys.exit(int(os.environ.get(f"FAKE_LAUNCH_STATUS_NODE{node}", os.environ.get("FAKE_LAUNCH_STATUS", "0"))))
'''


class FakeCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.records = root / "records"
        self.spool = root / "spool"
        self.logs = root / "logs"
        for d in (self.bin, self.records, self.spool):
            d.mkdir()
        for name, body in (("scontrol", SCONTROL), ("srun", SRUN), ("deepspeed", LAUNCHER), ("torchrun", LAUNCHER)):
            path = self.bin / name
            path.write_text(f"#!{sys.executable}\n{body}")
            path.chmod(0o755)
        # sbatch runs a copy of the batch script, not the file in the repository
        self.script = self.spool / "slurm_script"
        shutil.copy(SBATCH, self.script)
        self.run_config = root / "my_run.json"
        self.run_config.write_text(json.dumps({"model": "meta-llama/Llama-2-7b-hf", "order": "A"}))

    def env(self, nodes: int, restarts: int | None = None, **extra: str) -> dict[str, str]:
        nodelist, _ = NODELISTS[nodes]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "GPUS_PER_NODE"))}
        for key in ("LAUNCHER", "RESUME", "DS_CONFIG", "OUTPUT_DIR", "REPO_DIR", "VENV", "RDZV_PORT", "RDZV_ADDR",
                    "MAX_REQUEUES", "CUDA_VISIBLE_DEVICES", "ENV_SETUP"):
            env.pop(key, None)
        env.update({
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "FAKE_RECORDS": str(self.records),
            "LOG_DIR": str(self.logs),
            "SLURM_JOB_ID": str(JOB_ID),
            "SLURM_JOBID": str(JOB_ID),
            "SLURM_JOB_NAME": "gorp",
            "SLURM_SUBMIT_DIR": str(REPO),
            "SLURM_JOB_NODELIST": nodelist,
            "SLURM_NODELIST": nodelist,
            "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_NNODES": str(nodes),
            "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_GPUS_PER_NODE": "h200:8",
            "SLURM_GPUS_ON_NODE": "8",
            "SLURM_CPUS_PER_TASK": "16",
            "SLURM_NODEID": "0",  # the batch script runs on the first node
            "SLURMD_NODENAME": NODELISTS[nodes][1][0],
        })
        if restarts is not None:
            env["SLURM_RESTART_COUNT"] = str(restarts)
        env.update(extra)
        return env

    def start(self, env: dict[str, str], *args: str) -> subprocess.Popen:
        return subprocess.Popen(["bash", str(self.script), *args], cwd=self.spool, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def run(self, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(self.script), *args], cwd=self.spool, env=env,
                              capture_output=True, text=True, timeout=60)

    def launches(self) -> list[dict]:
        found = [json.loads(p.read_text()) for p in sorted(self.records.glob("launch-*.json"))]
        return sorted(found, key=lambda r: int(r["env"]["SLURM_NODEID"]))

    def jsonl(self, name: str) -> list:
        path = self.records / name
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def node_addr(name: str) -> str:
    """The NodeAddr the stand-in ``scontrol show node`` reports (not the node name)."""
    return f"10.1.0.{sum(map(ord, name)) % 250}"


def flag(argv: list[str], name: str) -> str | None:
    """Value of ``--name=value`` or ``--name value`` in argv (None when absent)."""
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name:
            return argv[i + 1]
    return None


def train_args(argv: list[str]) -> list[str]:
    """Arguments after the training script."""
    return argv[argv.index("launch/train.py") + 1:]


@pytest.fixture
def cluster(tmp_path: Path) -> FakeCluster:
    return FakeCluster(tmp_path)


def test_batch_directives() -> None:
    """What sbatch reads: the #SBATCH lines before the first command."""
    directives = {}
    for line in SBATCH.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            key, _, value = line.split()[1].partition("=")
            directives[key] = value
        elif line.strip() and not line.startswith("#"):
            break
    assert directives["--ntasks-per-node"] == "1"
    assert directives["--nodes"] == "1"
    # Counts a cluster may not satisfy (GPU GRES, cores per node) are not hard-wired.
    assert not {"--gpus-per-node", "--gres", "--cpus-per-task", "--gpus", "--mem"} & set(directives)
    assert "--requeue" in directives
    assert directives["--open-mode"] == "append"
    assert directives["--signal"] == "B:USR1@120"
    assert directives["--output"] == "logs/%x-%j.out"
    header = SBATCH.read_text().split("#SBATCH")[0]
    for guidance in ("--gpus-per-node", "GPUS_PER_NODE", "--exclusive", "--mem=0", "--cpus-per-task", "VENV",
                     "module load", "status 75"):
        assert guidance in header, guidance


@pytest.mark.parametrize("restarts", [None, 0, 2])
@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_one_launcher_per_node(cluster: FakeCluster, nodes: int, restarts: int | None) -> None:
    done = cluster.run(cluster.env(nodes, restarts), str(cluster.run_config))
    assert done.returncode == 0, done.stdout + done.stderr
    hosts = NODELISTS[nodes][1]

    (srun,) = cluster.jsonl("srun.jsonl")
    assert srun["options"]["--nodes"] == str(nodes)
    assert srun["options"]["--ntasks"] == str(nodes)
    assert srun["options"]["--ntasks-per-node"] == "1"
    assert srun["options"]["--cpus-per-task"] == "16"
    assert srun["options"]["--output"].endswith("%x-%j-node%n.out")

    launches = cluster.launches()
    assert len(launches) == nodes, "one launcher per node"
    assert [r["env"]["SLURM_NODEID"] for r in launches] == [str(n) for n in range(nodes)]
    ports = set()
    for node, record in enumerate(launches):
        argv = record["argv"]
        assert record["launcher"] == "deepspeed"
        assert record["cwd"] == str(REPO)
        assert "--no_ssh" in argv
        assert flag(argv, "--node_rank") == str(node)
        assert flag(argv, "--num_nodes") == str(nodes)
        assert flag(argv, "--num_gpus") == "8"
        assert flag(argv, "--master_addr") == node_addr(hosts[0]), "the first node's NodeAddr"
        ports.add(flag(argv, "--master_port"))
        # deepspeed --no_ssh needs every node in its hostfile to accept node ranks > 0
        assert record["hostfile"].split("\n")[:-1] == [f"{h} slots=8" for h in hosts]
        args = train_args(argv)
        assert flag(args, "--ds_config") == "ds_configs/zero2.json"
        assert flag(args, "--config") == str(cluster.run_config)
        assert flag(args, "--resume") == "auto", "every start resumes when there is a checkpoint"
        log = cluster.logs / f"gorp-{JOB_ID}-node{node}.out"
        assert f"stand-in deepspeed on node {node}" in log.read_text()
    assert len(ports) == 1, "every node uses the same rendezvous port"
    port = int(ports.pop())
    assert 1024 < port < 65536 and port == 20000 + JOB_ID % 40000
    assert not any(c[0] == "requeue" for c in cluster.jsonl("scontrol.jsonl"))


def test_overrides_and_extra_flags(cluster: FakeCluster) -> None:
    env = cluster.env(2, 0, RESUME="1", DS_CONFIG="ds_configs/zero1.json", OUTPUT_DIR="/scratch/runs/a",
                      SLURM_GPUS_PER_NODE="4", RDZV_PORT="29999",
                      MASTER_ADDR="localhost", MASTER_PORT="29500")
    done = cluster.run(env, str(cluster.run_config), "--method", "gorp,o-lora", "--save-every", "50")
    assert done.returncode == 0, done.stdout + done.stderr
    launches = cluster.launches()
    assert len(launches) == 2
    for record in launches:
        argv = record["argv"]
        assert flag(argv, "--num_gpus") == "4"
        assert flag(argv, "--master_addr") == node_addr("gpu017"), "a MASTER_ADDR left in the environment is ignored"
        assert flag(argv, "--master_port") == "29999"
        args = train_args(argv)
        assert flag(args, "--ds_config") == "ds_configs/zero1.json"
        assert flag(args, "--output-dir") == "/scratch/runs/a"
        assert "--resume" in args and "auto" not in args, "RESUME=1: a checkpoint is required"
        assert args[-4:] == ["--method", "gorp,o-lora", "--save-every", "50"]


def test_torchrun_launcher(cluster: FakeCluster) -> None:
    done = cluster.run(cluster.env(2, 1, LAUNCHER="torchrun"), str(cluster.run_config))
    assert done.returncode == 0, done.stdout + done.stderr
    launches = cluster.launches()
    assert [r["launcher"] for r in launches] == ["torchrun", "torchrun"]
    for node, record in enumerate(launches):
        argv = record["argv"]
        assert flag(argv, "--nnodes") == "2"
        assert flag(argv, "--node_rank") == str(node)
        assert flag(argv, "--nproc_per_node") == "8"
        assert flag(argv, "--master_addr") == node_addr("gpu017")
        assert flag(train_args(argv), "--resume") == "auto"


def test_usage_error_without_run_config(cluster: FakeCluster) -> None:
    done = cluster.run(cluster.env(1))
    assert done.returncode != 0
    assert "usage: sbatch" in done.stdout + done.stderr
    assert cluster.launches() == []


def test_relative_run_config_is_resolved_against_the_submission_dir(cluster: FakeCluster) -> None:
    submit = cluster.root / "submit"
    (submit / "runs").mkdir(parents=True)
    (submit / "runs" / "a.yaml").write_text("order: A\n")
    env = cluster.env(1, 0, SLURM_SUBMIT_DIR=str(submit), REPO_DIR=str(REPO))
    done = cluster.run(env, "runs/a.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    (record,) = cluster.launches()
    assert record["cwd"] == str(REPO)
    assert flag(train_args(record["argv"]), "--config") == str(submit / "runs" / "a.yaml")

    missing = cluster.run(env, "runs/missing.json")
    assert missing.returncode == 2
    assert "runs/missing.json not found" in missing.stderr
    assert len(cluster.launches()) == 1


def test_node_warns_about_other_device_numbers(cluster: FakeCluster) -> None:
    done = cluster.run(cluster.env(1, 0, CUDA_VISIBLE_DEVICES="4,5,6,7", SLURM_GPUS_PER_NODE="4"),
                       str(cluster.run_config))
    assert done.returncode == 0, done.stdout + done.stderr
    log = (cluster.logs / f"gorp-{JOB_ID}-node0.out").read_text()
    assert "warning: CUDA_VISIBLE_DEVICES=4,5,6,7" in log


def test_training_failure_is_not_requeued(cluster: FakeCluster) -> None:
    done = cluster.run(cluster.env(2, 0, FAKE_LAUNCH_STATUS="3"), str(cluster.run_config))
    assert done.returncode == 3, done.stdout + done.stderr
    assert not any(c[0] == "requeue" for c in cluster.jsonl("scontrol.jsonl"))


def _wait_for_launch(cluster: FakeCluster, job: subprocess.Popen, nodes: int) -> None:
    deadline = time.monotonic() + 20
    while len(cluster.launches()) < nodes:
        assert job.poll() is None, job.communicate()[0]
        assert time.monotonic() < deadline, "the launcher never started"
        time.sleep(0.05)


def test_usr1_checkpoints_then_requeues_the_job(cluster: FakeCluster) -> None:
    """The time-limit warning (USR1 to the batch shell) reaches the training processes on every
    node; they stop with the pre-emption status 75 and the job is requeued."""
    job = cluster.start(cluster.env(2, 0, FAKE_LAUNCH_SLEEP="60"), str(cluster.run_config))
    try:
        _wait_for_launch(cluster, job, 2)
        started = time.monotonic()
        job.send_signal(signal.SIGUSR1)
        output, _ = job.communicate(timeout=20)
    finally:
        if job.poll() is None:
            job.kill()
    assert time.monotonic() - started < 10, "the step was not stopped"
    assert job.returncode == 0, output
    assert ["requeue", str(JOB_ID)] in cluster.jsonl("scontrol.jsonl")
    assert "checkpointed and stopped (status 75)" in output and "requeued job" in output
    for record in cluster.launches():  # the step was stopped on every node
        deadline = time.monotonic() + 10
        while _alive(record["pid"]):
            assert time.monotonic() < deadline, f"launcher of node {record['env']['SLURM_NODEID']} still runs"
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_usr1_after_too_many_requeues_stops_without_requeue(cluster: FakeCluster) -> None:
    job = cluster.start(cluster.env(1, 3, MAX_REQUEUES="3", FAKE_LAUNCH_SLEEP="30"), str(cluster.run_config))
    try:
        _wait_for_launch(cluster, job, 1)
        job.send_signal(signal.SIGUSR1)
        output, _ = job.communicate(timeout=20)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 75, output
    assert "not requeueing" in output and "finished with status 75" in output
    assert not any(c[0] == "requeue" for c in cluster.jsonl("scontrol.jsonl"))


def test_preemption_status_from_the_training_requeues(cluster: FakeCluster) -> None:
    """Ranks that were sent SIGTERM directly exit with 75 (checkpoint written): requeue."""
    done = cluster.run(cluster.env(2, 0, FAKE_LAUNCH_STATUS="75"), str(cluster.run_config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert ["requeue", str(JOB_ID)] in cluster.jsonl("scontrol.jsonl")


def test_ranks_that_outlive_a_killed_launcher_are_waited_for_and_requeue(cluster: FakeCluster) -> None:
    """The launcher dies (137) while its rank still checkpoints; node.sh waits for that rank, finds
    its requeue marker and reports 75 (gorp_ds/cl/preemption.py writes it), so the job is requeued."""
    done = cluster.run(cluster.env(1, 0, FAKE_LAUNCH_STATUS="137", FAKE_ORPHAN_RANK_S="2"), str(cluster.run_config))
    assert done.returncode == 0, done.stdout + done.stderr
    log = (cluster.logs / f"gorp-{JOB_ID}-node0.out").read_text()
    assert "the launcher exited with status 137 after its ranks checkpointed and stopped for a requeue " \
           "(75 task03_step000007): status 75" in log, log
    assert ["requeue", str(JOB_ID)] in cluster.jsonl("scontrol.jsonl")
    assert "checkpointed and stopped (status 75)" in done.stdout


def test_job_status_is_the_failing_nodes_not_the_stopped_ones(cluster: FakeCluster) -> None:
    """Node 1 fails with 2 (bad input); srun stops node 0 (143). The job's status is 2."""
    env = cluster.env(2, 0, FAKE_LAUNCH_STATUS_NODE1="2", FAKE_LAUNCH_SLEEP_NODE0="30")
    done = cluster.run(env, str(cluster.run_config))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "finished with status 2" in done.stdout
    assert not any(c[0] == "requeue" for c in cluster.jsonl("scontrol.jsonl"))
    assert not list(cluster.logs.glob(".status-*")), "the per-node status files are removed"


def test_rendezvous_address_override(cluster: FakeCluster) -> None:
    done = cluster.run(cluster.env(2, 0, RDZV_ADDR="192.168.7.1"), str(cluster.run_config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert {flag(r["argv"], "--master_addr") for r in cluster.launches()} == {"192.168.7.1"}


def test_submitted_from_outside_the_repository(cluster: FakeCluster) -> None:
    elsewhere = cluster.root / "elsewhere"
    elsewhere.mkdir()
    done = cluster.run(cluster.env(1, 0, SLURM_SUBMIT_DIR=str(elsewhere)), str(cluster.run_config))
    assert done.returncode == 2
    assert f"{elsewhere} is not the gorp_ds repository" in done.stderr and "REPO_DIR" in done.stderr
    assert cluster.jsonl("srun.jsonl") == []


def test_launcher_missing_or_broken_is_named_early(cluster: FakeCluster) -> None:
    (cluster.bin / "deepspeed").unlink()
    # A repository without .venv (the checkout running the tests may have one to fall back on).
    bare = cluster.root / "bare_repo"
    (bare / "launch" / "slurm").mkdir(parents=True)
    for part in ("launch/train.py", "launch/slurm/node.sh"):
        (bare / part).write_text((REPO / part).read_text())
    env = cluster.env(1, 0, PATH=f"{cluster.bin}{os.pathsep}/usr/bin{os.pathsep}/bin", REPO_DIR=str(bare))
    env["SLURM_SUBMIT_DIR"] = str(cluster.root)  # no .venv there to fall back on
    done = cluster.run(env, str(cluster.run_config))
    assert done.returncode == 2
    assert "'deepspeed' is not on PATH; set VENV=" in done.stderr and "module load" in done.stderr
    broken = cluster.run(cluster.env(1, 0, FAKE_HELP_STATUS="1", LAUNCHER="torchrun"), str(cluster.run_config))
    assert broken.returncode == 2 and "'torchrun --help' fails" in broken.stderr
    assert cluster.jsonl("srun.jsonl") == []


def test_venv_is_activated(cluster: FakeCluster) -> None:
    venv = cluster.root / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\nexport FAKE_VENV_ACTIVE=1\n')
    done = cluster.run(cluster.env(1, 0, VENV=str(venv)), str(cluster.run_config))
    assert done.returncode == 0, done.stdout + done.stderr
    (record,) = cluster.launches()
    assert record["env"]["PATH"].startswith(f"{venv}/bin")


@pytest.mark.parametrize("spec, expected", [(None, None), ("4", "4"), ("a100:2", "2")])
def test_gpu_count_without_gres(cluster: FakeCluster, spec: str | None, expected: str | None) -> None:
    env = cluster.env(1, 0)
    for key in ("SLURM_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_CPUS_PER_TASK"):
        env.pop(key)
    env["SLURM_CPUS_ON_NODE"] = "12"
    env["PATH"] = f"{cluster.bin}{os.pathsep}/usr/bin{os.pathsep}/bin"  # no nvidia-smi
    if spec is not None:
        env["GPUS_PER_NODE" if ":" not in spec else "SLURM_GPUS_PER_NODE"] = spec
    done = cluster.run(env, str(cluster.run_config))
    if expected is None:
        assert done.returncode == 2
        assert "no GPU count per node" in done.stderr and "--gpus-per-node" in done.stderr
        return
    assert done.returncode == 0, done.stdout + done.stderr
    (record,) = cluster.launches()
    assert flag(record["argv"], "--num_gpus") == expected
    (srun,) = cluster.jsonl("srun.jsonl")
    assert srun["options"]["--cpus-per-task"] == "12", "the step gets every CPU the job has on the node"
