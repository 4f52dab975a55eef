"""Bad input stops the trainer before any training with one clear line and exit status 2.

All cases but two run in ONE Python subprocess (a one-rank process group, no launcher) that calls
``launch/train.py``'s ``main(argv)`` for each case with stderr captured; two real runs then check
that the status reaches the shell, for a plain process and for a 2-rank ``deepspeed`` launch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ERROR_PREFIX = "gorp_ds: error:"

pytestmark = pytest.mark.slow

# Runs in the subprocess: argv[1] = cases JSON, argv[2] = where to write the outcomes, argv[3] = launch/train.py.
DRIVER = r'''
import argparse, contextlib, importlib.util, io, json, sys, traceback

spec = importlib.util.spec_from_file_location("train_main", sys.argv[3])
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
cases = json.load(open(sys.argv[1]))
outcomes = {}
for case in cases:
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            if case.get("control"):
                # The unmodified arguments pass every check: each case fails for its own reason.
                from gorp_ds.cl import add_arguments, build_run_config
                from gorp_ds.cl.runner import prepare

                parser = argparse.ArgumentParser()
                add_arguments(parser)
                parsed = parser.parse_args(case["argv"])
                tasks, ds = prepare(build_run_config(parsed), parsed.ds_config)
                code, extra = 0, {"tasks": [t.name for t in tasks], "train_batch_size": ds["train_batch_size"]}
            else:
                code, extra = train.main(case["argv"]), {}
        outcomes[case["name"]] = {"rc": code, "stderr": buffer.getvalue(), "raised": None, **extra}
    except SystemExit as exit_:
        outcomes[case["name"]] = {"rc": exit_.code, "stderr": buffer.getvalue(), "raised": "SystemExit"}
    except BaseException:
        outcomes[case["name"]] = {"rc": None, "stderr": buffer.getvalue(), "raised": traceback.format_exc()}
json.dump(outcomes, open(sys.argv[2], "w"))
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _deepspeed() -> str:
    beside = Path(sys.executable).parent / "deepspeed"
    return str(beside) if beside.is_file() else "deepspeed"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GORP_DS_FAULT_AT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def _one_rank_env() -> dict[str, str]:
    return _env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()))


def _write_task(root: Path, kind: str, name: str, words: list[str], n: int = 8, **files: str) -> None:
    """A CL_Benchmark task folder; ``files`` replace a file's text, e.g. ``train='{not json'``."""
    folder = root / kind / name
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text(json.dumps(words))
    for split in ("train", "test"):
        rows = [{"sentence": f"{name} {split} {i}", "label": words[i % len(words)]} for i in range(n)]
        (folder / f"{split}.json").write_text(json.dumps(rows))
    for file_name, text in files.items():
        (folder / f"{file_name}.json").write_text(text)


def _bench(root: Path) -> Path:
    _write_task(root, "TC", "topics", ["World", "Sports"])
    _write_task(root, "SC", "moods", ["Good", "Bad"])
    _write_task(root, "XX", "notjson", ["yes", "no"], train='[{"sentence": "a", "label": "yes"},')
    _write_task(root, "XX", "notlist", ["yes", "no"], test='{"sentence": "a", "label": "yes"}')
    _write_task(root, "XX", "nolabel", ["yes", "no"],
                train=json.dumps([{"sentence": "a", "label": "yes"}, {"sentence": "b"}]))
    _write_task(root, "XX", "badlabel", ["yes", "no"],
                test=json.dumps([{"sentence": "a", "label": "yes"}, {"sentence": "b", "label": "maybe"}]))
    _write_task(root, "XX", "emptytask", ["yes", "no"], train="[]")
    _write_task(root, "XX", "badlabels", ["yes", "no"], labels="not json at all")
    return root


def _ds(path: Path, **overrides) -> str:
    config = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "gradient_clipping": 1.0,
              "steps_per_print": 10**6}
    for key, value in overrides.items():
        config[key] = value
    path.write_text(json.dumps(config))
    return str(path)


def _cases(tmp: Path, model: str) -> tuple[list[dict], dict[str, tuple[str, ...]]]:
    """(cases, {case name: substrings its error line must contain})."""
    bench = _bench(tmp / "bench")
    good_ds = _ds(tmp / "ds_good.json")
    base = {"--ds_config": good_ds, "--model": model, "--data-dir": str(bench), "--tasks": "TC/topics,SC/moods",
            "--method": "gorp", "--max-steps-per-task": "2", "--global-batch-size": "8", "--micro-batch-size": "2",
            "--eval-samples": "4"}
    (tmp / "cfg_bad.yaml").write_text("method: [gorp\nrank: 4\n")
    (tmp / "cfg_unknown.json").write_text(json.dumps({"method": "gorp", "learning_rate": 1e-3}))
    specs: dict[str, tuple[dict, tuple[str, ...]]] = {
        "missing_data_dir": ({"--data-dir": str(tmp / "no_such_dir")}, (str(tmp / "no_such_dir"), "does not exist")),
        "data_not_json": ({"--tasks": "TC/topics,XX/notjson"}, (str(bench / "XX/notjson/train.json"), "not valid JSON")),
        "data_not_list": ({"--tasks": "XX/notlist"}, (str(bench / "XX/notlist/test.json"), "list")),
        "entry_without_label": ({"--tasks": "TC/topics,XX/nolabel"},
                                (str(bench / "XX/nolabel/train.json"), "entry 1", '"label"')),
        "label_not_in_labels": ({"--tasks": "XX/badlabel"}, (str(bench / "XX/badlabel/test.json"), "'maybe'", "labels.json")),
        "labels_not_json": ({"--tasks": "XX/badlabels"}, (str(bench / "XX/badlabels/labels.json"),)),
        "empty_task": ({"--tasks": "TC/topics,XX/emptytask"}, (str(bench / "XX/emptytask/train.json"), "no train examples")),
        "unknown_task": ({"--tasks": "TC/topics,nosuchtask"}, ("nosuchtask", "unknown task")),
        "unknown_method": ({"--method": "gorp,sgd"}, ("--method", "'sgd'")),
        "unknown_order": ({"--tasks": None, "--order": "Z"}, ("unknown order", "'Z'")),
        "tasks_and_order": ({"--order": "A"}, ("--tasks", "--order")),
        "lora_targets_match_nothing": ({"--lora-targets": "nonexistent_proj"}, ("--lora-targets", "nonexistent_proj")),
        # seq-lora is fine; the second method's full-rank targets match nothing: still before training.
        "full_targets_match_nothing": ({"--method": "seq-lora,galore", "--full-targets": "nonexistent_proj"},
                                       ("full-rank targets", "nonexistent_proj")),
        # gate_proj is 72 × 32 in the tiny model: k = 33 cannot fit.
        "rank_too_large": ({"--rank": "33"}, ("--rank 33", "gate_proj", "32")),
        "ds_batch_contradiction": ({"--ds_config": _ds(tmp / "ds_batch.json", train_batch_size=999)},
                                   (str(tmp / "ds_batch.json"), "train_batch_size", "999", "8")),
        "ds_bf16_vs_fp32": ({"--dtype": "fp32"}, (good_ds, "bf16", "fp32")),
        "ds_zero3": ({"--ds_config": _ds(tmp / "ds_zero3.json", zero_optimization={"stage": 3})},
                     (str(tmp / "ds_zero3.json"), "zero_optimization.stage", "3")),
        "ds_config_missing": ({"--ds_config": str(tmp / "ds_missing.json")}, (str(tmp / "ds_missing.json"), "not found")),
        "ds_config_not_json": ({"--ds_config": str(_write(tmp / "ds_broken.json", '{"zero_optimization": '))},
                               (str(tmp / "ds_broken.json"), "JSON")),
        "config_malformed": ({"--config": str(tmp / "cfg_bad.yaml")}, (str(tmp / "cfg_bad.yaml"), "cannot parse")),
        "config_unknown_key": ({"--config": str(tmp / "cfg_unknown.json")}, (str(tmp / "cfg_unknown.json"), "learning_rate")),
        "model_missing": ({"--model": str(tmp / "no_model")}, ("--model", str(tmp / "no_model"))),
        "lora_r_too_large": ({"--lora-r": "40"}, ("--lora-r 40", "32")),
        "batch_not_divisible": ({"--global-batch-size": "7"}, ("--global-batch-size 7", "--micro-batch-size 2")),
    }
    cases = [{"name": "control", "control": True, "argv": _argv({**base, "--output-dir": str(tmp / "out" / "control")})}]
    expected = {}
    for name, (change, needles) in specs.items():
        args = {**base, **change, "--output-dir": str(tmp / "out" / name)}
        cases.append({"name": name, "argv": _argv(args)})
        expected[name] = needles
    return cases, expected


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _argv(args: dict[str, str | None]) -> list[str]:
    argv = []
    for flag, value in args.items():
        if value is not None:
            argv += [flag, value]
    return argv


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(ERROR_PREFIX)]


def _assert_nothing_written(out_dir: Path) -> None:
    written = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*")) if out_dir.exists() else []
    assert written == [], f"files written before the error: {written}"


def test_bad_input_cases_in_one_process(tmp_path: Path, tiny_model_dir: Path) -> None:
    cases, expected = _cases(tmp_path, str(tiny_model_dir))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "driver.py").write_text(DRIVER)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "cases.json"), str(tmp_path / "outcomes.json"),
         str(REPO / "launch" / "train.py")],
        env=_one_rank_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = json.loads((tmp_path / "outcomes.json").read_text())

    control = outcomes["control"]
    assert control["raised"] is None, control["raised"]
    assert control["tasks"] == ["topics", "moods"] and control["train_batch_size"] == 8

    failures = []
    for name, needles in expected.items():
        got = outcomes[name]
        problems = []
        if got["raised"] is not None:
            problems.append(f"main() raised instead of returning 2:\n{got['raised']}")
        if got["rc"] != 2:
            problems.append(f"return code {got['rc']!r}, expected 2")
        lines = _error_lines(got["stderr"])
        if len(lines) != 1:
            problems.append(f"{len(lines)} '{ERROR_PREFIX}' lines in stderr: {got['stderr'][-1500:]!r}")
        else:
            missing = [n for n in needles if n not in lines[0]]
            if missing:
                problems.append(f"error line {lines[0]!r} does not mention {missing}")
        if "Traceback" in got["stderr"]:
            problems.append(f"traceback in stderr: {got['stderr'][-1500:]}")
        out_dir = tmp_path / "out" / name
        if out_dir.exists() and any(out_dir.rglob("*")):
            problems.append(f"wrote {sorted(str(p) for p in out_dir.rglob('*'))}")
        if problems:
            failures.append(f"[{name}] " + "; ".join(problems))
    assert not failures, "\n".join(failures)


def test_exit_status_reaches_the_shell(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A real `python launch/train.py` process: status 2, one error line, no traceback."""
    cases, _ = _cases(tmp_path, str(tiny_model_dir))
    argv = next(c["argv"] for c in cases if c["name"] == "label_not_in_labels")
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *argv], env=_one_rank_env(),
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "badlabel/test.json" in lines[0] and "'maybe'" in lines[0]
    assert "Traceback" not in proc.stderr
    _assert_nothing_written(tmp_path / "out" / "label_not_in_labels")


def test_exit_status_through_two_rank_launcher(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Both ranks of a `deepspeed` launch stop with status 2; only rank 0 prints the line."""
    cases, _ = _cases(tmp_path, str(tiny_model_dir))
    argv = next(c["argv"] for c in cases if c["name"] == "rank_too_large")
    proc = subprocess.run(
        [_deepspeed(), "--num_gpus", "2", "--master_port", str(_free_port()), str(REPO / "launch" / "train.py"), *argv],
        env=_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    lines = [line for line in output.splitlines() if ERROR_PREFIX in line]
    assert len(lines) == 1, output[-3000:]
    assert "--rank 33" in lines[0]
    assert "Traceback" not in output
    _assert_nothing_written(tmp_path / "out" / "rank_too_large")
