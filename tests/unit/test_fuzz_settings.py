"""Bad settings, run files and DeepSpeed JSON, generated: whatever the input, the checks ``gorp-ds
train`` makes before any process group starts (``gorp_ds.cli.check_before_start``: flags, run file
and presets into the typed configuration, then the DeepSpeed JSON against DeepSpeed's own model and
GORP's refusals) either accept it or print exactly one ``gorp_ds: error:`` line and return 2, never
a traceback; and a value refused as a flag is refused from a run file, naming the file's key.

All in-process (the same function the command calls, its stderr captured), so a few hundred
generated cases run in well under a minute. Hypothesis runs derandomized: CI sees the same cases on
every run. The explicit cases of the issue come first, each with a legal neighbour that passes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gorp_ds.cl.config import SETTINGS, Setting
from gorp_ds.cl.run_dir import monitor_path_problem
from gorp_ds.cli import check_before_start
from gorp_ds.resources import DS_CONFIGS

ERROR = "gorp_ds: error:"
SHIPPED = {path.name: json.loads(path.read_text()) for path in sorted(DS_CONFIGS.glob("*.json"))}
# One fixed profile for every property below: reproducible in CI, no time limit per example.
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def check(argv: list[str]) -> tuple[int, str]:
    """``check_before_start(argv)``: its status and what it printed (stdout and stderr)."""
    out = io.StringIO()
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
        status = check_before_start(argv)
    return status, out.getvalue()


def assert_one_line_or_accepted(status: int, printed: str, context: Any) -> str | None:
    """The property: 0 and no error, or 2 and exactly one ``gorp_ds: error:`` line (no traceback).
    Returns the error line's message (after the host name), or None."""
    assert "Traceback" not in printed, (context, printed)
    lines = [line for line in printed.splitlines() if line.strip()]
    if status == 0:
        assert not any(ERROR in line for line in lines), (context, printed)
        return None
    assert status == 2, (context, status, printed)
    assert len(lines) == 1 and lines[0].startswith(ERROR), (context, printed)
    return lines[0].split(": ", 3)[-1]  # "gorp_ds: error: <host>: <message>"


def refused(argv: list[str]) -> str:
    status, printed = check(argv)
    message = assert_one_line_or_accepted(status, printed, argv)
    assert message is not None, f"accepted: {argv}"
    return message


def accepted(argv: list[str]) -> None:
    status, printed = check(argv)
    assert assert_one_line_or_accepted(status, printed, argv) is None, printed


def write_ds(path: Path, config: Any) -> str:
    path.write_text(json.dumps(config))
    return str(path)


def zero2(**top: Any) -> dict[str, Any]:
    config = copy.deepcopy(SHIPPED["zero2.json"])
    config.update(top)
    return config


def with_zero(**zero: Any) -> dict[str, Any]:
    config = zero2()
    config["zero_optimization"].update(zero)
    return config


# ------------------------------------------------------------------ the DeepSpeed JSON cases
# name -> (config, what the one line must say: the dotted key and the allowed values or the fix)
DS_CASES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "offload_optimizer_text": (with_zero(offload_optimizer="cpu"),
                               ("'zero_optimization.offload_optimizer' offloads to 'cpu'",
                                "remove zero_optimization.offload_optimizer")),
    "reduce_bucket_size_negative": (with_zero(reduce_bucket_size=-1),
                                    ("'zero_optimization.reduce_bucket_size' is -1", "greater than 0")),
    "reduce_bucket_size_text": (with_zero(reduce_bucket_size="big"),
                                ("'zero_optimization.reduce_bucket_size' is 'big'", "valid integer")),
    "gradient_clipping_text": (zero2(gradient_clipping="x"), ("'gradient_clipping' is 'x'", "finite number >= 0")),
    "hpz_text": ({**zero2(), "zero_optimization": {**SHIPPED["zero3.json"]["zero_optimization"],
                                                   "zero_hpz_partition_size": "x"}},
                 ("'zero_optimization.zero_hpz_partition_size' is 'x'", "valid integer")),
    "steps_per_print_zero": (zero2(steps_per_print=0), ("'steps_per_print' is 0", "an integer >= 1")),
    "amp": (zero2(amp={"enabled": True}), ("'amp'", "AMP integration has been removed")),
    "predivide_with_prescale": (zero2(gradient_predivide_factor=2.0, prescale_gradients=True),
                                ("'prescale_gradients' is true", "remove prescale_gradients")),
    "predivide_alone": (zero2(gradient_predivide_factor=2.0),
                        ("'gradient_predivide_factor' is 2.0", "remove gradient_predivide_factor")),
    "unknown_zero_key": (with_zero(reduce_bucket_sise=5), ("'zero_optimization.reduce_bucket_sise' is not a "
                                                           "DeepSpeed setting", "did you mean 'reduce_bucket_size'")),
    "top_level_typo": (zero2(gradient_cliping=1.0), ("'gradient_cliping' is not a DeepSpeed setting",
                                                     "did you mean 'gradient_clipping'")),
    "bf16_enabled_text": (zero2(bf16={"enabled": "false"}), ("'bf16.enabled' is 'false'", "true or false")),
    "offload_pin_memory_text": (with_zero(offload_optimizer={"device": "none", "pin_memory": "x"}),
                                ("'zero_optimization.offload_optimizer.pin_memory' is 'x'", "valid boolean")),
    "tensorboard_path_number": (zero2(tensorboard={"enabled": True, "output_path": 5}),
                                ("'tensorboard.output_path' is 5", "valid string")),
    "wall_clock_text": (zero2(wall_clock_breakdown="x"), ("'wall_clock_breakdown' is 'x'", "true or false")),
    "train_batch_size_text": (zero2(train_batch_size="x"), ("'train_batch_size' is 'x'", "integer >= 1 or \"auto\"")),
    "checkpoint_not_an_object": (zero2(checkpoint=5), ("'checkpoint' is 5", "DeepSpeed cannot read")),
    "bucket_beyond_int64": (with_zero(reduce_bucket_size=2**70), ("'zero_optimization.reduce_bucket_size' is "
                                                                  f"{2**70}, beyond a 64-bit integer",)),
}
# Legal neighbours: each passes.
DS_NEIGHBOURS = {
    "steps_per_print_one": zero2(steps_per_print=1),
    "steps_per_print_null": zero2(steps_per_print=None),
    "reduce_bucket_size_one": with_zero(reduce_bucket_size=1),
    "reduce_bucket_size_int64": with_zero(reduce_bucket_size=2**63 - 1),
    "offload_none": with_zero(offload_optimizer={"device": "none"}),
    "predivide_one": zero2(gradient_predivide_factor=1.0, prescale_gradients=False),
    "batch_auto": zero2(train_batch_size="auto"),
    "a_key_deepspeed_ignores": zero2(my_notes="anything"),
    **{f"shipped_{name}": config for name, config in SHIPPED.items()},
}


@pytest.mark.parametrize("name", list(DS_CASES))
def test_a_bad_deepspeed_json_is_one_line_naming_file_key_and_allowed_values(name: str, tmp_path: Path) -> None:
    config, needles = DS_CASES[name]
    path = write_ds(tmp_path / f"{name}.json", config)
    message = refused(["--preset", "none", "--ds_config", path])
    assert message.startswith(f"{path}: "), message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize("name", list(DS_NEIGHBOURS))
def test_a_legal_neighbour_passes(name: str, tmp_path: Path) -> None:
    dtype = ["--dtype", "fp32"] if name == "shipped_zero2_fp32.json" else []
    accepted(["--preset", "none", *dtype, "--ds_config", write_ds(tmp_path / "ds.json", DS_NEIGHBOURS[name])])


@pytest.mark.parametrize("where", ["ds_config", "yaml", "json"])
def test_non_utf8_bytes_name_the_file(where: str, tmp_path: Path) -> None:
    if where == "ds_config":
        path = tmp_path / "ds.json"
        path.write_bytes(json.dumps(zero2()).encode()[:-1] + b', "x": "\xff\xfe"}')
        argv = ["--preset", "none", "--ds_config", str(path)]
    else:
        path = tmp_path / f"run.{where}"
        path.write_bytes(b"max_steps_per_task: 3\n# caf\xe9\n" if where == "yaml" else b'{"output_dir": "caf\xe9"}')
        argv = ["--preset", "none", "--config", str(path)]
    message = refused(argv)
    assert str(path) in message and "not UTF-8 text (byte 0x" in message and "save it as UTF-8" in message, message


def test_the_deepspeed_json_is_checked_before_any_process_group(tmp_path: Path) -> None:
    """No process group exists in this process; the check still runs (and refuses)."""
    import torch.distributed as dist

    path = write_ds(tmp_path / "ds.json", with_zero(reduce_bucket_size=-1))
    assert refused(["--preset", "none", "--ds_config", path])
    assert not dist.is_initialized()


def test_a_missing_deepspeed_json_is_left_to_the_agreed_checks(tmp_path: Path) -> None:
    """A file this node cannot see may exist on another: reported after the group starts, where every
    rank learns of it (gorp_ds.cl.agree), not here."""
    accepted(["--preset", "none", "--ds_config", str(tmp_path / "elsewhere.json")])


@pytest.mark.parametrize("depth", [100, 900])
def test_json_nested_too_deep_is_one_line(depth: int, tmp_path: Path) -> None:
    """Found while building: JSON that json loads (under ~990 levels) ran Python's copy and repr out
    of stack (a RecursionError traceback). Deeper still, json's own limit answers, in one line too."""
    nested = "[" * depth + "]" * depth
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(zero2())[:-1] + f', "x": {nested}}}')
    too_deep = ("nested deeper than 32 levels", "maximum recursion depth")
    assert any(text in refused(["--preset", "none", "--ds_config", str(ds)]) for text in too_deep)
    run = tmp_path / "run.json"
    run.write_text(f'{{"methods": {nested}}}')
    assert any(text in refused(["--preset", "none", "--config", str(run)]) for text in too_deep)


def test_duplicate_keys_are_refused_in_deepspeed_json_and_run_files(tmp_path: Path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2, "stage": 3}, "bf16": {"enabled": true}}')
    assert "key 'stage' is given twice in one object" in refused(["--preset", "none", "--ds_config", str(ds)])
    run = tmp_path / "run.yaml"
    run.write_text("max_steps_per_task: 3\nmax_steps_per_task: 4\n")
    assert refused(["--preset", "none", "--config", str(run)]) == \
        f"--config {run}: key 'max_steps_per_task' is given twice in one mapping; keep one"


def test_a_tensorboard_path_under_a_regular_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    ds = zero2(tensorboard={"enabled": True, "output_path": str(tmp_path / "afile" / "tb")})
    problem = monitor_path_problem(ds, "ds.json")
    assert problem == (f"ds.json: 'tensorboard.output_path' {tmp_path / 'afile' / 'tb'}: {tmp_path / 'afile'} is a "
                       "file, so no directory can be made under it; choose another path")
    assert monitor_path_problem(zero2(tensorboard={"enabled": True, "output_path": str(tmp_path / "tb")}), "x") is None
    assert monitor_path_problem(zero2(tensorboard={"enabled": False, "output_path": str(tmp_path / "afile")}), "x") \
        is None


def test_a_key_with_a_line_break_stays_on_the_one_line(tmp_path: Path) -> None:
    """Found by the property below: a DeepSpeed key "\\x85" (NEL, a line break to str.splitlines)
    was quoted raw and made the error two lines."""
    path = write_ds(tmp_path / "ds.json", with_zero(**{"\x85": None}))
    assert "'zero_optimization.\\x85' is not a DeepSpeed setting" in refused(["--preset", "none", "--ds_config", path])
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"max_steps_per_task": 2, "a\nb": 1}))
    assert "unknown setting 'a\\nb'" in refused(["--preset", "none", "--config", str(run)])


# ------------------------------------------------------------------ the run-file and flag cases
@pytest.mark.parametrize("text, needle", [
    ("preset: 5\n", "preset must be a preset name or a list of names"),
    ("preset: [5]\n", "preset must be a preset name or a list of names"),
    ("preset: no_such_preset\n", "preset no_such_preset: no such preset"),
    ("max_steps_per_task: -5\n", "max_steps_per_task must be >= 1, got -5"),
    ("runner: {max_steps_per_task: -5}\n", "runner.max_steps_per_task must be >= 1, got -5"),
    ("runner: [1]\n", "section 'runner' must be a mapping of its settings"),
    ("resume: {}\n", "resume must be one of off, on, auto, got '{}'"),  # found by the property: str.format of '{}'
    ("resume:\n  ? ''\n  : null\n", "resume must be one of off, on, auto, got \"{'': none}\""),
    ("seed: 1180591620717411303424\n", "seed must be <= 4294967295"),
])
def test_a_bad_run_file_names_the_file_and_key(text: str, needle: str, tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text(text)
    message = refused(["--config", str(run)])
    assert message.startswith(f"--config {run}: ") and needle in message, message


@pytest.mark.parametrize("flag, value, needle", [
    ("--refresh-memory-mib", "1e308", "--refresh-memory-mib must be <= 1e+12"),  # was int(inf) at engine build
    ("--seed", str(2**70), "--seed must be <= 4294967295"),
])
def test_numbers_beyond_what_torch_holds_are_refused_naming_the_flag(flag: str, value: str, needle: str,
                                                                     tmp_path: Path) -> None:
    assert refused(["--preset", "none", flag, value]).startswith(needle)
    run = tmp_path / "run.yaml"
    run.write_text(f"{flag[2:].replace('-', '_')}: {value}\n")
    assert refused(["--preset", "none", "--config", str(run)]).startswith(f"--config {run}: " + needle[2:].replace(
        "-", "_"))


def test_a_huge_lora_rank_is_refused_before_the_adapters_are_built(tiny_model_dir: Path, tmp_path: Path) -> None:
    """2**62 overflowed the (meta) adapter's size inside PEFT before the rank was compared with the
    model (a RuntimeError traceback)."""
    import argparse

    from gorp_ds.cl.command_line import add_arguments, build_run_config
    from gorp_ds.cl.preflight import preflight
    from gorp_ds.models import RoleError

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    run = tmp_path / "run.yaml"
    run.write_text(f"lora: {{r: {2**62}}}\n")
    for argv, written in ((["--lora-r", str(2**62)], "--lora-r"), (["--config", str(run)], f"--config {run}: lora.r")):
        cfg = build_run_config(parser.parse_args(["--preset", "none", "--model", str(tiny_model_dir), *argv]))
        with pytest.raises(RoleError) as err:
            preflight(cfg)
        assert str(err.value) == f"{written} {2**62} is larger than the model's hidden size 32"


def test_an_empty_section_sets_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("runner:\n  # max_steps_per_task: 3\n")
    accepted(["--preset", "none", "--config", str(run)])


# ------------------------------------------------------------------ generated values, every setting
def _text_of(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(value)
    return repr(value) if isinstance(value, float) else str(value)


NAMES = st.text(alphabet="abcdefgh_-.", min_size=1, max_size=8).filter(lambda t: t.strip(" .-"))
VALUES = st.one_of(
    st.integers(-10, 10), st.integers(-2**70, 2**70), st.sampled_from([0, 1, 2**31, 2**32, 2**63, 2**64, -2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1e-8, 1e308, -0.0, 2.5, 1e12]),
    st.booleans(), st.sampled_from(["", " ", "none", "null", "auto", "on", "yes", "maybe", "1e3", "0x10", "½"]),
    st.lists(NAMES, min_size=1, max_size=3), NAMES,
)


def _choice_or_value(spec: Setting) -> st.SearchStrategy[Any]:
    if spec.choices:
        pick = st.sampled_from([str(c) for c in spec.choices])
        return st.one_of(VALUES, pick, st.lists(pick, min_size=1, max_size=2, unique=True))
    return VALUES


@st.composite
def setting_and_value(draw: Any) -> tuple[Setting, Any]:
    spec = draw(st.sampled_from(sorted(SETTINGS.values(), key=lambda s: s.flat)))
    return spec, draw(_choice_or_value(spec))


def _verdict(argv: list[str]) -> tuple[int, str | None]:
    status, printed = check(["--preset", "none", *argv])
    return status, assert_one_line_or_accepted(status, printed, argv)


@settings(FUZZ, max_examples=200)
@given(case=setting_and_value())
def test_a_generated_value_is_refused_in_one_line_or_accepted_the_same_as_flag_and_file(case, tmp_path: Path) -> None:
    spec, value = case
    if spec.flat == "eval_only":
        value = False  # an eval-only run reads --model as an export; its checks are the same otherwise
    text = _text_of(value)
    flag = _verdict([f"{spec.flag}={text}"])
    # The same value from a run file, typed as YAML types it (int, float, bool, list, text), by
    # section and flat; and as the text the flag was given.
    run = tmp_path / "run.yaml"
    verdicts = {}
    for name, content in (("section", {spec.section: {spec.name: value}}), ("flat", {spec.flat: value}),
                          ("text", {spec.flat: text})):
        run.write_text(yaml.safe_dump(content))  # nan and inf as .nan and .inf
        verdicts[name] = _verdict(["--config", str(run)])
        if verdicts[name][1] is not None:
            written = f"{spec.section}.{spec.name}" if name == "section" else spec.flat
            assert verdicts[name][1].startswith(f"--config {run}: "), verdicts[name]
            assert written in verdicts[name][1] or "given twice" in verdicts[name][1], verdicts[name]
    # The text is what the flag was given: the same verdict. A typed value refused as a flag is
    # refused from the file; the file may refuse more only where YAML typed it as something the
    # setting does not take (a YAML boolean for a number, name or list; a number for a list of names;
    # a list for a single value, which the flag's text "a,b" would be).
    assert verdicts["text"][0] == flag[0], (spec.flat, value, flag, verdicts)
    for name in ("section", "flat"):
        if flag[0] == 2:
            assert verdicts[name][0] == 2, (spec.flat, value, name, flag, verdicts)
        elif verdicts[name][0] == 2:
            stricter = (isinstance(value, bool) and spec.kind is not bool) or \
                (spec.kind is list and not isinstance(value, (str, list))) or \
                (isinstance(value, list) and spec.kind is not list)
            assert stricter, (spec.flat, value, name, flag, verdicts)


# ------------------------------------------------------------------ generated run files
JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)
RUN_KEYS = st.one_of(st.sampled_from(sorted(SETTINGS)), st.sampled_from(["model", "data", "lora", "targets",
                                                                        "optimizer", "runner", "preset", "run"]),
                     st.sampled_from([s.flat.replace("_", "-") for s in SETTINGS.values()]), st.text(max_size=8))


@st.composite
def run_files(draw: Any) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["yaml", "json", "bytes"]))
    content = draw(st.dictionaries(RUN_KEYS, st.one_of(JSONISH, _section_values()), max_size=4))
    if kind == "json":
        return "json", json.dumps(content).encode()
    if kind == "yaml":
        return "yaml", yaml.safe_dump(content, allow_unicode=draw(st.booleans())).encode()
    raw = yaml.safe_dump(content).encode()
    cut = draw(st.integers(0, len(raw)))
    return draw(st.sampled_from(["yaml", "json"])), raw[:cut] + draw(st.binary(min_size=1, max_size=6)) + raw[cut:]


def _section_values() -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(sorted({s.name for s in SETTINGS.values()})), JSONISH, max_size=3)


@settings(FUZZ, max_examples=150)
@given(case=run_files())
def test_a_generated_run_file_is_refused_in_one_line_or_accepted(case, tmp_path: Path) -> None:
    suffix, data = case
    run = tmp_path / f"run.{suffix}"
    run.write_bytes(data)
    status, printed = check(["--config", str(run)])
    message = assert_one_line_or_accepted(status, printed, data)
    if message is not None and not message.startswith("--preset"):
        assert str(run) in message or message.startswith("preset "), message


# ------------------------------------------------------------------ generated DeepSpeed JSON
def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    return found


def _get(node: Any, path: tuple) -> Any:
    for key in path:
        node = node[key]
    return node


DS_KEYS = ["stage", "reduce_bucket_size", "offload_optimizer", "offload_param", "overlap_comm", "enabled",
           "gradient_clipping", "steps_per_print", "zero_optimization", "bf16", "fp16", "tensorboard", "output_path",
           "prescale_gradients", "gradient_predivide_factor", "train_batch_size", "amp", "device", "wandb",
           "zero_hpz_partition_size", "communication_data_type", "log_level", "scheduler", "optimizer"]


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@st.composite
def ds_configs(draw: Any) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(SHIPPED)))
    config = copy.deepcopy(SHIPPED[name])
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(config)
        op = draw(st.sampled_from(["drop", "retype", "add", "move", "wrap"]))
        if op == "add" or not paths:
            parent = draw(st.sampled_from([(), *[p for p in paths if isinstance(_get(config, p), dict)]]))
            _get(config, parent)[draw(st.one_of(st.sampled_from(DS_KEYS), st.text(max_size=10)))] = draw(JSONISH)
            continue
        path = draw(st.sampled_from(paths))
        parent, key = _get(config, path[:-1]), path[-1]
        if op == "drop":
            del parent[key]
        elif op == "retype":
            parent[key] = draw(st.one_of(JSONISH, st.sampled_from([-1, 0, 2**70, 1e308, math.nan, math.inf, "x",
                                                                   "", [], {}, True, "cpu", "none"]),
                                         st.integers(-10, 10), st.integers(1, 500).map(_nested)))
        elif op == "move":  # wrong nesting: a nested key at the top, or a top-level key inside a section
            value = parent.pop(key)
            target = config if path[:-1] else config.setdefault("zero_optimization", {})
            if isinstance(target, dict):
                target[key] = value
        else:
            parent[key] = [parent[key]]
    text = json.dumps(config, allow_nan=True).encode()
    if draw(st.integers(0, 9)) == 0:  # bytes: invalid UTF-8 or a truncated file
        cut = draw(st.integers(0, len(text)))
        text = draw(st.sampled_from([text[:cut] + b"\xff" + text[cut:], text[:cut]]))
    return name, text


@settings(FUZZ, max_examples=250)
@given(case=ds_configs())
def test_a_mutated_deepspeed_json_is_refused_in_one_line_or_accepted(case, tmp_path: Path) -> None:
    name, data = case
    path = tmp_path / "ds.json"
    path.write_bytes(data)
    dtype = ["--dtype", "fp32"] if name == "zero2_fp32.json" else []
    status, printed = check(["--preset", "none", *dtype, "--ds_config", str(path)])
    message = assert_one_line_or_accepted(status, printed, data)
    if message is not None:
        assert message.startswith((f"{path}: ", f"DeepSpeed config {path}: ")), message
