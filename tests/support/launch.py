"""Starting runs from a test: a free port, the ``deepspeed`` launcher, a clean environment, the 2-rank
``deepspeed launch/train.py`` launch, the six-method run made once per session, and readers of a run's
outputs (results.json, TensorBoard scalars, the last checkpoint's state)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from tests.support import REPO

TRAIN = REPO / "launch" / "train.py"
# What a launcher sets; a child run gets none of them from the test process.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                      "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed() -> str:
    """The launcher next to the interpreter running the tests (its bin directory may not be on PATH)."""
    beside = Path(sys.executable).parent / "deepspeed"
    return str(beside) if beside.is_file() else shutil.which("deepspeed") or "deepspeed"


def clean_env(*, drop: Iterable[str] = (), **extra: str) -> dict[str, str]:
    """This process's environment for a child run: without the launcher's variables, the crash
    fault ``GORP_DS_FAULT_AT`` (a launch names its own) and ``drop``; on the CPU
    (``DS_ACCELERATOR=cpu``), tokenizers single-threaded; then ``extra``. Other fault variables
    (gorp_ds/faults.py) pass through: a test may set them in its own environment for a launch."""
    removed = {*LAUNCHER_VARIABLES, "GORP_DS_FAULT_AT", *drop}
    env = {k: v for k, v in os.environ.items() if k not in removed}
    env.update(DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def one_rank_env(**extra: str) -> dict[str, str]:
    """:func:`clean_env` with what a launcher would set for one rank (on a free port)."""
    return clean_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port()), **extra)


def launch_train(args: Iterable[str], *, env: dict[str, str], timeout: int, num_gpus: int = 2,
                 cwd: Path = REPO, script: Path = TRAIN) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus <num_gpus> --master_port <free> launch/train.py <args>`` (or another
    ``script``), output captured."""
    port = free_port()
    command = [deepspeed(), "--num_gpus", str(num_gpus), "--master_port", str(port), str(script), *args]
    try:
        return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    finally:
        # DeepSpeed's CPU all-reduce makes a 66 MB shared-memory buffer per rank in /dev/shm; the
        # ranks unlink theirs once every rank has started (gorp_ds/cl/process_group.py), but a
        # launch killed during start-up may leave them: remove this launch's.
        for leftover in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
            with contextlib.suppress(OSError):
                os.remove(leftover)


# ------------------------------------------------------------- the six-method launch (tests/integration)
METHODS = ["gorp", "galore", "seq-lora", "o-lora", "mtl", "seq-ft"]
# The embedded classification tasks, in order (named, since the embedded default also holds emb_reverse;
# a launch that passes its own --tasks or --order replaces them).
TASKS = ["emb_color", "emb_animal", "emb_fruit", "emb_object"]
STEPS, EVAL_SAMPLES = 4, 8
RUN_ARGS = [
    "--method", ",".join(METHODS), "--tasks", ",".join(TASKS), "--max-steps-per-task", str(STEPS), "--save-every", "2",
    "--eval-samples", str(EVAL_SAMPLES), "--max-train-per-task", "64", "--global-batch-size", "8",
    "--micro-batch-size", "2", "--lr-lora", "1e-2", "--lr-full", "1e-2", "--lr-plain", "1e-3", "--update-gap", "2",
]


def launch(model_dir: Path, out_dir: Path, *extra: str, fault: str | None = None,
           timeout: int = 300, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus 2 launch/train.py`` on CPU ranks with RUN_ARGS; output in ``out_dir``."""
    env = clean_env(**(env_extra or {}))
    if fault is not None:
        env["GORP_DS_FAULT_AT"] = fault
    base = list(RUN_ARGS)
    if "--tasks" in extra or "--order" in extra:  # the launch names its own sequence
        at = base.index("--tasks")
        del base[at : at + 2]
    return launch_train(["--ds_config", str(REPO / "ds_configs" / "zero2.json"), "--model", str(model_dir), *base,
                         "--output-dir", str(out_dir), *extra], env=env, timeout=timeout)


_RUNS: dict[str, Path] = {}
_OUTPUTS: dict[str, str] = {}
# Python shows DeprecationWarnings only from __main__ by default: shown from every module, the
# project's own deprecated calls would be reported at their line (see noise_in).
SHOW_DEPRECATIONS = {"PYTHONWARNINGS": "default::DeprecationWarning"}


def six_method_run(tmp_path_factory, model_dir: Path) -> Path:
    """Output directory of one uninterrupted launch of all six methods (made once per session)."""
    key = str(model_dir)
    if key not in _RUNS:
        out = tmp_path_factory.mktemp("six_methods")
        proc = launch(model_dir, out, env_extra=SHOW_DEPRECATIONS)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        _RUNS[key] = out
        _OUTPUTS[key] = proc.stdout + proc.stderr
    return _RUNS[key]


def six_method_output(model_dir: Path) -> str:
    """What the six-method launch of ``model_dir`` printed (after :func:`six_method_run`)."""
    return _OUTPUTS[str(model_dir)]


# A Python warning as the warnings module prints it ("<file>:<line>: <Category>: <message>", the file
# absolute: the launch names train.py by its absolute path); it may follow a progress bar's "...]".
_WARNING = re.compile(r"(?P<path>/(?:[^\s/\]]+/)*[^\s/\]]+\.py):\d+: (?P<category>\w*Warning): (?P<message>.*)")


def noise_in(output: str) -> list[str]:
    """The lines of a launch's output that a run should not print: every Python warning (a plain
    run would show it; each is either fixed at its cause or filtered at start-up by
    gorp_ds.log.quiet_third_party) except a DeprecationWarning raised inside a library (shown only
    because of SHOW_DEPRECATIONS; theirs to fix), DeepSpeed's "untested optimizer" line (GORP is the
    project's own optimizer) and any other mention of something deprecated (transformers logs its
    deprecations instead of warning)."""
    found = []
    for line in re.split(r"[\r\n]+", output):
        warning = _WARNING.search(line)
        if warning is not None:
            path = Path(warning["path"]).resolve()  # the project's code; a virtualenv may sit in REPO too
            ours = any(path.is_relative_to(REPO / folder) for folder in ("gorp_ds", "launch"))
            if ours or warning["category"] != "DeprecationWarning":
                found.append(line)
        elif "untested optimizer" in line or "deprecated" in line.lower():
            found.append(line)
    return found


# ------------------------------------------------------------------------ a run's outputs
def read_results(run_dir: Path, method: str) -> dict:
    return json.loads((run_dir / method / "results.json").read_text())


def read_scalars(run_dir: Path, method: str) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of ``method``'s run: ``{tag: [(step, value), …]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = run_dir / "tensorboard" / method
    assert glob.glob(str(folder / "events.out.tfevents.*")), f"no TensorBoard events for {method}"
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def read_final_state(run: Path, method: str) -> tuple[str, dict, list, list[dict]]:
    """The last checkpoint of a 2-rank run: its tag, fp32 masters, LoRA merges and each rank's GORP state."""
    from gorp_ds.zero import read_client_state, read_masters

    folder = run / method / "checkpoints"
    tag = (folder / "latest").read_text().strip()
    masters = read_masters(str(folder), tag)
    merges = read_client_state(str(folder), tag)["lora_merges"]
    ranks = [torch.load(folder / tag / "gorp_state" / f"rank_{r:05d}.pt", map_location="cpu", weights_only=True)
             for r in range(2)]
    return tag, masters, merges, ranks
