"""Bad input stops the trainer before any training with one clear line and exit status 2.

One table (``_cases``), one parametrized test over it. All cases run in ONE Python subprocess (a
one-rank process group, no launcher) that calls ``launch/train.py``'s ``main(argv)`` for each case
with stderr captured; a case may first set up its output directory (a real ``prepare`` of the
control arguments writes ``config.yaml``, plus files it names), and nothing in that directory may
change. Two real runs then check that the status reaches the shell, for a plain process and for a
2-rank ``deepspeed`` launch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.launch import clean_env, deepspeed, free_port, one_rank_env

ERROR_PREFIX = "gorp_ds: error:"

pytestmark = pytest.mark.slow

# Runs in the subprocess: argv[1] = cases JSON, argv[2] = where to write the outcomes, argv[3] = launch/train.py.
DRIVER = r'''
import argparse, contextlib, importlib.util, io, json, sys, traceback
from pathlib import Path

spec = importlib.util.spec_from_file_location("train_main", sys.argv[3])
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
cases = json.load(open(sys.argv[1]))
outcomes = {}


def setup(case):
    """An output directory holding a run: prepare() of the control arguments writes its config.yaml."""
    from gorp_ds.cl import add_arguments, build_run_config
    from gorp_ds.cl.runner import prepare

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parsed = parser.parse_args(case["setup"]["argv"])
    prepare(build_run_config(parsed), parsed.ds_config)
    out = Path(case["setup"]["out"])
    for rel, text in case["setup"].get("files", {}).items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    if "results_change" in case["setup"]:
        import yaml

        run = yaml.safe_load((out / "config.yaml").read_text())["run"]
        run.update(case["setup"]["results_change"])
        (out / "gorp").mkdir(exist_ok=True)
        (out / "gorp" / "results.json").write_text(json.dumps({"method": "gorp", "config": run}))
    if case["setup"].get("drop_config"):
        (out / "config.yaml").unlink()


def listing(out):
    out = Path(out)
    return {str(p.relative_to(out)): [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(out.rglob("*"))
            if p.is_file()} if out.is_dir() else {}


for case in cases:
    buffer = io.StringIO()
    try:
        if case.get("setup"):
            setup(case)
        before = listing(case["out"])
        with contextlib.redirect_stderr(buffer):
            if case.get("control"):
                # The unmodified arguments pass every check: each case fails for its own reason.
                from gorp_ds.cl import add_arguments, build_run_config
                from gorp_ds.cl.runner import prepare

                parser = argparse.ArgumentParser()
                add_arguments(parser)
                parsed = parser.parse_args(case["argv"])
                tasks, ds, _ = prepare(build_run_config(parsed), parsed.ds_config)
                code, extra = 0, {"tasks": [t.name for t in tasks], "train_batch_size": ds["train_batch_size"]}
            else:
                code, extra = train.main(case["argv"]), {}
        outcomes[case["name"]] = {"rc": code, "stderr": buffer.getvalue(), "raised": None,
                                  "before": before, "after": listing(case["out"]), **extra}
    except SystemExit as exit_:
        outcomes[case["name"]] = {"rc": exit_.code, "stderr": buffer.getvalue(), "raised": "SystemExit"}
    except BaseException:
        outcomes[case["name"]] = {"rc": None, "stderr": buffer.getvalue(), "raised": traceback.format_exc()}
json.dump(outcomes, open(sys.argv[2], "w"))
'''


def _env() -> dict[str, str]:
    return clean_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _one_rank_env() -> dict[str, str]:
    return one_rank_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


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
    # issue 26: declared task folders (task.json beside instruction records)
    good = json.dumps({"instruction": "Repeat.", "input": "a b", "output": "a b"}) + "\n"
    for name, spec, train in (("nooutput", {"kind": "instruction"}, good + '{"instruction": "Repeat.", "input": "c"}\n'),
                              ("accmetric", {"kind": "instruction", "metric": "accuracy"}, good),
                              ("nometric", {"kind": "instruction", "metric": "bleu"}, good)):
        folder = root / "GEN" / name
        folder.mkdir(parents=True)
        (folder / "task.json").write_text(json.dumps(spec))
        (folder / "train.jsonl").write_text(train)
        (folder / "test.jsonl").write_text(good)
    _write_task(root, "XX", "surrogate", ["yes", "no"],  # the JSON escape \ud800: half a UTF-16 pair
                test=json.dumps([{"sentence": "a", "label": "yes"}, {"sentence": "b\ud800", "label": "no"}]))
    return root


def _ds(path: Path, **overrides) -> str:
    config = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "gradient_clipping": 1.0,
              "steps_per_print": 10**6}
    for key, value in overrides.items():
        config[key] = value
    path.write_text(json.dumps(config))
    return str(path)


def _broken_models(tmp: Path, model: str) -> dict[str, Path]:
    """Copies of the tiny model directory, each broken in one way."""
    source = Path(model)
    only_config = tmp / "model_only_config"
    only_config.mkdir()
    shutil.copy(source / "config.json", only_config / "config.json")
    truncated = tmp / "model_truncated"
    shutil.copytree(source, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    malformed = tmp / "model_bad_config"
    shutil.copytree(source, malformed)
    (malformed / "config.json").write_text('{"model_type": "llama", "hidden_size": 32,')
    deeper = tmp / "model_more_layers"  # config.json: 3 layers, the weights: 2 (issue 28)
    shutil.copytree(source, deeper)
    config = json.loads((deeper / "config.json").read_text())
    (deeper / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    return {"only_config": only_config, "truncated": truncated, "malformed": malformed, "more_layers": deeper}


def _unwritable_dir(tmp: Path) -> str | None:
    """A directory this process cannot write: mode 0500 for a normal user; for root (who may write
    anything) a read-only location, if the machine has one."""
    if os.geteuid() != 0:
        locked = tmp / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return str(locked / "out")
    return "/proc/sys/gorp_ds_out" if not os.access("/proc/sys", os.W_OK) else None


# Every case of the table (the fixture checks that _cases builds exactly these).
CASES = [
    "missing_data_dir", "data_not_json", "data_not_list", "entry_without_label", "label_not_in_labels",
    "labels_not_json", "empty_task", "empty_sentence", "unknown_task", "unknown_method", "unknown_order",
    "tasks_and_order", "lora_targets_match_nothing", "full_targets_match_nothing", "rank_too_large",
    "ds_batch_contradiction", "ds_bf16_vs_fp32", "ds_zero3_offload_param", "ds_zero3_olora", "ds_config_missing", "ds_config_not_json",
    "ds_stage_not_a_number", "ds_zero_not_an_object", "ds_scheduler", "config_malformed", "config_unknown_key",
    "model_missing", "model_only_config", "model_truncated_safetensors", "model_config_malformed",
    "model_config_more_layers", "data_lone_surrogate",
    "lora_r_too_large", "batch_not_divisible", "scale_zero", "scale_negative", "scale_huge", "lr_lora_nan",
    "lr_full_nan", "lr_plain_nan", "epochs_inf", "lora_alpha_zero", "lora_alpha_negative", "max_bad_steps_zero",
    "output_is_a_file", "output_under_a_file", "output_unwritable", "tensorboard_under_a_file", "resume_value_unknown",
    "resume_and_overwrite", "used_dir_without_flags", "resume_nothing_there", "resume_no_checkpoint_yet",
    "resume_without_config_yaml", "resume_tasks_swapped", "resume_lora_r", "resume_batch_and_steps",
    "resume_methods_and_model", "resume_finished_with_other_lr",
    # --- issue 13: every message names the flag or run-file key the user wrote
    "max_length_flag", "max_length_file_flat", "max_length_file_dashed", "rank_zero_in_section", "rank_not_integer",
    "rank_text_flag", "unknown_key_in_section", "bool_not_boolean_in_file", "export_flag_not_boolean",
    "projector_unknown", "prompt_format_unknown", "dtype_unknown", "beta1_one", "beta2_in_section", "eps_negative",
    "oversample_negative", "power_iters_text", "shared_threshold_above_one", "update_gap_zero",
    "weight_decay_negative", "micro_batch_negative", "eval_batch_zero", "keep_checkpoints_zero",
    "save_every_negative", "max_source_length_small", "max_target_length_zero", "olora_lambda_negative",
    "preset_unknown", "order_in_file_and_tasks_flag", "method_unknown_in_file", "methods_flag_alias",
    "lora_r_zero_in_section", "setting_given_twice_in_file", "rank_null_in_file", "preset_file_bad_value",
    "max_train_zero", "eval_samples_zero",
    # --- issue 25: the learning-rate schedule
    "lr_schedule_unknown", "lr_warmup_longer_than_task", "lr_warmup_longer_than_sequence", "lr_warmup_negative",
    "lr_warmup_steps_and_ratio", "lr_min_ratio_above_one", "lr_schedule_roles_unknown",
    # --- issue 26: task kinds and their metrics
    "instruction_record_without_output", "metric_needs_labels", "metric_unknown",
    # --- issue 25: the W&B section (gorp_ds/cl/wandb_log.py)
    "ds_wandb_not_an_object", "ds_wandb_unknown_field",
]


def _cases(tmp: Path, model: str) -> tuple[list[dict], dict[str, tuple[str, ...]]]:
    """(cases, {case name: substrings its error text must contain}); the error text is the
    ``gorp_ds: error:`` line plus any indented lines under it (one per differing field)."""
    bench = _bench(tmp / "bench")
    good_ds = _ds(tmp / "ds_good.json")
    base = {"--ds_config": good_ds, "--model": model, "--data-dir": str(bench), "--tasks": "TC/topics,SC/moods",
            "--method": "gorp", "--max-steps-per-task": "2", "--global-batch-size": "8", "--micro-batch-size": "2",
            "--eval-samples": "4"}
    (tmp / "cfg_bad.yaml").write_text("method: [gorp\nrank: 4\n")
    (tmp / "cfg_unknown.json").write_text(json.dumps({"method": "gorp", "learning_rate": 1e-3}))
    _write_task(bench, "XX", "emptysent", ["yes", "no"],
                train=json.dumps([{"sentence": "a", "label": "yes"}, {"sentence": "", "label": "no"}]))
    models = _broken_models(tmp, model)
    (tmp / "a_file").write_text("not a directory")
    unwritable = _unwritable_dir(tmp)
    # Output directories holding a run: {case: setup}; the setup's prepare() writes config.yaml.
    held = {
        "used_dir_without_flags": {},
        "resume_no_checkpoint_yet": {},
        "resume_without_config_yaml": {"files": {"gorp/checkpoints/latest": "task01_step000002"}, "drop_config": True},
        "resume_tasks_swapped": {}, "resume_lora_r": {}, "resume_batch_and_steps": {},
        "resume_methods_and_model": {},
        "resume_finished_with_other_lr": {"results_change": {"lr_lora": 5e-3}},
    }
    files = {  # run files of the issue-13 cases
        "max_length_file_flat": "max_length: 4\n", "max_length_file_dashed": "max-length: 4\n",
        "rank_zero_in_section": "optimizer:\n  rank: 0\n", "rank_not_integer": "optimizer: {rank: 2.5}\n",
        "unknown_key_in_section": "optimizer:\n  rnk: 4\n", "bool_not_boolean_in_file": "runner: {export: maybe}\n",
        "beta2_in_section": "optimizer: {beta2: 1.5}\n", "order_in_file_and_tasks_flag": "data: {order: A}\n",
        "method_unknown_in_file": "runner: {methods: [gorp, sgd]}\n", "lora_r_zero_in_section": "lora: {r: 0}\n",
        "setting_given_twice_in_file": "rank: 4\noptimizer: {rank: 5}\n", "rank_null_in_file": "optimizer: {rank: null}\n",
        "preset_file_bad_value": "optimizer: {update_gap: -2}\n",
    }
    run_file = {name: str(_write(tmp / f"run_{name}.yaml", text)) for name, text in files.items()}
    other_model = str(models["truncated"].parent / "model_other")
    shutil.copytree(model, other_model)
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
        "ds_zero3_offload_param": ({"--ds_config": _ds(tmp / "ds_zero3_offload.json", zero_optimization={
            "stage": 3, "offload_param": {"device": "cpu"}})},
            (str(tmp / "ds_zero3_offload.json"), "zero_optimization.offload_param", "'cpu'", "remove")),
        "ds_zero3_olora": ({"--ds_config": _ds(tmp / "ds_zero3.json", zero_optimization={"stage": 3}),
                            "--method": "gorp,o-lora"},
                           (str(tmp / "ds_zero3.json"), "zero_optimization.stage", "o-lora", "stage 2")),
        "ds_config_missing": ({"--ds_config": str(tmp / "ds_missing.json")}, (str(tmp / "ds_missing.json"), "not found")),
        "ds_config_not_json": ({"--ds_config": str(_write(tmp / "ds_broken.json", '{"zero_optimization": '))},
                               (str(tmp / "ds_broken.json"), "JSON")),
        "config_malformed": ({"--config": str(tmp / "cfg_bad.yaml")}, (str(tmp / "cfg_bad.yaml"), "cannot parse")),
        "config_unknown_key": ({"--config": str(tmp / "cfg_unknown.json")}, (str(tmp / "cfg_unknown.json"), "learning_rate")),
        "model_missing": ({"--model": str(tmp / "no_model")}, ("--model", str(tmp / "no_model"))),
        "lora_r_too_large": ({"--lora-r": "40"}, ("--lora-r 40", "32")),
        "batch_not_divisible": ({"--global-batch-size": "7"}, ("--global-batch-size 7", "--micro-batch-size 2")),
        # --- issue 14: each crashed with a traceback or was accepted silently
        "instruction_record_without_output": ({"--tasks": "TC/topics,GEN/nooutput"},
                                              (str(bench / "GEN/nooutput/train.jsonl"), "line 2", '"output"')),
        "metric_needs_labels": ({"--tasks": "GEN/accmetric"},
                                (str(bench / "GEN/accmetric/task.json"), '"metric"', "'accuracy'", "label set")),
        "metric_unknown": ({"--tasks": "GEN/nometric"}, (str(bench / "GEN/nometric/task.json"), '"metric"', "'bleu'")),
        "empty_sentence": ({"--tasks": "TC/topics,XX/emptysent"},
                           (str(bench / "XX/emptysent/train.json"), "entry 1", "empty")),
        "ds_stage_not_a_number": ({"--ds_config": _ds(tmp / "ds_two.json", zero_optimization={"stage": "two"})},
                                  (str(tmp / "ds_two.json"), "zero_optimization.stage", "'two'", "1, 2 or 3")),
        "ds_zero_not_an_object": ({"--ds_config": _ds(tmp / "ds_yes.json", zero_optimization="yes")},
                                  (str(tmp / "ds_yes.json"), "'zero_optimization'", "not an object")),
        "ds_wandb_not_an_object": ({"--ds_config": _ds(tmp / "ds_wandb_yes.json", wandb="yes")},
                                   (str(tmp / "ds_wandb_yes.json"), "'wandb'", "not an object")),
        "ds_wandb_unknown_field": ({"--ds_config": _ds(tmp / "ds_wandb_typo.json", wandb={"enabled": True, "projekt": "x"})},
                                   (str(tmp / "ds_wandb_typo.json"), "'wandb.projekt'", "did you mean 'project'")),
        "ds_scheduler": ({"--ds_config": _ds(tmp / "ds_sched.json", scheduler={
                             "type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-4}})},
                         (str(tmp / "ds_sched.json"), "'scheduler'", "--lr-lora", "remove", "--lr-schedule")),
        "model_only_config": ({"--model": str(models["only_config"])}, (str(models["only_config"]), "no weights")),
        "model_truncated_safetensors": ({"--model": str(models["truncated"])},
                                        (str(models["truncated"] / "model.safetensors"), "truncated")),
        "model_config_malformed": ({"--model": str(models["malformed"])},
                                   (str(models["malformed"] / "config.json"), "not valid JSON")),
        "model_config_more_layers": ({"--model": str(models["more_layers"])},
                                     (str(models["more_layers"] / "config.json"), "describes 3 layers", "hold 2")),
        "data_lone_surrogate": ({"--tasks": "TC/topics,XX/surrogate"},
                                (str(bench / "XX/surrogate/test.json"), "entry 1", '"sentence"', "surrogate")),
        "scale_zero": ({"--scale": "0"}, ("--scale", "got 0")),
        "scale_negative": ({"--scale": "-1"}, ("--scale", "got -1")),
        "scale_huge": ({"--scale": "1e300"}, ("--scale", "1e+300")),
        "lr_lora_nan": ({"--lr-lora": "nan"}, ("--lr-lora", "finite", "nan")),
        "lr_full_nan": ({"--lr-full": "nan"}, ("--lr-full", "finite", "nan")),
        "lr_plain_nan": ({"--lr-plain": "NaN"}, ("--lr-plain", "finite", "nan")),
        "epochs_inf": ({"--max-steps-per-task": None, "--epochs": "inf"}, ("--epochs", "finite", "inf")),
        "lora_alpha_zero": ({"--lora-alpha": "0"}, ("--lora-alpha", "> 0", "no-op")),
        "lora_alpha_negative": ({"--lora-alpha": "-8"}, ("--lora-alpha", "> 0", "-8")),
        "max_bad_steps_zero": ({"--max-bad-steps": "0"}, ("--max-bad-steps", ">= 1")),
        "output_is_a_file": ({"--output-dir": str(tmp / "a_file")}, (str(tmp / "a_file"), "is a file")),
        "output_under_a_file": ({"--output-dir": str(tmp / "a_file" / "run")},
                                (str(tmp / "a_file" / "run"), str(tmp / "a_file"), "is a file")),
        "output_unwritable": ({"--output-dir": unwritable}, (str(unwritable), "not writable")),
        "tensorboard_under_a_file": ({"--ds_config": _ds(tmp / "ds_tb.json", tensorboard={
            "enabled": True, "output_path": str(tmp / "a_file" / "tb"), "job_name": "x"})},
            (str(tmp / "ds_tb.json"), "tensorboard.output_path", str(tmp / "a_file"), "is a file")),
        "resume_value_unknown": ({"--resume": "maybe"}, ("resume", "'maybe'", "auto")),
        "resume_and_overwrite": ({"--resume": None, "--overwrite": None}, ("--resume", "--overwrite")),
        # --- issue 14: output directories that hold a run (see `held`)
        "used_dir_without_flags": ({}, ("already holds a run", "config.yaml", "--resume", "--overwrite")),
        "resume_nothing_there": ({"--resume": None}, ("--resume", "holds no run", "--resume auto")),
        "resume_no_checkpoint_yet": ({"--resume": None}, ("--resume", "no checkpoint or results", "--resume auto")),
        "resume_without_config_yaml": ({"--resume": "auto"}, ("gorp/checkpoints", "no config.yaml", "--overwrite")),
        "resume_tasks_swapped": ({"--resume": None, "--tasks": "SC/moods,TC/topics"},
                                 ("config.yaml", "different run", "\n  tasks: saved ['TC/topics', 'SC/moods'], "
                                  "this run ['SC/moods', 'TC/topics']")),
        "resume_lora_r": ({"--resume": "auto", "--lora-r": "4"}, ("different run", "\n  lora_r: saved 8, this run 4")),
        "resume_batch_and_steps": ({"--resume": None, "--global-batch-size": "4", "--max-steps-per-task": "3"},
                                   ("different run", "\n  global_batch_size: saved 8, this run 4",
                                    "\n  max_steps_per_task: saved 2, this run 3")),
        "resume_methods_and_model": ({"--resume": None, "--method": "gorp,seq-lora", "--model": other_model,
                                      "--lora-targets": "q_proj", "--full-targets": "mlp.up_proj"},
                                     ("different run", "\n  methods: saved ['gorp'], this run ['gorp', 'seq-lora']",
                                      f"\n  model: saved '{model}', this run '{other_model}'",
                                      "\n  lora_targets: saved", "\n  full_targets: saved")),
        "resume_finished_with_other_lr": ({"--resume": "auto"},
                                          ("finished results", "gorp/results.json: lr_lora: saved 0.005, this run 0.0002")),
        # --- issue 13: the flag or key as written (a needle "!x": x must not appear)
        "max_length_flag": ({"--max-length": "4"}, ("--max-length must be >= 8, got 4", "!data.", "!data section")),
        "max_length_file_flat": ({"--config": run_file["max_length_file_flat"]},
                                 (f"--config {run_file['max_length_file_flat']}: max_length must be >= 8", "!data.")),
        "max_length_file_dashed": ({"--config": run_file["max_length_file_dashed"]}, ("max-length must be >= 8",)),
        "rank_zero_in_section": ({"--config": run_file["rank_zero_in_section"]},
                                 (f"{run_file['rank_zero_in_section']}: optimizer.rank must be >= 1, got 0",)),
        "rank_not_integer": ({"--config": run_file["rank_not_integer"]}, ("optimizer.rank must be an integer", "2.5")),
        "rank_text_flag": ({"--rank": "eight"}, ("--rank must be an integer", "'eight'")),
        "unknown_key_in_section": ({"--config": run_file["unknown_key_in_section"]},
                                   ("'optimizer.rnk'", "the optimizer section has", "rank")),
        "bool_not_boolean_in_file": ({"--config": run_file["bool_not_boolean_in_file"]},
                                     ("runner.export must be true or false", "'maybe'")),
        "export_flag_not_boolean": ({"--export": "sometimes"}, ("--export must be true or false", "'sometimes'")),
        "projector_unknown": ({"--projector": "svd"}, ("--projector must be one of randomized, exact", "'svd'")),
        "prompt_format_unknown": ({"--prompt-format": "markdown"}, ("--prompt-format", "plain, chat", "'markdown'")),
        "dtype_unknown": ({"--dtype": "fp16"}, ("--dtype must be one of bf16, fp32", "'fp16'")),
        "beta1_one": ({"--beta1": "1.0"}, ("--beta1 must be in [0, 1)", "1.0")),
        "beta2_in_section": ({"--config": run_file["beta2_in_section"]}, ("optimizer.beta2 must be in [0, 1)",)),
        "eps_negative": ({"--eps": "-0.5"}, ("--eps must be >= 0",)),
        "oversample_negative": ({"--oversample": "-1"}, ("--oversample must be >= 0, got -1",)),
        "power_iters_text": ({"--power-iters": "two"}, ("--power-iters must be an integer", "'two'")),
        "shared_threshold_above_one": ({"--shared-threshold": "1.5"}, ("--shared-threshold must be <= 1", "1.5")),
        "update_gap_zero": ({"--update-gap": "0"}, ("--update-gap must be >= 1, got 0",)),
        "weight_decay_negative": ({"--weight-decay": "-0.1"}, ("--weight-decay must be >= 0",)),
        "micro_batch_negative": ({"--micro-batch-size": "-1"}, ("--micro-batch-size must be >= 0, got -1",)),
        "eval_batch_zero": ({"--eval-batch-size": "0"}, ("--eval-batch-size must be >= 1, got 0",)),
        "keep_checkpoints_zero": ({"--keep-checkpoints": "0"}, ("--keep-checkpoints must be >= 1",)),
        "save_every_negative": ({"--save-every": "-5"}, ("--save-every must be >= 0, got -5",)),
        "max_source_length_small": ({"--max-source-length": "4"}, ("--max-source-length must be >= 8, got 4", "!data.")),
        "max_target_length_zero": ({"--max-target-length": "0"}, ("--max-target-length must be >= 1, got 0",)),
        "olora_lambda_negative": ({"--olora-lambda": "-1"}, ("--olora-lambda must be >= 0",)),
        "preset_unknown": ({"--preset": "nosuch"}, ("--preset nosuch", "no such preset", "embedded_quick")),
        "order_in_file_and_tasks_flag": ({"--config": run_file["order_in_file_and_tasks_flag"]},
                                         (f"--config {run_file['order_in_file_and_tasks_flag']}: data.order and --tasks "
                                          "are mutually exclusive",)),
        "method_unknown_in_file": ({"--method": None, "--config": run_file["method_unknown_in_file"]},
                                   ("runner.methods must be one of", "'sgd'")),
        "methods_flag_alias": ({"--method": None, "--methods": "gorp,sgd"}, ("--methods must be one of", "'sgd'")),
        "lora_r_zero_in_section": ({"--config": run_file["lora_r_zero_in_section"]}, ("lora.r must be >= 1, got 0",)),
        "setting_given_twice_in_file": ({"--config": run_file["setting_given_twice_in_file"]},
                                        ("'optimizer.rank' sets rank a second time", "'rank'")),
        "rank_null_in_file": ({"--config": run_file["rank_null_in_file"]}, ("optimizer.rank must be an integer",
                                                                            "not empty")),
        "preset_file_bad_value": ({"--preset": run_file["preset_file_bad_value"]},
                                  (f"preset {run_file['preset_file_bad_value']}", "optimizer.update_gap must be >= 1")),
        "max_train_zero": ({"--max-train-per-task": "0"}, ("--max-train-per-task must be >= 1, got 0", "!data.")),
        "eval_samples_zero": ({"--eval-samples": "0"}, ("--eval-samples must be >= 1, got 0", "!data.")),
        "lr_schedule_unknown": ({"--lr-schedule": "step"}, ("--lr-schedule must be one of constant, linear, cosine",
                                                             "'step'")),
        "lr_warmup_longer_than_task": ({"--lr-schedule": "cosine", "--lr-warmup-steps": "3"},
                                       ("--lr-warmup-steps 3 is longer than the 2 optimizer steps of task",
                                        "--max-steps-per-task 2", "use at most 2", "--lr-warmup-ratio")),
        "lr_warmup_longer_than_sequence": ({"--lr-warmup-steps": "5", "--lr-schedule-scope": "sequence"},
                                           ("--lr-warmup-steps 5 is longer than the 4 optimizer steps of the whole "
                                            "sequence", "use at most 4")),
        "lr_warmup_negative": ({"--lr-warmup-steps": "-1"}, ("--lr-warmup-steps must be >= 0, got -1",)),
        "lr_warmup_steps_and_ratio": ({"--lr-warmup-steps": "1", "--lr-warmup-ratio": "0.5"},
                                      ("--lr-warmup-steps 1 and --lr-warmup-ratio 0.5 both set the warmup",
                                       "give one of them")),
        "lr_min_ratio_above_one": ({"--lr-min-ratio": "1.5"}, ("--lr-min-ratio must be <= 1, got 1.5",)),
        "lr_schedule_roles_unknown": ({"--lr-schedule-roles": "full,lora"},
                                      ("--lr-schedule-roles must be one of lora_a, lora_b, full, plain", "'lora'")),
    }
    cases = [{"name": "control", "control": True, "out": str(tmp / "out" / "control"),
              "argv": _argv({**base, "--output-dir": str(tmp / "out" / "control")})}]
    expected = {}
    for name, (change, needles) in specs.items():
        if name == "output_unwritable" and unwritable is None:
            continue  # root without a read-only location: nothing here is unwritable
        out = str(tmp / "out" / name)
        args = {"--output-dir": out, **base, **{k: v for k, v in change.items() if k != "--output-dir"}}
        args["--output-dir"] = change.get("--output-dir", out)
        argv = _argv(args)
        for flag in ("--resume", "--overwrite"):  # flags that may stand alone
            if flag in change and change[flag] is None:
                argv.append(flag)
        case = {"name": name, "argv": argv, "out": out}
        if name in held:
            setup = held[name]
            case["setup"] = {"argv": _argv({**base, "--output-dir": out}), "out": out,
                             "files": setup.get("files", {}), **({"results_change": setup["results_change"]}
                                                                 if "results_change" in setup else {})}
            if setup.get("drop_config"):
                case["setup"]["drop_config"] = True
        cases.append(case)
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


def _error_text(stderr: str) -> str:
    """The error line and the indented lines under it."""
    lines = stderr.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(ERROR_PREFIX))
    block = [lines[first]]
    for line in lines[first + 1 :]:
        if not line.startswith("  "):
            break
        block.append(line)
    return "\n".join(block)


@pytest.fixture(scope="module")
def table(tmp_path_factory, tiny_model_dir) -> dict:
    """Every case of the table, run once in one subprocess."""
    tmp = tmp_path_factory.mktemp("bad_input")
    cases, expected = _cases(tmp, str(tiny_model_dir))
    built = set(expected) | ({"output_unwritable"} if "output_unwritable" not in expected else set())
    assert built == set(CASES), f"table and CASES differ: {sorted(built ^ set(CASES))}"
    (tmp / "cases.json").write_text(json.dumps(cases))
    (tmp / "driver.py").write_text(DRIVER)
    proc = subprocess.run(
        [sys.executable, str(tmp / "driver.py"), str(tmp / "cases.json"), str(tmp / "outcomes.json"),
         str(REPO / "launch" / "train.py")],
        env=_one_rank_env(), capture_output=True, text=True, timeout=400, cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"outcomes": json.loads((tmp / "outcomes.json").read_text()), "expected": expected}


def test_control_arguments_pass_every_check(table) -> None:
    control = table["outcomes"]["control"]
    assert control["raised"] is None, control["raised"]
    assert control["tasks"] == ["topics", "moods"] and control["train_batch_size"] == 8


@pytest.mark.parametrize("name", CASES)
def test_bad_input(table, name) -> None:
    if name not in table["expected"]:
        pytest.skip("no unwritable location for root on this machine")
    got, needles = table["outcomes"][name], table["expected"][name]
    assert got["raised"] is None, f"main() raised instead of returning 2:\n{got['raised']}"
    assert got["rc"] == 2, got["stderr"][-3000:]
    assert "Traceback" not in got["stderr"], got["stderr"][-3000:]
    lines = _error_lines(got["stderr"])
    assert len(lines) == 1, f"{len(lines)} '{ERROR_PREFIX}' lines in stderr: {got['stderr'][-1500:]!r}"
    text = _error_text(got["stderr"])
    missing = [n for n in needles if not n.startswith("!") and n not in text]
    assert not missing, f"error {text!r} does not mention {missing}"
    present = [n[1:] for n in needles if n.startswith("!") and n[1:] in text]
    assert not present, f"error {text!r} mentions {present}, which the user did not write"
    # Stopped before writing, moving or deleting anything in the output directory.
    assert got["after"] == got["before"], (got["before"], got["after"])


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
        [deepspeed(), "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "launch" / "train.py"), *argv],
        env=_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    lines = [line for line in output.splitlines() if ERROR_PREFIX in line]
    assert len(lines) == 1, output[-3000:]
    assert "--rank 33" in lines[0]
    assert "Traceback" not in output
    _assert_nothing_written(tmp_path / "out" / "rank_too_large")


def test_launcher_exit_runs_the_python_clean_up_then_keeps_the_status(tmp_path: Path) -> None:
    """launch/train.py leaves through ``_exit``: atexit handlers run, unflushed output and log
    records reach their streams and files, and the process status is exactly the one given (75 here,
    the requeue status), with the interpreter's teardown skipped."""
    script = tmp_path / "leave.py"
    script.write_text(
        "import atexit, importlib.util, logging, sys\n"
        f"spec = importlib.util.spec_from_file_location('train_main', {str(REPO / 'launch' / 'train.py')!r})\n"
        "train = importlib.util.module_from_spec(spec); spec.loader.exec_module(train)\n"
        f"handler = logging.FileHandler({str(tmp_path / 'run.log')!r}); logging.getLogger('t').addHandler(handler)\n"
        "logging.getLogger('t').warning('last record')\n"
        f"atexit.register(lambda: open({str(tmp_path / 'atexit.txt')!r}, 'w').write('ran'))\n"
        "sys.stdout.write('no newline, not flushed')\n"
        "train._exit(75)\n"
        "print('not reached')\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert proc.stdout == "no newline, not flushed"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert (tmp_path / "run.log").read_text() == "last record\n"
