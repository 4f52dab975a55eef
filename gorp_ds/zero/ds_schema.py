"""The DeepSpeed JSON checked against DeepSpeed's own configuration model, before any process group.

DeepSpeed checks its JSON only when ``deepspeed.initialize`` builds the engine: after the model is
loaded, and a wrong value surfaces there as a pydantic or assertion traceback (``"offload_optimizer":
"cpu"``, ``"reduce_bucket_size": -1``) or not at all until it breaks a step (``"steps_per_print": 0``
is a modulo by zero at the first step). Here DeepSpeed's own ``DeepSpeedConfig`` (the pydantic
models of every section: ``DeepSpeedZeroConfig``, the precision and monitor configs, ...) is built
from the dict alone: without a process group DeepSpeed assumes one rank, so the batch sizes are
left to :func:`gorp_ds.cl.config.reconcile_ds_config` and replaced by neutral ones. What it refuses
becomes one line naming the file, the key's dotted path and the allowed values or type.

The top-level values DeepSpeed reads without any check (:data:`SCALARS`) are checked here against
the type it uses them as. This module and the distributors are the only code that imports below
``deepspeed`` (docs/architecture.md).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import math
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel, ValidationError

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _bool(value: Any) -> bool:
    return isinstance(value, bool)


def _positive_int_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda value: value is None or (isinstance(value, str) and value.lower() in choices)


@dataclasses.dataclass(frozen=True)
class Scalar:
    """A top-level value DeepSpeed reads with ``dict.get`` and uses without a check."""

    valid: Callable[[Any], bool]
    allowed: str


# Each is used as written: a string "false" is truthy in `if`, "x" fails `|` at engine build, and
# steps_per_print 0 is a modulo by zero at the first optimizer step.
SCALARS: dict[str, Scalar] = {
    "steps_per_print": Scalar(_positive_int_or_null, "an integer >= 1 (steps between DeepSpeed's progress lines)"),
    "gradient_predivide_factor": Scalar(_positive_number, "a finite number > 0"),
    "vocabulary_size": Scalar(_positive_int_or_null, "an integer >= 1"),
    "communication_data_type": Scalar(_one_of("fp16", "bf16", "fp32"), "one of fp16, bf16, fp32"),
    "seq_parallel_communication_data_type": Scalar(_one_of("fp16", "bf16", "fp32"), "one of fp16, bf16, fp32"),
    "log_level": Scalar(_one_of("debug", "info", "warning", "error", "critical"),
                        "one of debug, info, warning, error, critical"),
    **{name: Scalar(_bool, "true or false") for name in (
        "prescale_gradients", "wall_clock_breakdown", "memory_breakdown", "dump_state", "disable_allgather",
        "disable_python_gc", "dataloader_drop_last", "managed_gradient_accumulation",
        "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "use_data_before_expert_parallelism")},
}


def _key(path: str) -> str:
    """A key as the message quotes it: ``'a.b'``, or Python's escaped form when it holds characters
    that do not print (a line break, a control character)."""
    return f"'{path}'" if path.isprintable() else repr(path)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


INT64_MAX = 2**63 - 1  # sizes and counts become torch int64 (and C long) values


def _huge_integers(node: Any, path: str = "") -> Iterator[tuple[str, int]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _huge_integers(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _huge_integers(value, f"{path}[{index}]")
    elif isinstance(node, int) and not isinstance(node, bool) and abs(node) > INT64_MAX:
        yield path, node


def check_scalars(config: dict[str, Any], fail: Callable[[str], Exception]) -> None:
    """The unchecked top-level values (:data:`SCALARS`), the batch sizes, each of its type, and
    integers torch can hold (DeepSpeed's model takes any size of integer for a bucket size)."""
    huge = next(_huge_integers(config), None)
    if huge is not None:
        raise fail(f"{_key(huge[0])} is {huge[1]}, beyond a 64-bit integer; use at most {INT64_MAX}")
    for name, scalar in SCALARS.items():
        if name in config and not scalar.valid(config[name]):
            raise fail(f"'{name}' is {_short(config[name])}; use {scalar.allowed}")
    for name in BATCH_KEYS:
        value = config.get(name)
        if value is not None and value != "auto" and not _positive_int_or_null(value):
            raise fail(f"'{name}' is {_short(value)}; use an integer >= 1 or \"auto\", or leave it out (the run's "
                       "--global-batch-size and --micro-batch-size fill it in)")


@contextmanager
def _quiet(name: str = "DeepSpeed") -> Iterator[None]:
    """DeepSpeed logs its world size and deprecations as it parses; the engine logs them again."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# What building DeepSpeed's config raises for a wrong value: pydantic's ValidationError is a
# ValueError; DeepSpeed's own checks raise DeepSpeedConfigError, ValueError or AssertionError, and a
# value of the wrong type breaks its readers with TypeError, AttributeError or KeyError.
_REFUSALS = (ValueError, TypeError, AttributeError, KeyError, IndexError, AssertionError, OverflowError)


class _Reads(dict):
    """The top-level dict handed to DeepSpeed, noting each key DeepSpeed looks up (``copy.copy``
    keeps the same ``seen`` set)."""

    seen: set[str]

    def get(self, key: Any, default: Any = None) -> Any:
        self.seen.add(key)
        return dict.get(self, key, default)

    def __getitem__(self, key: Any) -> Any:
        self.seen.add(key)
        return dict.__getitem__(self, key)

    def __contains__(self, key: Any) -> bool:
        self.seen.add(key)
        return dict.__contains__(self, key)

    def keys(self) -> Any:  # `key in config.keys()` is a lookup too
        owner = self

        class Keys:
            def __contains__(self, key: Any) -> bool:
                return key in owner

            def __iter__(self) -> Iterator[Any]:
                return iter(dict.keys(owner))

        return Keys()


def _build(config: dict[str, Any]) -> set[str]:
    """Build DeepSpeed's config from ``config``; the top-level keys it looked up."""
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError

    probe = _Reads(copy.deepcopy({k: v for k, v in config.items() if k not in BATCH_KEYS}))
    probe.seen = set()
    probe.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)  # train_batch_size follows
    try:
        with _quiet():
            DeepSpeedConfig(probe)
    except DeepSpeedConfigError as err:  # a plain Exception subclass
        raise ValueError(str(err)) from err
    return probe.seen


def _refusal(config: dict[str, Any]) -> Exception | set[str]:
    try:
        return _build(config)
    except _REFUSALS as err:
        return err


def validate_with_deepspeed(config: dict[str, Any], fail: Callable[[str], Exception]) -> None:
    """Build DeepSpeed's ``DeepSpeedConfig`` from ``config``; what it refuses raises ``fail(message)``
    with the key's dotted path and the allowed values (``fail`` adds the file). A top-level key
    DeepSpeed never looks up is ignored by DeepSpeed; one spelled like a key it reads is a typo
    (``gradient_cliping`` would leave clipping off) and refused."""
    error = _refusal(config)
    if isinstance(error, set):
        for key in config:
            close = difflib.get_close_matches(str(key), sorted(error), n=1, cutoff=0.85)
            if key not in error and close:
                raise fail(f"{_key(str(key))} is not a DeepSpeed setting (DeepSpeed would ignore it); did you mean "
                           f"'{close[0]}'? correct its name or remove it")
        return
    culprit = _culprit(config, error)
    if isinstance(error, ValidationError):
        raise fail(_describe_validation(error, culprit)) from None
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if culprit is None:
        raise fail(f"DeepSpeed refuses this configuration: {detail}")
    value = config[culprit]
    if isinstance(error, (AttributeError, TypeError, KeyError)):  # DeepSpeed's reader broke on the value
        shape = "" if isinstance(value, dict) else "; DeepSpeed reads it as an object" \
            if isinstance(error, AttributeError) and "has no attribute" in detail else ""
        raise fail(f"{_key(culprit)} is {_short(value)}, which DeepSpeed cannot read ({type(error).__name__}: "
                   f"{detail}){shape}; fix its type (see DeepSpeed's configuration documentation) or remove it")
    raise fail(f"{_key(culprit)}: DeepSpeed refuses it: {detail}")


def _culprit(config: dict[str, Any], error: Exception) -> str | None:
    """The top-level key whose removal makes DeepSpeed's error go away (or change): the section the
    error is about (pydantic's locations start inside the section's own model)."""
    for key in config:
        if key in BATCH_KEYS:
            continue
        other = _refusal({k: v for k, v in config.items() if k != key})
        if isinstance(other, set) or str(other) != str(error):
            return key
    return None


def _describe_validation(error: ValidationError, section: str | None) -> str:
    first = error.errors()[0]
    loc = tuple(str(part) for part in first["loc"])
    inner = loc if section is None or loc[:1] == (section,) else (section, *loc)
    path = ".".join(inner) or (section or "?")
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    kind, message = first["type"], first["msg"]
    model = _model_at(error.title, tuple(str(p) for p in first["loc"]))
    if kind == "extra_forbidden":
        names = sorted(_field_names(model))
        close = difflib.get_close_matches(loc[-1], names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        where = f"{error.title}{'.' + '.'.join(loc[:-1]) if loc[:-1] else ''}"
        known = f" ({where} has: {', '.join(names)})" if names and len(names) <= 12 and not close else \
            f" (see DeepSpeed's {where} for its keys)" if not close else ""
        return f"{_key(path)} is not a DeepSpeed setting{known}; {hint}remove it or correct its name{more}"
    if kind == "missing":
        return f"{_key(path)} is missing; DeepSpeed ({error.title}) requires it{more}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        names = sorted(_field_names(_model_at(error.title, (*first["loc"], "_")))) or []
        keys = f" with the keys {', '.join(names)}" if names else ""
        return f"{_key(path)} is {_short(first.get('input'))}, not an object; write it as a JSON object{keys}{more}"
    said = message[0].lower() + message[1:] if message else kind
    said = said.replace("input should", "it must", 1)
    return f"{_key(path)} is {_short(first.get('input'))}; {said} (DeepSpeed's {error.title}){more}"


def _model_classes() -> dict[str, type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {}
    todo = [BaseModel]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub.__module__.startswith("deepspeed"):
                found.setdefault(sub.__name__, sub)
            todo.append(sub)
    return found


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _model_at(title: str, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that holds the last element of ``loc`` (``title``: the outer model)."""
    model: type[BaseModel] | None = _model_classes().get(title)
    for part in loc[:-1]:
        if model is None:
            return None
        field = next((f for name, f in model.model_fields.items() if part in (name, f.alias)), None)
        model = _model_in(field.annotation) if field is not None else None
    return model


def _field_names(model: type[BaseModel] | None) -> list[str]:
    if model is None:
        return []
    return [field.alias or name for name, field in model.model_fields.items()
            if not (field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}).get("deprecated")]
