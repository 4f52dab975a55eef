"""The GORP update over stacks of tensors: the single implementation every execution path calls.

Tensors of one role and shape are updated together as a ``(B, m, n)`` stack (one tensor is
``B = 1``); elementwise parts that stacking cannot serve (``plain`` tensors of any shapes, lists of
separate parameters) use ``torch._foreach_*`` over lists. Roles (docs/algorithm.md §1):

- ``plain``: AdamW, elementwise (any shapes, e.g. flat ZeRO slices).
- ``lora_a`` / ``lora_b``: gradient projected off S (:func:`project_off`), then Adam on the whole tensor.
- ``full``: projected Adam in a rank-k gradient space (§2), in two pieces: :func:`refresh_projectors`
  (projector from the gradient ``G``, every ``update_gap`` steps) and :func:`low_rank_step` (from the
  low-rank gradient ``R``, however it was computed), so that ``R`` may come from elsewhere.

The results are applied to whatever part of ``W`` the caller holds (whole parameters, a stacked
view of a ZeRO partition, a slice) by :func:`apply_adam_`, :func:`apply_low_rank_` or
:func:`apply_direction_`, which hand the step to :func:`~.weight_update.weight_update` (``W ← decay·W
− step_size·U``, the one definition of the update) in the form that suits it: ``M / D`` lists, a
``left @ right`` product, a dense direction. Low-precision targets get fp32 arithmetic and one rounding.

Pure tensor functions: no distributed code, no optimizer state, no host-device synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .param_group import UpdateConfig
from .projector import (
    GradientProducts,
    align_basis,
    back_project,
    compute_projectors,
    compute_projectors_op,
    projection_side,
)
from .shared_space import SharedSide, project_off
from .weight_update import Product, Quotient, weight_update

# ----------------------------------------------------------------------------- Adam pieces


def adam_moments_(exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], grads: list[Tensor], cfg: UpdateConfig) -> None:
    """``M ← β1 M + (1−β1) g``, ``V ← β2 V + (1−β2) g²`` in place (the op order of torch AdamW)."""
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - cfg.beta1)
    torch._foreach_mul_(exp_avg_sqs, cfg.beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - cfg.beta2)


def adam_denominators(exp_avg_sqs: list[Tensor], step: int, cfg: UpdateConfig) -> list[Tensor]:
    """``√V̂ + ε = √V / √(1 − β2^t) + ε`` for the step count ``t`` after this step."""
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, math.sqrt(1.0 - cfg.beta2**step))
    torch._foreach_add_(denominators, cfg.eps)
    return denominators


def bias_correction1(step: int, cfg: UpdateConfig) -> float:
    return 1.0 - cfg.beta1**step


@dataclass
class AdamStep:
    """An Adam step (``lora_*``, ``plain``): per list entry ``U = exp_avg / denominator``, scaled by ``step_size``."""

    exp_avgs: list[Tensor]
    denominators: list[Tensor]
    step_size: float

    def direction(self) -> Tensor:
        """The normalised update ``M / denominator`` of a step on one stack (``(B, …)``)."""
        return self.exp_avgs[0] / self.denominators[0]


def adam_step_(grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], step: int,
               cfg: UpdateConfig) -> AdamStep:
    """One Adam step on lists (tensors or stacks) whose step counters all read ``step - 1``."""
    adam_moments_(exp_avgs, exp_avg_sqs, grads, cfg)
    return AdamStep(exp_avgs, adam_denominators(exp_avg_sqs, step, cfg), cfg.lr / bias_correction1(step, cfg))


def protected_dense_step_(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, shared: Tensor | None,
                          side: SharedSide, step: int, cfg: UpdateConfig) -> AdamStep:
    """``lora_*`` role on a ``(B, m, n)`` stack: the gradient projected off S (``(B, d, s)``,
    zero-padded), then Adam. ``grad`` is not modified."""
    return adam_step_([project_off(grad, shared, side)], [exp_avg], [exp_avg_sq], step, cfg)


# ----------------------------------------------------------------------------- full role


def refresh_projectors(grads: Tensor | GradientProducts, previous: Tensor | None, cfg: UpdateConfig,
                       seeds: Sequence[int], shape: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """New projectors for a ``(B, m, n)`` gradient stack and a ``(B,)`` bool success mask, on the device.
    The stack may be known only through its products (``GradientProducts``, the randomized projector;
    ``shape`` then gives each member's ``(m, n)``, ``B`` is ``len(seeds)``).

    A member whose gradient or decomposition is not finite keeps its ``previous`` projector
    (``torch.where``; docs/algorithm.md §2); with ``previous=None`` (first refresh of a task) its returned
    projector is garbage and the caller must not use it. With ``cfg.align_projector`` successful
    members are rotated towards their previous basis (:func:`align_basis`).
    """
    if isinstance(grads, GradientProducts):
        assert shape is not None and cfg.projector == "randomized", "products need a shape and the randomized projector"
        new, ok = compute_projectors_op(grads.apply, grads.apply_t, (len(seeds), *shape), cfg.rank, seeds=seeds,
                                        oversample=cfg.oversample, power_iters=cfg.power_iters, device=grads.device)
    else:
        new, ok = compute_projectors(grads, cfg.rank, cfg.projector, seeds=seeds, oversample=cfg.oversample,
                                     power_iters=cfg.power_iters)
    return finish_refresh(new, ok, previous, cfg)


def finish_refresh(new: Tensor, ok: Tensor, previous: Tensor | None, cfg: UpdateConfig) -> tuple[Tensor, Tensor]:
    """The rest of :func:`refresh_projectors` once the new bases are computed (from ``G`` or from
    its products): keep the previous projector where a member failed, align the others."""
    if previous is None:
        return new, ok
    keep = ok[:, None, None]
    candidate = torch.where(keep, new, previous)  # finite everywhere: the batched SVD cannot fail on it
    if cfg.align_projector:
        candidate = align_basis(candidate, previous)
    return torch.where(keep, candidate, previous), ok


@dataclass
class LowRankStep:
    """A low-rank step (``full`` role): ``U = backproject(normalised, projector)``, scaled by ``step_size``."""

    normalised: Tensor  # (B, m, k) or (B, k, n): M̂ / (√V̂ + ε) without the bias correction of M
    projector: Tensor  # (B, n, k) or (B, m, k)
    step_size: float
    shape: tuple[int, int]  # (m, n) of each member

    def direction(self) -> Tensor:
        """The dense ``(B, m, n)`` update direction (needed only for slices of a tensor)."""
        return back_project(self.normalised, self.projector, self.shape)


def low_rank_step_(low_rank: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, projector: Tensor,
                   shared: Tensor | None, side: SharedSide, step: int, cfg: UpdateConfig,
                   shape: tuple[int, int]) -> LowRankStep:
    """Projected Adam from the low-rank gradient ``R`` (``(B, m, k)`` or ``(B, k, n)``): ``R`` off S,
    moments of ``R`` in place, normalised update in the projector's coordinates."""
    low_rank = project_off(low_rank, shared, side)
    adam = adam_step_([low_rank], [exp_avg], [exp_avg_sq], step, cfg)
    normalised = exp_avg / adam.denominators[0]
    return LowRankStep(normalised, projector, cfg.lr * cfg.scale / bias_correction1(step, cfg), shape)


# ----------------------------------------------------------------------------- applying updates


def _fp32_work(targets: list[Tensor]) -> list[Tensor]:
    return targets if all(t.dtype == torch.float32 for t in targets) else [t.float() for t in targets]


def _finish(targets: list[Tensor], work: list[Tensor]) -> None:
    if work is not targets:  # low-precision parameters: the arithmetic was fp32, round once
        torch._foreach_copy_(targets, work)


def apply_adam_(targets: list[Tensor], update: AdamStep, cfg: UpdateConfig) -> None:
    """Apply an Adam step (``U = M / denominator``, foreach). ``targets`` pairs with the update's
    lists, or, for an update on one ``(B, …)`` stack, lists its ``B`` members."""
    exp_avgs, denominators = update.exp_avgs, update.denominators
    if len(exp_avgs) == 1 and exp_avgs[0].dim() == targets[0].dim() + 1:  # one stack, its members listed
        (exp_avg,), (denominator,) = exp_avgs, denominators
        exp_avgs, denominators = list(exp_avg.unbind(0)), list(denominator.unbind(0))
    work = _fp32_work(targets)
    weight_update(work, Quotient(exp_avgs, denominators), cfg.decay, update.step_size)
    _finish(targets, work)


def apply_direction_(targets: list[Tensor], directions: list[Tensor], step_size: float, cfg: UpdateConfig) -> None:
    """Apply dense directions ``U`` (a list, paired with ``targets``; foreach)."""
    work = _fp32_work(targets)
    weight_update(work, directions, cfg.decay, step_size)
    _finish(targets, work)


@dataclass
class BatchUpdate:
    """One step of members ``index`` (positions in the batch given to the optimizer; usually all)."""

    index: list[int]
    step: AdamStep | LowRankStep

    def apply_(self, targets: Tensor | list[Tensor], cfg: UpdateConfig) -> None:
        """Apply to the members' parameters: a ``(len(index), …)`` stack or a list of them."""
        if isinstance(self.step, LowRankStep):
            apply_low_rank_(targets, self.step, cfg)
        else:
            apply_adam_(targets if isinstance(targets, list) else [targets], self.step, cfg)


def low_rank_factors(update: LowRankStep) -> Product:
    """``(left, right)`` stacks with ``backproject(N, P) = left @ right``: ``(U_r, Qᵀ)`` or ``(P, U_r)``."""
    if projection_side(update.shape) == "right":
        return Product(update.normalised, update.projector.mT)
    return Product(update.projector, update.normalised)


def apply_low_rank_member_(target: Tensor, update: LowRankStep, position: int, cfg: UpdateConfig) -> None:
    """Member ``position`` of a low-rank update applied to one fp32 ``m × n`` matrix (one GEMM)."""
    left, right = low_rank_factors(update)
    weight_update(target, Product(left[position], right[position]), cfg.decay, update.step_size)


def apply_low_rank_(targets: Tensor | list[Tensor], update: LowRankStep, cfg: UpdateConfig) -> None:
    """Apply a low-rank step (``U = backproject(N, P)``) to a ``(B, m, n)`` fp32 stack (one fused
    batched GEMM, no dense temporary) or a list of ``B`` matrices (one fused GEMM each when fp32;
    the dense ``U`` for low-precision members)."""
    product = low_rank_factors(update)  # (U_r, Qᵀ) or (P, U_r)
    if isinstance(targets, Tensor) and targets.dtype == torch.float32:
        weight_update(targets, product, cfg.decay, update.step_size)
        return
    members = list(targets.unbind(0)) if isinstance(targets, Tensor) else targets
    if all(t.dtype == torch.float32 for t in members):
        for target, a, b in zip(members, product.left.unbind(0), product.right.unbind(0), strict=True):
            weight_update(target, Product(a, b), cfg.decay, update.step_size)
        return
    apply_direction_(members, list(update.direction().unbind(0)), update.step_size, cfg)
