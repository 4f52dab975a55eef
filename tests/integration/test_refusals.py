"""Inputs a user found that hung or were accepted silently: each is refused before any training with
one ``gorp_ds: error:`` line naming the flag or key and the fix (exit status 2), and a legal
neighbouring value passes.

The settings' own checks run in-process, the way the launcher builds the configuration (argparse +
``add_arguments`` + ``build_run_config``), over values Hypothesis generates. The checks that need the
data or the DeepSpeed JSON run in ONE subprocess (a one-rank gloo group) that calls
``launch/train.py``'s ``main(argv)`` for each bad case and ``prepare()`` for each legal neighbour.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gorp_ds.cl.command_line import add_arguments, build_run_config
from gorp_ds.cl.config import SETTINGS, ConfigError, RunConfig
from gorp_ds.data.config import MAX_DRAWN_PER_TASK, MAX_SEED
from gorp_ds.optim.config import MAX_POWER_ITERS
from tests.support import REPO
from tests.support.launch import TRAIN, one_rank_env

ERROR_PREFIX = "gorp_ds: error:"


def _build(argv: list[str]) -> RunConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return build_run_config(parser.parse_args(["--preset", "none", *argv]))


def _refused(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        _build(argv)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def _number_text(value: int | float) -> str:
    return repr(value) if isinstance(value, float) else str(value)


# ------------------------------------------------------------------ 1. budgets that cannot finish
# flat name -> (largest legal value, values Hypothesis draws above it)
BOUNDED = {
    "max_steps_per_task": MAX_DRAWN_PER_TASK,
    "epochs": MAX_DRAWN_PER_TASK,
    "global_batch_size": MAX_DRAWN_PER_TASK,
    "power_iters": MAX_POWER_ITERS,
    "seed": MAX_SEED,
}


def _too_large(flat: str) -> st.SearchStrategy[int | float]:
    top = BOUNDED[flat]
    huge = st.integers(top + 1, 2**80)
    if SETTINGS[flat].kind is float:
        return st.one_of(huge, st.floats(top, 1e300, exclude_min=True))
    return st.one_of(huge, st.integers(top + 1, 10**15).map(float))  # 1e12 written as a float: "1e12" / 1.0e+12


@pytest.mark.parametrize("flat", sorted(BOUNDED))
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_a_budget_beyond_its_bound_is_refused_naming_the_flag(flat: str, data) -> None:
    value = data.draw(_too_large(flat))
    spec = SETTINGS[flat]
    message = _refused([spec.flag, _number_text(value)])
    assert message.startswith(f"{spec.flag} must be <= {BOUNDED[flat]}"), message


@pytest.mark.parametrize("flat", sorted(BOUNDED))
def test_the_bound_itself_is_legal(flat: str) -> None:
    extra = ["--global-batch-size", "1"] if flat == "max_steps_per_task" else []
    cfg = _build([SETTINGS[flat].flag, str(BOUNDED[flat]), *extra])
    assert cfg.value(flat) == BOUNDED[flat]


def test_the_examples_of_the_user_are_refused() -> None:
    assert _refused(["--epochs", "1e12"]).startswith("--epochs must be <= 16777216")
    assert _refused(["--max-steps-per-task", "1e12"]).startswith("--max-steps-per-task must be <= 16777216")
    assert _refused(["--global-batch-size", "1e9"]).startswith("--global-batch-size must be <= 16777216")
    assert _refused(["--power-iters", "1e9"]) == "--power-iters must be <= 100, got 1000000000"
    assert _refused(["--seed", str(2**70)]) == f"--seed must be <= {MAX_SEED}, got {2**70}"
    assert _refused(["--seed", "-1"]) == "--seed must be >= 0, got -1"


@settings(max_examples=25, deadline=None)
@given(steps=st.integers(1, MAX_DRAWN_PER_TASK), batch=st.integers(1, MAX_DRAWN_PER_TASK))
def test_steps_times_batch_beyond_the_batch_order_is_refused_naming_both(steps: int, batch: int) -> None:
    argv = ["--max-steps-per-task", str(steps), "--global-batch-size", str(batch), "--micro-batch-size", "0"]
    if steps * batch <= MAX_DRAWN_PER_TASK:
        assert _build(argv).runner.max_steps_per_task == steps
        return
    message = _refused(argv)
    assert message.startswith(f"--max-steps-per-task {steps} × --global-batch-size {batch}"), message
    assert "train fewer steps or use a smaller batch" in message


@settings(max_examples=20, deadline=None)
@given(value=st.one_of(st.just(math.nan), st.just(math.inf), st.just(-math.inf),
                       st.floats(max_value=0.0, allow_nan=False, allow_infinity=False)))
def test_epochs_not_finite_or_not_positive_is_refused(value: float) -> None:
    message = _refused([f"--epochs={value!r}"])  # "=": argparse reads "-1e-300" alone as an option
    assert message.startswith("--epochs must be"), message


# ------------------------------------------------------------------ 2. flags, run files, presets agree
def _outcome(argv: list[str]) -> tuple[str, object]:
    try:
        return "ok", _build(argv).runner.max_steps_per_task
    except ConfigError as err:
        # The rule broken, without how the value was spelled ("got '2.5'" as text, "got 2.5" from a file).
        return "refused", str(err).split(" must ", 1)[-1].split(", got", 1)[0]


def _as_yaml(value: int | float) -> str:
    return repr(value) if not isinstance(value, float) else f"{value:.1f}e+0"  # YAML 1.1 needs the dot


@settings(max_examples=40, deadline=None)
@given(value=st.one_of(st.integers(-10**15, 10**15), st.integers(-10**13, 10**13).map(float),
                       st.sampled_from([-5, 0, 1, MAX_DRAWN_PER_TASK, MAX_DRAWN_PER_TASK + 1, 1e12, -5.0, 2.5])))
def test_a_flag_a_run_file_and_a_preset_get_the_same_verdict(value: int | float, tmp_path_factory) -> None:
    tmp = tmp_path_factory.mktemp("same")
    flat_file = tmp / "flat.yaml"
    flat_file.write_text(f"max_steps_per_task: {_as_yaml(value)}\nglobal_batch_size: 1\n")
    section_file = tmp / "section.json"
    section_file.write_text(json.dumps({"runner": {"max_steps_per_task": value, "global_batch_size": 1}}))
    verdicts = {
        "flag": _outcome([f"--max-steps-per-task={_number_text(value)}", "--global-batch-size", "1"]),
        "yaml": _outcome(["--config", str(flat_file)]),
        "json": _outcome(["--config", str(section_file)]),
        "preset": _outcome(["--preset", str(section_file)]),
    }
    assert len(set(verdicts.values())) == 1, verdicts
    legal = float(value).is_integer() and 1 <= value <= MAX_DRAWN_PER_TASK
    assert verdicts["flag"][0] == ("ok" if legal else "refused"), verdicts


def test_minus_five_in_a_run_file_is_refused_like_the_flag(tmp_path: Path) -> None:
    run_file = tmp_path / "run.yaml"
    run_file.write_text("max_steps_per_task: -5\n")
    assert _refused(["--config", str(run_file)]) == f"--config {run_file}: max_steps_per_task must be >= 1, got -5"
    assert _refused(["--max-steps-per-task", "-5"]) == "--max-steps-per-task must be >= 1, got -5"
    run_file.write_text("runner: {max_steps_per_task: 1.0e+12}\n")
    assert _refused(["--config", str(run_file)]).startswith(
        f"--config {run_file}: runner.max_steps_per_task must be <= {MAX_DRAWN_PER_TASK}")


# ------------------------------------------------------------------ 3. methods and output directory
@settings(max_examples=15, deadline=None)
@given(methods=st.lists(st.sampled_from(["gorp", "seq-lora", "galore", "o-lora"]), min_size=1, max_size=5))
def test_a_method_named_twice_is_refused(methods: list[str]) -> None:
    argv = ["--method", ",".join(methods)]
    if len(set(methods)) == len(methods):
        assert _build(argv).runner.methods == methods
        return
    message = _refused(argv)
    twice = next(m for i, m in enumerate(methods) if m in methods[:i])
    assert message == f"--method names {twice!r} twice ({','.join(methods)}); each method runs once per launch: drop the repeat"


@pytest.mark.parametrize("text", ["", " ", "\t"])
def test_an_empty_output_dir_is_refused(text: str, tmp_path: Path) -> None:
    assert _refused(["--output-dir", text]) == f"--output-dir is empty ({text!r}); give a directory, e.g. runs/gorp_ds"
    run_file = tmp_path / "run.yaml"
    run_file.write_text(json.dumps({"runner": {"output_dir": text}}))
    assert _refused(["--config", str(run_file)]).startswith(f"--config {run_file}: runner.output_dir is empty")
    assert _build(["--output-dir", "out"]).runner.output_dir == "out"


# ------------------------------------------------------------------ 5. regular expressions in --full-targets
@pytest.mark.parametrize("pattern", ["re:(", "re:[a-", "re:*gate", "re:gate)", "re:(?P<x"])
def test_a_bad_regular_expression_is_refused_naming_the_flag(pattern: str) -> None:
    message = _refused(["--full-targets", pattern])
    assert message.startswith(f"--full-targets has {pattern!r}, not a valid regular expression ("), message
    assert message.endswith("fix the expression or drop the re: prefix for a plain module name")


def test_a_good_regular_expression_passes() -> None:
    cfg = _build(["--full-targets", r"re:mlp\.(gate|up)_proj,mlp.down_proj"])
    assert cfg.targets.full_targets == [r"re:mlp\.(gate|up)_proj", "mlp.down_proj"]


# ------------------------------------------------------------------ the launcher: data and DeepSpeed JSON
# Runs in the subprocess: argv[1] = cases JSON, argv[2] = outcomes JSON, argv[3] = launch/train.py.
DRIVER = r'''
import argparse, contextlib, importlib.util, io, json, sys, traceback

spec = importlib.util.spec_from_file_location("train_main", sys.argv[3])
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
outcomes = {}
for case in json.load(open(sys.argv[1])):
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            if case["legal"]:  # prepare() only: every start-up check, no training
                from gorp_ds.cl import add_arguments, build_run_config
                from gorp_ds.cl.runner import prepare

                parser = argparse.ArgumentParser()
                add_arguments(parser)
                parsed = parser.parse_args(case["argv"])
                prepare(build_run_config(parsed), parsed.ds_config)
                code = 0
            else:
                code = train.main(case["argv"])
        outcomes[case["name"]] = {"rc": code, "stderr": buffer.getvalue(), "raised": None}
    except BaseException:
        outcomes[case["name"]] = {"rc": None, "stderr": buffer.getvalue(), "raised": traceback.format_exc()}
json.dump(outcomes, open(sys.argv[2], "w"))
'''


def _ds(path: Path, **overrides: object) -> str:
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
                                "gradient_clipping": 1.0, "steps_per_print": 10**6, **overrides}))
    return str(path)


def _task(root: Path, n: int, path: str = "TC/topics") -> None:
    folder = root / path
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text(json.dumps(["World", "Sports"]))
    for split in ("train", "test"):
        rows = [{"sentence": f"{folder.name} {split} {i}", "label": ["World", "Sports"][i % 2]} for i in range(n)]
        (folder / f"{split}.json").write_text(json.dumps(rows))


# name -> (changed flags, legal: prepare() passes; else the needles of the one error line)
LAUNCHER_CASES: dict[str, tuple[dict[str, str], tuple[str, ...] | None]] = {
    "batch_larger_than_train": ({"--global-batch-size": "64", "--micro-batch-size": "0"},
                                ("--global-batch-size 64 is larger than the train split of task topics (32 examples)",
                                 "use at most 32")),
    "batch_equal_to_train": ({"--global-batch-size": "32", "--micro-batch-size": "0"}, None),
    "batch_1e9": ({"--global-batch-size": "1e9"}, ("--global-batch-size must be <= 16777216",)),
    # 32 examples, batch 8: 1e6 epochs are 4e6 steps, 3.2e7 draws (> 2**24); 5e5 epochs are 1.6e7.
    "epochs_beyond_the_order": ({"--max-steps-per-task": "none", "--epochs": "1e6"},
                                ("--epochs 1e+06 draws 32000000 examples for task topics (32 train examples", "use at most --epochs 5.243e+05")),
    "epochs_within_the_order": ({"--max-steps-per-task": "none", "--epochs": "5e5"}, None),
    "epochs_1e12": ({"--max-steps-per-task": "none", "--epochs": "1e12"}, ("--epochs must be <= 16777216",)),
    "steps_1e12": ({"--max-steps-per-task": "1e12"}, ("--max-steps-per-task must be <= 16777216",)),
    "power_iters_1e9": ({"--power-iters": "1e9"}, ("--power-iters must be <= 100",)),
    "seed_2_70": ({"--seed": str(2**70)}, (f"--seed must be <= {MAX_SEED}",)),
    "seed_largest": ({"--seed": str(MAX_SEED)}, None),
    "method_twice": ({"--method": "gorp,gorp"}, ("--method names 'gorp' twice",)),
    "output_dir_empty": ({"--output-dir": ""}, ("--output-dir is empty",)),
    "clip_nan": ({"--ds_config": "ds_clip_nan.json"}, ("ds_clip_nan.json: 'gradient_clipping' is nan",
                                                       "finite number >= 0")),
    "clip_negative": ({"--ds_config": "ds_clip_negative.json"}, ("ds_clip_negative.json: 'gradient_clipping' is -1.0",)),
    "clip_text": ({"--ds_config": "ds_clip_text.json"}, ("ds_clip_text.json: 'gradient_clipping' is 'big'",)),
    "clip_zero": ({"--ds_config": "ds_clip_zero.json"}, None),
    "full_targets_bad_regex": ({"--full-targets": "re:("}, ("--full-targets has 're:('", "not a valid regular expression")),
    "full_targets_good_regex": ({"--full-targets": r"re:mlp\.gate_proj"}, None),
    "eval_task_also_trained": ({"--eval-tasks": "emb_fruit,topics"},
                               ("--eval-tasks: 'topics' loads task 'topics', which is also in the trained sequence; an eval "
                                "task is never trained: remove it from --eval-tasks or from the sequence",)),
    "eval_task_unseen": ({"--eval-tasks": "emb_fruit"}, None),
    # --eval-only evaluates the eval tasks after the task list's columns: one task may not be both
    "eval_only_eval_task_also_evaluated": ({"--eval-only": "true", "--eval-tasks": "emb_fruit,topics"},
                                           ("--eval-tasks: 'topics' loads task 'topics', which is also in the trained "
                                            "sequence; an eval task is never trained: remove it from --eval-tasks or "
                                            "from the sequence",)),
    # bench/ holds TC/topics and NLI/CB: order 4 lacks 14 of its 15 tasks.
    "order_4_missing_tasks": ({"--tasks": "none", "--order": "4"},
                              ("order 4: task MNLI is missing from --data-dir: expected ",
                               "missing: MNLI, WiC, COPA, QQP, BoolQA, RTE, IMDB, yelp, amazon, SST-2, dbpedia, agnews, "
                               "MultiRC, yahoo); add the tasks, or pass --allow-substitutes to run the order without them")),
    "order_4_allow_substitutes": ({"--tasks": "none", "--order": "4", "--allow-substitutes": "true"}, None),
}


@pytest.fixture(scope="module")
def launcher_outcomes(tmp_path_factory, tiny_model_dir) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("refusals")
    _task(tmp / "bench", 32)
    _task(tmp / "bench", 32, "NLI/CB")
    ds_files = {"ds_good.json": {}, "ds_clip_nan.json": {"gradient_clipping": math.nan},
                "ds_clip_negative.json": {"gradient_clipping": -1.0}, "ds_clip_text.json": {"gradient_clipping": "big"},
                "ds_clip_zero.json": {"gradient_clipping": 0}}
    for name, overrides in ds_files.items():
        _ds(tmp / name, **overrides)
    cases = []
    for name, (change, needles) in LAUNCHER_CASES.items():
        args = {"--ds_config": "ds_good.json", "--model": str(tiny_model_dir), "--data-dir": str(tmp / "bench"),
                "--tasks": "TC/topics", "--method": "gorp", "--max-steps-per-task": "2", "--global-batch-size": "8",
                "--micro-batch-size": "2", "--eval-samples": "4", "--output-dir": str(tmp / "out" / name), **change}
        args["--ds_config"] = str(tmp / args["--ds_config"])
        argv = [item for flag, value in args.items() for item in (flag, value)]
        cases.append({"name": name, "argv": argv, "legal": needles is None})
    (tmp / "cases.json").write_text(json.dumps(cases))
    env = one_rank_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    (tmp / "driver.py").write_text(DRIVER)
    done = subprocess.run([sys.executable, str(tmp / "driver.py"), str(tmp / "cases.json"), str(tmp / "outcomes.json"),
                           str(TRAIN)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp / "outcomes.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAUNCHER_CASES))
def test_the_launcher_refuses_with_one_line_or_a_neighbour_passes(name: str, launcher_outcomes: dict[str, dict]) -> None:
    outcome = launcher_outcomes[name]
    assert outcome["raised"] is None, outcome["raised"]
    needles = LAUNCHER_CASES[name][1]
    if needles is None:
        assert outcome["rc"] == 0, outcome["stderr"][-2000:]
        assert ERROR_PREFIX not in outcome["stderr"]
        return
    assert outcome["rc"] == 2, outcome
    assert "Traceback" not in outcome["stderr"], outcome["stderr"]
    lines = [line for line in outcome["stderr"].splitlines() if ERROR_PREFIX in line]
    assert len(lines) == 1, outcome["stderr"]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
