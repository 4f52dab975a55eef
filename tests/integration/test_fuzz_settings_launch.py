"""The start-up validation of tests/unit/test_fuzz_settings.py through the real 2-rank launcher:
bad input stops both ranks with one ``gorp_ds: error:`` line (printed by local rank 0) and status
2, never a traceback (the other rank's silence is the first test's: only a real launch stops it). Two launches: ``deepspeed launch/train.py`` itself for one case (the status
reaches the shell), and one launch of a driver whose two ranks call ``launch/train.py``'s
``main(argv)`` for four more, the last of them found after the process group started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gorp_ds.resources import DS_CONFIGS
from tests.support import REPO
from tests.support.launch import TRAIN, clean_env, launch_train

pytestmark = pytest.mark.slow
ERROR = "gorp_ds: error:"

# Runs on each rank: argv[1] = cases JSON, argv[2] = outcome folder (launch/train.py is TRAIN).
DRIVER = r"""
import contextlib, importlib.util, io, json, os, sys, traceback

spec = importlib.util.spec_from_file_location("train_main", os.environ["GORP_DS_TRAIN"])
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
import gorp_ds.cli
# Between cases no launcher stops rank 1 (a real launch stops it once rank 0 exits, and the other
# ranks wait up to QUIET_WAIT_S for that): here it goes on at once and prints its own line.
gorp_ds.cli.QUIET_WAIT_S = 0.0
args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
outcomes = {}
for case in json.load(open(args[0])):
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            outcomes[case["name"]] = {"rc": train.main(case["argv"]), "stderr": buffer.getvalue()}
    except BaseException:
        outcomes[case["name"]] = {"rc": None, "stderr": buffer.getvalue() + traceback.format_exc()}
with open(os.path.join(args[1], f"rank{os.environ['RANK']}.json"), "w") as handle:
    json.dump(outcomes, handle)
sys.stdout.flush()
os._exit(0)
"""


def _ds(path: Path, **changes: object) -> str:
    config = json.loads((DS_CONFIGS / "zero2.json").read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return str(path)


def _one_error_line(text: str) -> str:
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if ERROR in line]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


def test_the_launcher_stops_both_ranks_with_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}, "bf16": {"enabled": True}}))
    proc = launch_train(["--ds_config", str(ds), "--model", str(tiny_model_dir), "--tasks", "emb_color",
                         "--output-dir", str(tmp_path / "out")], env=clean_env(OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    line = _one_error_line(proc.stdout + proc.stderr)
    assert f"{ds}: 'zero_optimization.offload_optimizer' offloads to 'cpu'" in line, line
    assert not (tmp_path / "out").exists()  # refused before the output directory was touched


def test_four_cases_on_two_ranks_in_one_launch(tmp_path: Path, tiny_model_dir: Path) -> None:
    (tmp_path / "afile").write_text("not a folder")
    preset = tmp_path / "run.yaml"
    preset.write_text("preset: 5\n")
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'{"zero_optimization": {"stage": 2}, "bf16": {"enabled": true}, "note": "caf\xe9"}')
    common = ["--model", str(tiny_model_dir), "--tasks", "emb_color", "--max-train-per-task", "8",
              "--global-batch-size", "2", "--micro-batch-size", "1", "--max-steps-per-task", "1"]
    cases = {  # name -> (argv, what the line says); the last one is found after the group started
        "steps_per_print_zero": (["--ds_config", _ds(tmp_path / "spp.json", steps_per_print=0)],
                                 "'steps_per_print' is 0; use an integer >= 1"),
        "preset_number": (["--config", str(preset)], f"--config {preset}: preset must be a preset name"),
        "ds_not_utf8": (["--ds_config", str(latin1)], f"DeepSpeed config {latin1}: not UTF-8 text (byte 0xe9"),
        "tensorboard_under_a_file": (
            ["--ds_config", _ds(tmp_path / "tb.json", tensorboard={"enabled": True,
                                                                   "output_path": str(tmp_path / "afile" / "tb")})],
            f"'tensorboard.output_path' {tmp_path / 'afile' / 'tb'}: {tmp_path / 'afile'} is a file"),
    }
    listed = [{"name": name, "argv": [*common, *argv, "--output-dir", str(tmp_path / name)]}
              for name, (argv, _) in cases.items()]
    (tmp_path / "cases.json").write_text(json.dumps(listed))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = clean_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), GORP_DS_TRAIN=str(TRAIN))
    proc = launch_train([str(tmp_path / "cases.json"), str(tmp_path)], env=env, timeout=300,
                        script=tmp_path / "driver.py")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for name, (_, needle) in cases.items():
        assert [r[name]["rc"] for r in ranks] == [2, 2], (name, ranks[0][name], ranks[1][name])
        assert needle in _one_error_line(ranks[0][name]["stderr"]), (needle, ranks[0][name]["stderr"])
        # rank 1 was not stopped by a launcher, so it printed its line itself: the same one line
        assert "Traceback" not in ranks[1][name]["stderr"], ranks[1][name]
        assert needle in _one_error_line(ranks[1][name]["stderr"]), (needle, ranks[1][name]["stderr"])
        assert not (tmp_path / name).exists()
