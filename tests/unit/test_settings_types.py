"""Every run setting, generated: the value that reaches its component's config has the declared type,
a wrong value fails where the configuration is built and names the flag or run-file key, and the
resume policy that run_dir applies is the one declared on the field."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gorp_ds.cl.command_line import add_arguments, build_run_config
from gorp_ds.cl.config import SECTIONS, SETTINGS, ConfigError, RunConfig, Setting
from gorp_ds.cl.run_dir import FIXED_ON_RESUME, NICETIES, NOT_COMPARED, compare
from gorp_ds.settings import RESUME_POLICIES


def _parse(argv: list[str]) -> RunConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return build_run_config(parser.parse_args(["--preset", "none", *argv]))


def _owner_field(spec: Setting) -> dataclasses.Field:
    cls = SECTIONS[spec.section][1]
    return next(f for f in dataclasses.fields(cls) if f.name == spec.name)


def _declared(spec: Setting) -> type:
    hint = typing.get_type_hints(SECTIONS[spec.section][1])[spec.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args and typing.get_origin(hint) is not list else hint
    return list if typing.get_origin(base) is list else base


def _section(cfg: RunConfig, spec: Setting) -> object:
    return getattr(getattr(cfg, SECTIONS[spec.section][0]), spec.name)


def _valid_text(spec: Setting) -> st.SearchStrategy[str]:
    """Text a user could type for the setting, within its declared checks."""
    meta = _owner_field(spec).metadata
    if spec.kind is bool:
        return st.sampled_from(["true", "false", "yes", "no", "1", "0"])
    if spec.choices:
        pick = st.sampled_from([str(c) for c in spec.choices])
        return st.lists(pick, min_size=1, max_size=2, unique=True).map(",".join) if spec.kind is list else pick
    low = meta["minimum"] if meta["minimum"] is not None else (meta["above"] if meta["above"] is not None else 0)
    high = meta["maximum"] if meta["maximum"] is not None else 1000
    if spec.kind is int:
        return st.integers(int(low) + (1 if meta["above"] is not None else 0), int(min(high, 1000))).map(str)
    if spec.kind is float:
        return st.floats(float(low), float(high), exclude_min=meta["above"] is not None,
                         allow_nan=False).filter(lambda x: x != 0 or meta["above"] is None).map(repr)
    return st.none()  # strings and lists of names: not generated (their values are checked against files)


NUMERIC = [s for s in SETTINGS.values() if s.kind in (int, float, bool) or (s.choices and s.kind is not list)]


@pytest.mark.parametrize("spec", NUMERIC, ids=lambda s: s.flat)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_valid_value_reaches_its_component_with_the_declared_type(spec: Setting, data) -> None:
    text = data.draw(_valid_text(spec))
    extra = ["--resume", "off"] if spec.flat == "overwrite" else []
    try:
        cfg = _parse([f"{spec.flag}={text}", *extra])
    except ConfigError as err:  # a value valid alone may contradict another setting's default
        assert spec.flag in str(err), err
        return
    value = _section(cfg, spec)
    declared = _declared(spec)
    assert type(value) is declared or (declared is float and type(value) is float), (spec.flat, value)
    if declared in (int, float):
        assert value == declared(text)


def _wrong_text(spec: Setting) -> st.SearchStrategy[str]:
    if spec.kind is bool:
        return st.sampled_from(["maybe", "2", "truthy", "nope"])
    if spec.kind is int:
        return st.one_of(st.sampled_from(["1.5", "abc", "1e3x", "[1]"]),
                         st.text(alphabet="xyz!", min_size=1, max_size=4))
    if spec.kind is float:
        return st.one_of(st.sampled_from(["abc", "1,5", "nan", "inf", "-inf"]), st.text(alphabet="xyz", min_size=1))
    return st.text(alphabet="qwxz", min_size=1, max_size=5).filter(lambda t: t not in map(str, spec.choices or ()))


WRONG = [s for s in SETTINGS.values() if s.kind in (int, float, bool) or (s.choices and s.kind is not list)]


@pytest.mark.parametrize("spec", WRONG, ids=lambda s: s.flat)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_a_wrong_value_fails_where_the_config_is_built_naming_the_flag(spec: Setting, data) -> None:
    text = data.draw(_wrong_text(spec))
    with pytest.raises(ConfigError) as err:
        _parse([f"{spec.flag}={text}"])
    assert spec.flag in str(err.value), (spec.flat, text, str(err.value))


@pytest.mark.parametrize("spec", WRONG, ids=lambda s: s.flat)
def test_a_wrong_value_in_a_run_file_names_the_file_and_key(spec: Setting, tmp_path: Path) -> None:
    bad = {bool: "maybe", int: "1.5", float: "abc"}.get(spec.kind, "not-a-choice")
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps({spec.section: {spec.name: bad}}))
    with pytest.raises(ConfigError) as err:
        _parse(["--config", str(run_file)])
    assert f"--config {run_file}: {spec.section}.{spec.name}" in str(err.value), str(err.value)


# ------------------------------------------------------------------------------ resume policy
def test_every_setting_declares_a_resume_policy_that_run_dir_applies() -> None:
    for spec in SETTINGS.values():
        assert spec.on_resume in RESUME_POLICIES, spec
    assert set(FIXED_ON_RESUME) == {f for f, s in SETTINGS.items() if s.on_resume == "fixed"}
    assert set(NOT_COMPARED) == {f for f, s in SETTINGS.items() if s.on_resume == "launch"}
    assert set(NICETIES) - {"world_size"} == {f for f, s in SETTINGS.items() if s.on_resume == "ignored"}


@pytest.mark.parametrize("spec", list(SETTINGS.values()), ids=lambda s: s.flat)
def test_a_changed_setting_is_refused_or_recorded_as_its_field_declares(spec: Setting) -> None:
    saved = {flat: ["x"] if s.kind is list else 1 for flat, s in SETTINGS.items()}
    current = {**saved, spec.flat: ["y"] if spec.kind is list else 2}
    refused, changed = compare(saved, current)
    if spec.on_resume == "fixed":
        assert refused == [f"{spec.flat}: saved {saved[spec.flat]!r}, this run {current[spec.flat]!r}"]
    elif spec.on_resume == "launch":
        assert refused == [] and changed == []
    else:
        assert refused == [] and changed == [(spec.flat, saved[spec.flat], current[spec.flat])]


# --------------------------------------------------- the optimizer's settings at their consumer
# Each OptimizerConfig setting and the UpdateConfig field (gorp_ds/optim/param_group.py) of the
# group that consumes it: what GORP's step reads, parsed once per group.
CONSUMED = {"rank": ("full", "rank"), "update_gap": ("full", "update_gap"), "scale": ("full", "scale"),
            "projector": ("full", "projector"), "oversample": ("full", "oversample"),
            "power_iters": ("full", "power_iters"), "align_projector": ("full", "align_projector"),
            "refresh_schedule": ("full", "refresh_schedule"),
            "shared_threshold": ("full", "shared_threshold"), "lr_lora": ("lora_a", "lr"), "lr_full": ("full", "lr"),
            "beta1": ("lora_b", "beta1"), "beta2": ("full", "beta2"), "eps": ("lora_a", "eps"),
            "weight_decay": ("full", "weight_decay")}


# The learning-rate schedule's settings: consumed by the run's Schedule (gorp_ds/cl/lr_schedule.py).
SCHEDULE = {"lr_schedule": "kind", "lr_warmup_steps": "warmup_steps", "lr_warmup_ratio": "warmup_ratio",
            "lr_min_ratio": "min_ratio", "lr_schedule_scope": "scope", "lr_schedule_roles": "roles",
            "lr_later_ratio": "later_ratio"}


def test_every_optimizer_setting_has_a_consumer() -> None:
    optimizer = {flat for flat, spec in SETTINGS.items() if spec.section == "optimizer"}
    assert optimizer - {"lr_plain"} - set(SCHEDULE) == set(CONSUMED), optimizer ^ set(CONSUMED) ^ set(SCHEDULE)


@pytest.mark.parametrize("flat", sorted(SCHEDULE))
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_a_schedule_setting_reaches_the_schedule_with_its_type_and_value(flat: str, data) -> None:
    from gorp_ds.cl.lr_schedule import build_schedule

    spec = SETTINGS[flat]
    text = data.draw(_valid_text(spec))
    cfg = _parse([f"--{flat.replace('_', '-')}", text])
    value = getattr(build_schedule(cfg, [4, 5]), SCHEDULE[flat])
    value = list(value) if isinstance(value, tuple) else value  # the roles: a tuple in the frozen Schedule
    assert type(value) is _declared(spec) and value == _section(cfg, spec)


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    from gorp_ds.models import LoraSettings, add_lora, load_model_and_tokenizer
    from gorp_ds.models.loading import ModelConfig
    from tests.support.tiny_model import make_tiny_model_dir

    directory = make_tiny_model_dir(tmp_path_factory.mktemp("consumer"))
    model, _ = load_model_and_tokenizer(ModelConfig(model=str(directory), dtype="fp32", gradient_checkpointing=False))
    return add_lora(model, LoraSettings(r=2))


@pytest.mark.parametrize("flat", sorted(CONSUMED))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_an_optimizer_setting_reaches_the_step_with_its_type_and_value(flat: str, lora_model, data) -> None:
    from gorp_ds.models import build_param_groups
    from gorp_ds.optim import GORP

    spec = SETTINGS[flat]
    text = data.draw(_valid_text(spec))
    if flat == "rank":  # the tiny model's gate_proj is 72 × 32: a rank above 32 is refused at build
        text = str(min(int(text), 32))
    try:
        cfg = _parse([f"{spec.flag}={text}"])
    except ConfigError as err:  # within the declared bounds but refused by a section check (beta1 1.0)
        assert spec.flag in str(err), err
        return
    optimizer = GORP(build_param_groups(lora_model, "gorp", cfg.targets, cfg.optimizer))
    role, field = CONSUMED[flat]
    group = next(g for g in optimizer.param_groups if g["role"] == role)
    consumed = getattr(optimizer.group_config(group), field)
    declared = _declared(spec)
    assert type(consumed) is declared, (flat, type(consumed))
    assert consumed == _section(cfg, spec), (flat, consumed)
