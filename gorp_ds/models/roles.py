"""Which tensors train, with which GORP role: built from module-name patterns and the method's spec
(:mod:`gorp_ds.models.methods`, whose table says what each method trains).

LoRA factors take GORP's ``lora_a`` / ``lora_b`` roles and ``--full-targets`` train at full rank
(``full``, projected Adam) for a method with ``gorp_roles``; its ``shared_space`` decides whether
ε_S applies (``galore`` is GORP with ε_S = 0, so comparing it with ``gorp`` isolates what S
protects). Every other trained tensor is ``plain`` AdamW.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..optim.config import OptimizerConfig
from ..settings import SettingError, check_settings, setting
from .lora import canonical_name
from .methods import MethodSpec, method_spec


class RoleError(ValueError):
    """Targets that match nothing, ranks larger than a matrix, unknown methods."""


@dataclass(kw_only=True)
class TargetsConfig:
    """Which weights train at full rank (the run file's ``targets:`` section)."""

    full_targets: list[str] = setting(["mlp.gate_proj"], "module-name patterns of the weights gorp and galore "
                                      "train at full rank with projected Adam (re:<regex> for a regular expression)", on_resume="fixed")
    full_gradients: str = setting(
        "projected", "how the full-rank targets get their gradient: projected (their Linear's backward forms the "
        "low-rank R = δᵀ(X Q) from the activations; they live outside DeepSpeed's flat buffers; gradient_clipping "
        "uses the norm of the projected gradient for them) or flat (full gradients through DeepSpeed's flat buffers, "
        "clipping by ‖G‖: the earlier path)", choices=("projected", "flat"), on_resume="fixed")
    refresh_from: str = setting(
        "auto", "projector refreshes on the projected path: gradient (form the refreshing layers' G and refresh "
        "same-shape layers as one batch, as many at a time as --refresh-memory-mib holds), sketch (each layer's "
        "projector from products of G through its activations, a distributed randomized range finder: no m × n "
        "tensor or collective, but one range finder per layer; needs one micro-batch per step and the randomized "
        "projector, else G is formed) or auto (gradient when all of a shape's refreshing G's fit "
        "--refresh-memory-mib, else sketch)", choices=("auto", "sketch", "gradient"))
    refresh_memory_mib: float = setting(
        1024.0, "fp32 memory for the G's of one batched projector refresh (MiB): a 135M model's 30 gate_proj "
        "take 106, LLaMA-2-7B's 32 take 5,504 (auto then sketches)", minimum=1.0,
        maximum=1e12)  # its bytes (MiB × 2**20) must fit a 64-bit integer

    def __post_init__(self) -> None:
        check_settings(self, "targets")
        if not isinstance(self.full_targets, list) or not all(isinstance(t, str) and t for t in self.full_targets):
            raise SettingError("full_targets", f"must be a list of module-name patterns, got {self.full_targets!r}",
                               "targets")
        for pattern in self.full_targets:
            # Compiled here, not first when the roles are built: a bad expression then stops the
            # launch with one line naming the setting instead of a traceback from re.
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as err:
                    raise SettingError("full_targets", f"has {pattern!r}, not a valid regular expression ({err}); "
                                       "fix the expression or drop the re: prefix for a plain module name",
                                       "targets") from None


def _matches(module_name: str, pattern: str) -> bool:
    """A pattern matches a module name at a dot boundary (``mlp.gate_proj`` matches
    ``model.layers.3.mlp.gate_proj``); patterns starting with ``re:`` are regular expressions."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], module_name) is not None
    return module_name == pattern or module_name.endswith("." + pattern)


def build_param_groups(model: nn.Module, method: str | MethodSpec, targets: TargetsConfig | None = None,
                       optimizer: OptimizerConfig | None = None) -> list[dict[str, Any]]:
    """GORP param groups for ``method`` (a spec, or a registered name) on a model (PEFT-wrapped for a
    method with adapters); sets ``requires_grad`` so that exactly the grouped tensors train."""
    if isinstance(method, str):
        try:
            method = method_spec(method)
        except ValueError as err:
            raise RoleError(str(err)) from None
    targets, cfg = targets or TargetsConfig(), optimizer or OptimizerConfig()
    raw = list(model.named_parameters())
    named = [(canonical_name(n), p) for n, p in raw]
    weights = {canonical_name(n) for n, _ in raw if n.endswith(".weight")}  # canonical names drop ".weight"
    for _, param in named:
        param.requires_grad_(False)
    if method.train_all_weights:
        params = [(n, p) for n, p in named]
        for _, p in params:
            p.requires_grad_(True)
        return [{"params": [p for _, p in params], "names": [n for n, _ in params], "role": "plain",
                 "lr": cfg.lr_plain, "weight_decay": cfg.weight_decay, "betas": cfg.betas, "eps": cfg.eps}]

    lora_a = [(n, p) for n, p in named if n.endswith(".lora_A")]
    lora_b = [(n, p) for n, p in named if n.endswith(".lora_B")]
    if not lora_a:
        raise RoleError("no LoRA factors found: the LoRA target modules match nothing in this model")
    protected = method.gorp_roles
    threshold = cfg.shared_threshold if method.shared_space else 0.0
    groups: list[dict[str, Any]] = []
    for role, members in (("lora_a", lora_a), ("lora_b", lora_b)):
        groups.append({"params": [p for _, p in members], "names": [n for n, _ in members],
                       "role": role if protected else "plain", "lr": cfg.lr_lora,
                       "weight_decay": cfg.weight_decay, "shared_threshold": threshold, "betas": cfg.betas,
                       "eps": cfg.eps})
    if protected and targets.full_targets:
        full = [(n, p) for n, p in named if n in weights and p.dim() == 2 and ".lora_" not in n
                and any(_matches(n, t) for t in targets.full_targets)]
        if not full:
            raise RoleError(f"full-rank targets {targets.full_targets} match no 2-D weight in this model")
        # A module cannot be both: the LoRA merge at a task boundary writes into the base weight that
        # the full-rank update owns (under ZeRO, silently overwritten by the owner's fp32 master).
        lora_modules = {n.removesuffix(".lora_A") for n, _ in lora_a}
        both = [n for n, _ in full if n in lora_modules]
        if both:
            raise RoleError(f"module {both[0]} is both a LoRA target (--lora-targets) and a full-rank target "
                            f"(--full-targets {','.join(targets.full_targets)}); remove it from one of the two settings")
        for name, param in full:
            if cfg.rank > min(param.shape):
                raise RoleError(f"--rank {cfg.rank} is larger than {name} ({tuple(param.shape)}); use at most {min(param.shape)}")
        groups.append({"params": [p for _, p in full], "names": [n for n, _ in full], "role": "full",
                       "lr": cfg.lr_full, "weight_decay": cfg.weight_decay, "rank": cfg.rank,
                       "update_gap": cfg.update_gap, "scale": cfg.scale, "projector": cfg.projector,
                       "oversample": cfg.oversample, "power_iters": cfg.power_iters,
                       "align_projector": cfg.align_projector,
                       "refresh_schedule": cfg.refresh_schedule, "shared_threshold": threshold, "betas": cfg.betas,
                       "eps": cfg.eps})
    for group in groups:
        for param in group["params"]:
            param.requires_grad_(True)
    return groups


def trainable_summary(groups: list[dict[str, Any]]) -> str:
    """``"lora_a 60 tensors 276k, full 30 tensors 26.5M"``: one line for the logs."""
    parts = []
    for group in groups:
        count = sum(p.numel() for p in group["params"])
        parts.append(f"{group['role']} {len(group['params'])} tensors {count / 1e6:.2f}M")
    return ", ".join(parts)
