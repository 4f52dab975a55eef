"""The GORP update of one tensor: the single implementation every execution path calls.

``tensor_update`` takes the full gradient of one tensor (fp32) and its state, advances the state
(moments, projector, step), and returns the update direction and step size; the caller applies
``W ← W (1 − lr·wd) − step_size · direction`` to whatever part of ``W`` it holds (the whole
tensor in one process, the rank's slice under ZeRO). Roles (GORP.md §1):

- ``plain``: AdamW, elementwise (``grad`` may be any shape, e.g. a flat slice).
- ``lora_a`` / ``lora_b``: gradient projected off S, then Adam on the whole tensor.
- ``full``: projected Adam in a rank-k gradient space (§2), low-rank gradient projected off S.

Pure tensor functions: no distributed code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from .projector import align_basis, back_project, compute_projector, project_gradient, projector_seed
from .shared_space import project_off, shared_side

ROLES = ("lora_a", "lora_b", "full", "plain")
PROTECTED_ROLES = ("lora_a", "lora_b", "full")


@dataclass(frozen=True)
class UpdateConfig:
    """Hyperparameters of one tensor's update, read from its param group."""

    role: str
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    rank: int = 8
    update_gap: int = 20
    scale: float = 1.0
    projector: str = "randomized"
    oversample: int = 8
    power_iters: int = 2
    align_projector: bool = True

    @classmethod
    def from_group(cls, group: dict) -> UpdateConfig:
        beta1, beta2 = group["betas"]
        return cls(
            role=group["role"],
            lr=float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            rank=int(group.get("rank", 8)),
            update_gap=int(group.get("update_gap", 20)),
            scale=float(group.get("scale", 1.0)),
            projector=str(group.get("projector", "randomized")),
            oversample=int(group.get("oversample", 8)),
            power_iters=int(group.get("power_iters", 2)),
            align_projector=bool(group.get("align_projector", True)),
        )


@dataclass
class TensorUpdate:
    """``W ← W (1 − lr·wd) − step_size · direction``; ``direction`` has the gradient's shape."""

    direction: Tensor
    step_size: float
    refreshed: bool = False


def init_state(state: dict[str, Tensor], grad: Tensor, cfg: UpdateConfig) -> None:
    """Fill an empty state. Step counters live on the CPU (no device sync to read them)."""
    state["step"] = torch.zeros((), dtype=torch.int64)
    if cfg.role == "full":
        state["projector_failures"] = torch.zeros((), dtype=torch.int64)
        # Moments are allocated at the first successful projector refresh (they have R's shape).
    else:
        state["exp_avg"] = torch.zeros_like(grad, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(grad, dtype=torch.float32)


def adam_moments_(state: dict[str, Tensor], grad: Tensor, cfg: UpdateConfig) -> None:
    """``M ← β1 M + (1−β1) g``, ``V ← β2 V + (1−β2) g²`` in place (the op order of torch AdamW)."""
    state["exp_avg"].lerp_(grad, 1.0 - cfg.beta1)
    state["exp_avg_sq"].mul_(cfg.beta2).addcmul_(grad, grad, value=1.0 - cfg.beta2)


def adam_normalised(state: dict[str, Tensor], step: int, cfg: UpdateConfig) -> tuple[Tensor, float]:
    """``M / (√V̂ + ε)`` and the first-moment bias correction ``1 − β1^t`` it still needs."""
    bias1 = 1.0 - cfg.beta1**step
    bias2_sqrt = math.sqrt(1.0 - cfg.beta2**step)
    denom = (state["exp_avg_sq"].sqrt() / bias2_sqrt).add_(cfg.eps)
    return state["exp_avg"] / denom, bias1


def _full_update(
    grad: Tensor,
    state: dict[str, Tensor],
    shared: Tensor | None,
    cfg: UpdateConfig,
    name: str,
    task_index: int,
    refresh_timer: Callable[[], AbstractContextManager],
) -> TensorUpdate | None:
    step_before = int(state["step"])
    refreshed = False
    if step_before % cfg.update_gap == 0 or "projector" not in state:
        seed = projector_seed(name, task_index, step_before // cfg.update_gap)
        with refresh_timer():
            projector = compute_projector(
                grad, cfg.rank, cfg.projector, seed=seed, oversample=cfg.oversample, power_iters=cfg.power_iters
            )
        if projector is None:
            state["projector_failures"] += 1
            if "projector" not in state:
                return None  # nothing to project with yet: skip this tensor's step entirely
        else:
            if cfg.align_projector and "projector" in state:
                projector = align_basis(projector, state["projector"])
            state["projector"] = projector
            refreshed = True
    low_rank = project_gradient(grad, state["projector"])  # m×k (right) or k×n (left)
    low_rank = project_off(low_rank, shared, shared_side("full", grad.shape))
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(low_rank)
        state["exp_avg_sq"] = torch.zeros_like(low_rank)
    state["step"] += 1
    adam_moments_(state, low_rank, cfg)
    normalised, bias1 = adam_normalised(state, step_before + 1, cfg)
    direction = back_project(normalised, state["projector"], grad.shape)
    return TensorUpdate(direction, cfg.lr * cfg.scale / bias1, refreshed)


def tensor_update(
    grad: Tensor,
    state: dict[str, Tensor],
    cfg: UpdateConfig,
    *,
    shared: Tensor | None = None,
    name: str = "",
    task_index: int = 0,
    refresh_timer: Callable[[], AbstractContextManager] = nullcontext,
) -> TensorUpdate | None:
    """Advance ``state`` by one optimizer step on ``grad`` (fp32, the tensor's full gradient for
    ``lora_*``/``full``; any slice for ``plain``) and return the update, or ``None`` if this
    tensor's step had to be skipped (a ``full`` tensor whose very first projector failed).
    ``refresh_timer`` wraps projector computations (the caller's instrumentation)."""
    if not state:
        init_state(state, grad, cfg)
    if cfg.role == "full":
        return _full_update(grad, state, shared, cfg, name, task_index, refresh_timer)
    if cfg.role in ("lora_a", "lora_b"):
        grad = project_off(grad, shared, shared_side(cfg.role, grad.shape))
    state["step"] += 1
    adam_moments_(state, grad, cfg)
    normalised, bias1 = adam_normalised(state, int(state["step"]), cfg)
    return TensorUpdate(normalised, cfg.lr / bias1)


def apply_update_(param: Tensor, update: TensorUpdate, cfg: UpdateConfig) -> None:
    """``W ← W (1 − lr·wd) − step_size · direction`` in place (decoupled weight decay)."""
    target = param if param.dtype == torch.float32 else param.float()
    if cfg.weight_decay != 0.0:
        target.mul_(1.0 - cfg.lr * cfg.weight_decay)
    target.add_(update.direction, alpha=-update.step_size)
    if target is not param:  # low-precision parameter: do the arithmetic in fp32, round once
        param.copy_(target)
