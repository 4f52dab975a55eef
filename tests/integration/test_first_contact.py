"""What a new user meets first: the installed package and its console entry, a run with no launcher,
a busy port, launcher options among the run's flags, and a peak memory that is each method's own."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

from tests.support import REPO
from tests.support.launch import clean_env, deepspeed

ERROR_PREFIX = "gorp_ds: error:"


def _plain_env(**extra: str) -> dict[str, str]:
    """A plain process's environment: none of a launcher's variables, and the checkout off PYTHONPATH."""
    return clean_env(drop=("PYTHONPATH",), OMP_NUM_THREADS="1", **extra)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if ERROR_PREFIX in line]


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout_runs_help_and_print_config(tmp_path: Path) -> None:
    """A wheel built from the repository, installed into a fresh venv, with the checkout off the path:
    the console entry's help and the default run's resolved configuration (its presets are package data)."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, timeout=300, env=_plain_env())
    (wheel,) = wheels.glob("gorp_ds-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("gorp_ds/resources/recipes/embedded_quick.yaml", "gorp_ds/resources/recipes/embedded.yaml",
                    "gorp_ds/resources/ds_configs/zero2.json", "gorp_ds/resources/ds_configs/zero3.json"):
        assert shipped in names, sorted(names)
    assert any(n.endswith("entry_points.txt") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # The dependencies (torch, deepspeed, transformers, ...) come from this test's environment as a
    # plain path entry: the .pth files in it (the checkout's editable install among them) are not run.
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300, env=_plain_env())

    where = tmp_path / "elsewhere"
    where.mkdir()
    # Every module that the run's command line imports comes from the fresh venv or the dependencies,
    # none from the checkout's sources (its .venv may hold the dependencies: CI keeps it in the checkout).
    probe = subprocess.run(
        [str(python), "-c", "import sys, gorp_ds.cli, gorp_ds.cl.config, gorp_ds.resources; "
         "print(gorp_ds.__file__); print('\\n'.join(m.__file__ for m in list(sys.modules.values()) "
         "if getattr(m, '__file__', None)))"],
        cwd=where, env=_plain_env(), capture_output=True, text=True, check=True)
    module, *files = probe.stdout.splitlines()
    assert Path(module).is_relative_to(venv), module
    dependencies = Path(sysconfig.get_paths()["purelib"]).resolve()
    from_checkout = [f for f in files if Path(f).is_absolute() and Path(f).resolve().is_relative_to(REPO)
                     and not Path(f).resolve().is_relative_to(dependencies)]
    assert not from_checkout, from_checkout

    entry = venv / "bin" / "gorp-ds"
    top = subprocess.run([str(entry), "--help"], cwd=where, env=_plain_env(), capture_output=True, text=True)
    assert top.returncode == 0 and all(c in top.stdout for c in ("train", "eval", "export", "memory")), top
    helped = subprocess.run([str(entry), "train", "--help"], cwd=where, env=_plain_env(), capture_output=True, text=True)
    assert helped.returncode == 0 and "--update-gap" in helped.stdout and "--print-config" in helped.stdout, helped
    printed = subprocess.run([str(entry), "train", "--print-config"], cwd=where, env=_plain_env(), capture_output=True,
                             text=True, timeout=300)
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert "preset embedded_quick" in printed.stdout and "update_gap: 20" in printed.stdout, printed.stdout
    memory = subprocess.run([str(entry), "memory", "--model", "7b", "--world", "8", "--stage", "2", "--markdown"],
                            cwd=where, env=_plain_env(), capture_output=True, text=True, timeout=300)
    assert memory.returncode == 0 and "| LLaMA-2-7B | 8 | 2 |" in memory.stdout, memory
    # its bucket settings come from the packaged ZeRO-2 configuration
    settings_line = next(line for line in memory.stdout.splitlines() if line.startswith("ZeRO-2 buffer settings"))
    assert str(venv) in settings_line and settings_line.endswith("gorp_ds/resources/ds_configs/zero2.json")


@pytest.mark.slow
def test_plain_python_process_with_no_launcher_completes(tmp_path: Path, tiny_model_dir: Path) -> None:
    """``python launch/train.py`` with no launcher and no distributed variables: a one-rank run."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--model", str(tiny_model_dir),
                           "--tasks", "emb_color", "--max-steps-per-task", "2", "--eval-samples", "4",
                           "--global-batch-size", "4", "--micro-batch-size", "2", "--export", "false",
                           "--output-dir", str(out)],
                          cwd=tmp_path, env=_plain_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "gorp" / "results.json").read_text())
    assert result["world_size"] == 1 and result["tasks"] == ["emb_color"]
    assert len(result["R"]) == 2 and all(row is not None for row in result["R"])


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["plain", "deepspeed"])
def test_a_busy_port_is_one_line_and_status_2(tmp_path: Path, launcher: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run_flags = ["--tasks", "emb_color", "--max-steps-per-task", "2", "--output-dir", str(tmp_path / "out")]
        if launcher == "plain":  # what a launcher would set, with the port another job holds
            env = _plain_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            command = [sys.executable, str(REPO / "launch" / "train.py"), *run_flags]
        else:
            env = _plain_env()
            command = [deepspeed(), "--num_gpus", "2", "--master_port", str(port),
                       str(REPO / "launch" / "train.py"), *run_flags]
        proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    lines = _error_lines(output)
    assert len(lines) == 1, output[-3000:]
    assert f"port {port}" in lines[0] and "--master_port" in lines[0] and "LAUNCH_ARGS" in lines[0]
    assert "Traceback" not in output
    assert not (tmp_path / "out").exists()


def test_a_launcher_option_among_the_run_flags_names_where_it_belongs(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", "import sys; from gorp_ds.cli import train; "
                           "sys.exit(train(['--master_port', '29617', '--tasks', 'emb_color']))"],
                          cwd=REPO, env=_plain_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert "--master_port is an option of the launcher" in line and "LAUNCH_ARGS='--master_port" in line


def test_the_launcher_rank_argument_before_the_subcommand_is_ignored() -> None:
    from gorp_ds.cli import _without_launcher_rank

    assert _without_launcher_rank(["--local_rank=1", "train", "--rank", "4"]) == ["train", "--rank", "4"]
    assert _without_launcher_rank(["--local-rank", "0", "eval", "--tasks", "x"]) == ["eval", "--tasks", "x"]


# ------------------------------------------------------------------------------- peak memory
def _touch(n_bytes: int) -> torch.Tensor:
    buffer = torch.empty(n_bytes, dtype=torch.uint8)
    buffer.fill_(1)  # resident, not only reserved
    return buffer


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU measure; on a GPU the allocator's peak is reset")
def test_a_later_method_does_not_inherit_an_earlier_methods_peak() -> None:
    from gorp_ds.cl.peak_memory import GIB, PeakMemory

    first = PeakMemory()
    first.start()
    big = _touch(768 * 2**20)
    first_peak = first.gib()
    del big

    second = PeakMemory()
    second.start()
    small = _touch(64 * 2**20)
    second_peak = second.gib()
    now = _rss_kib() * 1024 / GIB
    del small
    if first_peak is None:
        pytest.skip("this kernel does not let a process reset its peak resident set")
    assert first_peak >= 0.75  # the 768 MiB buffer was resident during the first method
    assert second_peak is not None
    # The second method's peak covers what it holds now and is far below the first's.
    assert now - 0.01 <= second_peak < first_peak - 0.5, (first_peak, second_peak, now)


def test_peak_memory_that_cannot_be_reset_is_reported_as_not_measured(monkeypatch, tmp_path: Path) -> None:
    from gorp_ds.cl import peak_memory
    from gorp_ds.cl.report import summary_table

    if torch.cuda.is_available():
        pytest.skip("the CPU measure")
    monkeypatch.setattr(peak_memory, "CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    meter = peak_memory.PeakMemory()
    meter.start()
    assert meter.gib() is None
    row = {"method": "gorp", "metrics": {"AA": 50.0, "BWT": None, "FWT": None, "forgetting": None},
           "timings": {"train_s": 3.0}, "peak_memory_gib": meter.gib()}
    assert "| gorp | 50.0 | – | – | – | 3 | not measured |" in summary_table([row])
