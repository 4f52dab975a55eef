"""Start-up refusals: every setup whose math GORP does not guarantee is stopped before (or right
after) DeepSpeed builds anything, with a message naming the config field and the fix.

All checks read plain values (the DeepSpeed config dict, the optimizer's param groups, a few
numbers the engine reports); none touches DeepSpeed's internals. The refusals that need the
built ZeRO optimizer (its type, offload flags, partition groups) sit in the distributor that
reads those internals (``gorp_ds.zero.distributor``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any, NoReturn

from torch import nn

from ..optim.gorp import GORP

FULL_GRADIENTS = ("projected", "flat")
REFRESH_FROM = ("auto", "sketch", "gradient")


class UnsupportedSetupError(ValueError):
    """A DeepSpeed configuration that GORP cannot run correctly."""


def load_ds_config(config: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config as a dict; a path must name a readable JSON file."""
    if isinstance(config, dict):
        return dict(config)
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise UnsupportedSetupError(f"DeepSpeed config {path}: file not found (pass --ds_config <file.json>)")
    try:
        with open(path) as handle:
            loaded = json.load(handle)
    except json.JSONDecodeError as err:
        raise UnsupportedSetupError(f"DeepSpeed config {path}: not valid JSON ({err})") from None
    if not isinstance(loaded, dict):
        raise UnsupportedSetupError(f"DeepSpeed config {path}: the top level must be a JSON object")
    return loaded


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and bool(section.get("enabled", False))


def _offload_device(zero: dict[str, Any], key: str) -> Any:
    section = zero.get(key)
    return section.get("device", "none") if isinstance(section, dict) else "none"


Refuse = Callable[[str, str, str], NoReturn]


def check_supported(config: dict[str, Any], source: str = "DeepSpeed config") -> int:
    """Raise :class:`UnsupportedSetupError` for setups GORP does not support; return the ZeRO stage."""

    def refuse(field: str, why: str, fix: str) -> NoReturn:
        raise UnsupportedSetupError(f"{source}: '{field}' {why}; {fix}")

    # Sections read below must be JSON objects; DeepSpeed itself would fail deep inside with a traceback.
    for section in ("zero_optimization", "bf16", "fp16", "torch_autocast", "tensorboard"):
        if section in config and config[section] is not None and not isinstance(config[section], dict):
            refuse(section, f"is {config[section]!r}, not an object",
                   f'write it as an object, e.g. "{section}": {{"stage": 2}}' if section == "zero_optimization"
                   else f'write it as an object, e.g. "{section}": {{"enabled": true}}')
    clip = config.get("gradient_clipping")
    # DeepSpeed reads any value: NaN turns every gradient into NaN (each step then skipped as
    # non-finite), a negative one flips the gradients' sign, neither with a message.
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                             or not math.isfinite(clip) or clip < 0):
        refuse("gradient_clipping", f"is {clip!r}", "use a finite number >= 0 (the largest gradient norm; "
               "0 turns clipping off), e.g. 1.0")
    zero = config.get("zero_optimization", {}) or {}
    raw_stage = zero.get("stage", 0)
    if isinstance(raw_stage, bool) or not isinstance(raw_stage, int):
        refuse("zero_optimization.stage", f"is {raw_stage!r}, not an integer", "use 1, 2 or 3")
    stage = int(raw_stage)
    if "scheduler" in config:
        # DeepSpeed's scheduler would set the groups' learning rates itself, overriding the run's
        # --lr-* values while results.json records those.
        refuse("scheduler", "is set; a DeepSpeed learning-rate scheduler overrides the run's --lr-lora/--lr-full/"
               "--lr-plain", "remove the \"scheduler\" section and set the run's schedule instead: --lr-schedule "
               "constant|linear|cosine, --lr-warmup-steps, --lr-min-ratio, --lr-schedule-scope (run file: "
               "optimizer.lr_schedule, ...)")
    if stage not in (1, 2, 3):
        refuse("zero_optimization.stage", f"is {stage}", "use stage 1, 2 or 3 (on one GPU, stage 2 costs nothing)")
    if stage == 3:
        _check_stage3(zero, refuse)
    for key in ("offload_optimizer", "offload_param"):
        device = _offload_device(zero, key)
        if device not in (None, "none"):
            refuse(f"zero_optimization.{key}", f"offloads to {device!r}, which GORP does not support (DeepSpeed's "
                   "offload path expects its own CPU Adam, and GORP's projector refreshes would run on the CPU)",
                   f"remove zero_optimization.{key}")
    if zero.get("cpu_offload"):
        refuse("zero_optimization.cpu_offload", "is set", "remove it (optimizer offload is not supported with GORP)")
    if _enabled(config.get("fp16")):
        refuse("fp16.enabled", "is true; fp16 loss scaling is not supported with GORP", "use \"bf16\": {\"enabled\": true}")
    if _enabled(config.get("torch_autocast")):
        refuse("torch_autocast.enabled", "is true", "use \"bf16\": {\"enabled\": true} instead")
    if "optimizer" in config:
        refuse("optimizer", "is set, but the optimizer is GORP (given in code)", "remove the \"optimizer\" section")
    if zero.get("zenflow"):
        refuse("zero_optimization.zenflow", "is set", "remove it")
    return stage


def _check_stage3(zero: dict[str, Any], refuse: Refuse) -> None:
    """ZeRO-3 settings whose parameter layout or update GORP does not support, each refused with
    the field to change."""
    if _offload_device(zero, "offload_param") not in (None, "none"):
        # With offload_param the partitions (frozen base weights included) live on the host between
        # uses: the `full` targets' rank-k update and their split masters would run on the CPU, and
        # DeepSpeed then also requires its CPU Adam for the trainable partitions.
        refuse("zero_optimization.offload_param", f"offloads parameters to {_offload_device(zero, 'offload_param')!r}, "
               "which GORP under ZeRO-3 does not support (the full-rank targets are updated in their GPU "
               "partitions and DeepSpeed's parameter offload needs its own CPU optimizer)",
               "remove zero_optimization.offload_param (ZeRO-3 already partitions the frozen base weights "
               "across the GPUs)")
    if int(zero.get("zero_hpz_partition_size", 1) or 1) > 1:
        refuse("zero_optimization.zero_hpz_partition_size", f"is {zero['zero_hpz_partition_size']}; hierarchical "
               "secondary partitions are not supported by GORP", "remove it (or set it to 1)")
    for key in ("zero_quantized_weights", "zero_quantized_nontrainable_weights", "zero_quantized_gradients"):
        if zero.get(key):
            refuse(f"zero_optimization.{key}", "is true; quantized ZeRO-3 weights or gradients change the values "
                   "GORP's masters and projected gradients are computed from", f"remove zero_optimization.{key}")
    if int(zero.get("mics_shard_size", -1) or -1) > 0:
        refuse("zero_optimization.mics_shard_size", f"is {zero['mics_shard_size']}; MiCS sharding is not supported "
               "by GORP", "remove it (plain ZeRO-3 partitions over all ranks)")


def check_initialize_arguments(optimizer: Any, kwargs: dict[str, Any]) -> None:
    """``gorp_ds.initialize`` takes a ``GORP`` optimizer and no model or pipeline parallelism."""
    if not isinstance(optimizer, GORP):
        raise TypeError(f"gorp_ds.initialize needs a gorp_ds.GORP optimizer, got {type(optimizer).__name__}")
    for key in ("mpu", "mesh_param"):
        if kwargs.get(key) is not None:
            raise UnsupportedSetupError(f"gorp_ds.initialize: '{key}' (model/pipeline parallelism) is not supported")


def check_gradient_settings(full_gradients: str, refresh_from: str, refresh_memory_mib: float) -> None:
    """The run's ``--full-gradients``, ``--refresh-from`` and ``--refresh-memory-mib``."""
    if refresh_from not in REFRESH_FROM:
        raise UnsupportedSetupError(f"refresh_from (--refresh-from) is {refresh_from!r}; use auto, sketch or gradient")
    if not refresh_memory_mib > 0:
        raise UnsupportedSetupError(f"refresh_memory_mib (--refresh-memory-mib) is {refresh_memory_mib!r}; use a "
                                    "positive number of MiB")
    if full_gradients not in FULL_GRADIENTS:
        raise UnsupportedSetupError(f"full_gradients (--full-gradients) is {full_gradients!r}; use one of {FULL_GRADIENTS}")


def check_projected_setup(param_groups: list[dict[str, Any]], ds_config: dict[str, Any], source: Any) -> None:
    """Projected gradients take the ``full`` groups out of the optimizer (they must come last and
    leave DeepSpeed at least one group), count micro-steps with DeepSpeed and clip by a norm
    DeepSpeed computes."""
    roles = [g["role"] for g in param_groups]
    if roles[-1] != "full" or all(role == "full" for role in roles):
        raise UnsupportedSetupError("--full-gradients projected: the 'full' param groups must come last and at "
                                    "least one other group (LoRA, plain) must remain for DeepSpeed")
    if ds_config.get("managed_gradient_accumulation") is False:
        raise UnsupportedSetupError(f"{source}: 'managed_gradient_accumulation' is false; projected gradients "
                                    "need DeepSpeed's micro-step counter (remove it, or --full-gradients flat)")
    zero = ds_config.get("zero_optimization") or {}
    if float(ds_config.get("gradient_clipping", 0.0) or 0.0) > 0.0 and zero.get("compute_grad_norm") is False:
        raise UnsupportedSetupError(f"{source}: 'gradient_clipping' is set but 'zero_optimization.compute_grad_norm' "
                                    "is false; projected gradients clip by the combined norm, which needs it "
                                    "(remove compute_grad_norm)")


def check_accumulation(stage: int, overlap_comm: bool, accumulation: int, source: Any) -> None:
    """Settings DeepSpeed resolves only when it builds the engine (``overlap_comm`` and the
    accumulation steps derived from the batch sizes)."""
    if stage == 1 and overlap_comm and accumulation > 1:
        # Measured with DeepSpeed 0.19.8: ZeRO-1 + overlap_comm + accumulation drifts from the
        # single-process trajectory even with torch AdamW (2e-2 relative after one step).
        raise UnsupportedSetupError(
            f"{source}: 'zero_optimization.overlap_comm' is true with ZeRO stage 1 and "
            f"gradient_accumulation_steps={accumulation}; DeepSpeed then accumulates "
            "gradients incorrectly. Set overlap_comm to false or use stage 2"
        )


def trainable_by_name(param_groups: list[dict[str, Any]]) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of the optimizer's groups; each must require a gradient."""
    params_by_name = {}
    for group in param_groups:
        for param, name in zip(group["params"], group["names"]):
            if not param.requires_grad:
                raise UnsupportedSetupError(f"GORP tensor {name!r} has requires_grad=False; remove it from the optimizer")
            params_by_name[name] = param
    return params_by_name
