"""The run configuration is generated from the components' settings dataclasses: every setting has
a flag with help, type, default and choices, round-trips through a run file (by section and flat)
and the command line, and ``--print-config`` / ``config.yaml`` name each value's source."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
from pathlib import Path

import pytest
import yaml

from gorp_ds.cl.command_line import add_arguments, build_run_config
from gorp_ds.cl.config import SETTINGS, RunConfig, flatten_run
from gorp_ds.cl.run_dir import config_text, resolved_config
from tests.support import REPO


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def _build(*argv: str) -> RunConfig:
    return build_run_config(_parser().parse_args(list(argv)))


def _other(spec, default):
    """A valid value different from the default, derived from the setting's kind and checks."""
    if spec.kind is bool:
        return not default
    if spec.choices and spec.kind is list:
        return [spec.choices[-1], spec.choices[0]]
    if spec.choices:
        return next(c for c in spec.choices if c != default)
    if spec.kind is list:
        return ["x_proj", "y_proj"]
    if spec.kind is int:
        return (default or 6) + 3
    if spec.kind is float:
        return default * 0.5 if default else 0.05
    return "some/where"


def _values() -> list[dict]:
    """Two sets of non-default values that cover every setting (a few settings exclude each other)."""
    first = {flat: _other(spec, spec.default) for flat, spec in SETTINGS.items()}
    first.update(order=None, resume="off")  # --order excludes --tasks, --resume excludes --overwrite
    first.update(lr_warmup_ratio=0.0)  # --lr-warmup-steps excludes --lr-warmup-ratio
    second = {"order": "B", "tasks": None, "resume": "auto", "overwrite": False, "model": "some/model",
              "lr_warmup_steps": 0, "lr_warmup_ratio": 0.05}
    return [first, second]


def _as_flags(values: dict) -> list[str]:
    argv = []
    for flat, value in values.items():
        if value is None:
            continue
        text = ",".join(value) if isinstance(value, list) else str(value).lower() if isinstance(value, bool) else str(value)
        argv += [SETTINGS[flat].flag, text]
    return argv


def test_every_setting_has_a_flag_with_help_type_default_and_choices() -> None:
    parser = _parser()
    actions = {a.dest: a for a in parser._actions if a.help != argparse.SUPPRESS}
    help_text = parser.format_help()
    for flat, spec in SETTINGS.items():
        action = actions.get(flat)
        assert action is not None and spec.flag in action.option_strings, flat
        assert action.help and len(action.help) > 20, flat
        assert "default:" in action.help and f"{spec.section}.{spec.name}" in action.help, flat
        assert action.metavar, flat  # the type (INT, FLOAT, TEXT, A,B,...) or the choices
        if spec.choices:
            assert all(str(c) in action.metavar for c in spec.choices), (flat, action.metavar)
        if spec.kind is bool:
            negative = f"--no-{flat.replace('_', '-')}"
            assert any(negative in a.option_strings and a.dest == flat for a in parser._actions), flat
            assert negative in action.help, flat
        assert spec.flag in help_text
    # the flag names that recipes, tests and users have used keep working
    for flag in ("--lr-lora", "--lr-full", "--rank", "--scale", "--lora-r", "--lora-targets", "--full-targets",
                 "--method", "--max-length", "--data-dir", "--resume", "--overwrite", "--eval-only"):
        assert flag in help_text, flag


@pytest.mark.parametrize("layout", ["sections", "flat", "flags"])
def test_every_setting_round_trips(tmp_path: Path, layout: str) -> None:
    covered = set()
    for index, values in enumerate(_values()):
        expected = {**RunConfig.from_flat().flat(), **values}
        if layout == "flags":
            cfg = _build(*_as_flags(values))
            want_source = {flat: f"flag {SETTINGS[flat].flag}" for flat, v in values.items() if v is not None}
        else:
            if layout == "sections":
                data: dict = {}
                for flat, value in values.items():
                    data.setdefault(SETTINGS[flat].section, {})[SETTINGS[flat].name] = value
            else:
                data = dict(values)
            path = tmp_path / f"run_{index}.yaml"
            path.write_text(yaml.safe_dump(data))
            cfg = _build("--config", str(path))
            want_source = {flat: f"file {path}" for flat in values}
        assert cfg.flat() == expected
        for flat, source in want_source.items():
            assert cfg.sources[flat] == source, flat
        covered |= {flat for flat, value in values.items() if value != SETTINGS[flat].default}
    assert covered == set(SETTINGS)


def test_config_yaml_is_a_run_file_that_reproduces_the_run(tmp_path: Path) -> None:
    cfg = _build("--rank", "4", "--lr-lora", "3e-4", "--tasks", "emb_color,emb_animal", "--no-export")
    ds = {"zero_optimization": {"stage": 2}, "train_batch_size": 16}
    text = config_text(cfg, resolved_config(cfg, ds, 2))
    assert "rank: 4" in text and "# flag --rank" in text and "# preset embedded" in text
    (tmp_path / "config.yaml").write_text(text)
    saved = yaml.safe_load(text)
    assert set(saved["run"]) == {"model", "data", "lora", "targets", "optimizer", "runner"}
    assert flatten_run(saved["run"]) == cfg.flat() and saved["world_size"] == 2
    again = _build("--config", str(tmp_path / "config.yaml"), "--preset", "none")
    assert again.flat() == cfg.flat()


def test_boolean_flags_take_every_form() -> None:
    assert _build("--no-export").runner.export is False
    assert _build("--export", "false").runner.export is False
    assert _build("--export=true").runner.export is True
    assert _build("--eval-only").runner.eval_only is True and _build().runner.eval_only is False
    assert _build("--resume").runner.resume == "on" and _build("--resume", "auto").runner.resume == "auto"
    assert _build("--resume", "false").runner.resume == "off"


def test_presets_are_visible_and_optional() -> None:
    embedded = _build()  # --model embedded, no data: the embedded quick run
    assert (embedded.optimizer.lr_lora, embedded.optimizer.update_gap, embedded.optimizer.shared_threshold, embedded.runner.max_steps_per_task) \
        == (1e-3, 20, 0.99, 40)
    for name in ("lr_lora", "update_gap", "shared_threshold"):
        assert embedded.sources[name].startswith("preset embedded "), name
    assert embedded.sources["max_steps_per_task"].startswith("preset embedded_quick")
    with_data = _build("--tasks", "emb_color")  # the model's preset only
    assert with_data.optimizer.lr_lora == 1e-3 and with_data.runner.max_steps_per_task is None
    plain = _build("--preset", "none")
    assert plain.flat() == RunConfig.from_flat().flat() and set(plain.sources.values()) == {"default"}
    assert _build("--model", "some/model").optimizer.lr_lora == 2e-4  # other models: no preset


def test_one_default_per_setting() -> None:
    import torch

    from gorp_ds.optim import GORP, UpdateConfig
    from gorp_ds.optim.config import OptimizerConfig

    owner = OptimizerConfig()
    group = GORP([{"params": [torch.zeros(16, 16, requires_grad=True)], "names": ["w"], "role": "full", "lr": 1.0}])
    group = group.param_groups[0]
    for name in ("rank", "update_gap", "scale", "projector", "oversample", "power_iters", "align_projector",
                 "shared_threshold", "eps", "weight_decay"):
        assert group[name] == getattr(owner, name), name
    assert group["betas"] == owner.betas and owner.scale == 0.25
    assert UpdateConfig.from_group({"role": "full", "lr": 1.0, "betas": owner.betas, "eps": owner.eps,
                                    "weight_decay": 0.0}).scale == owner.scale
    assert RunConfig.from_flat().optimizer.scale == owner.scale


def test_print_config_names_every_source(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("train_main", REPO / "launch" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    run_file = tmp_path / "run.yaml"
    run_file.write_text("optimizer:\n  lr_full: 2.0e-6\nrunner: {save_every: 7}\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = train.main(["--config", str(run_file), "--rank", "4", "--print-config"])
    assert code == 0
    lines = {line.split(":")[0].strip(): line for line in out.getvalue().splitlines() if line.startswith("  ")}
    assert len(lines) == len(SETTINGS)
    assert lines["rank"].endswith("# flag --rank") and "rank: 4" in lines["rank"]
    assert lines["lr_full"].endswith(f"# file {run_file}")
    assert lines["save_every"].endswith(f"# file {run_file}")
    assert "# preset embedded (auto" in lines["lr_lora"]  # the embedded model's preset
    assert "# preset embedded_quick" in lines["max_steps_per_task"]
    assert lines["eps"].endswith("# default")
    assert not (tmp_path / "runs").exists()


def test_fp32_works_with_the_shipped_deepspeed_config() -> None:
    import json

    from gorp_ds.cl.config import ConfigError, reconcile_ds_config
    from gorp_ds.zero import check_supported

    fp32 = json.loads((REPO / "ds_configs" / "zero2_fp32.json").read_text())
    cfg = _build("--dtype", "fp32")
    ds = reconcile_ds_config(fp32, cfg, 2, "zero2_fp32.json")
    check_supported(ds, "zero2_fp32.json")
    assert ds["bf16"] == {"enabled": False}
    with pytest.raises(ConfigError, match="zero2_fp32.json is one for fp32"):
        reconcile_ds_config(json.loads((REPO / "ds_configs" / "zero2.json").read_text()), cfg, 2, "zero2.json")
    with pytest.raises(ConfigError, match="bf16.enabled"):
        reconcile_ds_config(fp32, _build(), 2, "zero2_fp32.json")
