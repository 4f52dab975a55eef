"""GORP math (pure tensor functions over stacks of same-shape tensors) and the ``GORP`` optimizer.
No distributed imports here."""

from .gorp import GORP
from .local_driver import LocalDriver, StepDriver
from .param_group import PROTECTED_ROLES, ROLES, UpdateConfig
from .projector import (
    align_basis,
    back_project,
    compute_projector,
    compute_projectors,
    exact_basis,
    orthonormalize,
    project_gradient,
    projection_side,
    projector_seed,
    randomized_range_basis,
)
from .shared_space import extend_shared_space, oriented_moment, project_off, shared_side, stack_bases
from .update import (
    AdamStep,
    BatchUpdate,
    LowRankStep,
    adam_step_,
    apply_adam_,
    apply_direction_,
    apply_low_rank_,
    low_rank_step_,
    protected_dense_step_,
    refresh_projectors,
)
from .weight_update import Product, Quotient, weight_update

__all__ = [
    "GORP", "LocalDriver", "StepDriver", "UpdateConfig", "ROLES", "PROTECTED_ROLES",
    "AdamStep", "LowRankStep", "BatchUpdate", "adam_step_", "protected_dense_step_", "refresh_projectors",
    "low_rank_step_", "apply_adam_", "apply_low_rank_", "apply_direction_", "weight_update", "Product", "Quotient",
    "compute_projector", "compute_projectors", "randomized_range_basis", "exact_basis", "orthonormalize",
    "align_basis", "project_gradient", "back_project", "projection_side", "projector_seed",
    "extend_shared_space", "project_off", "oriented_moment", "shared_side", "stack_bases",
]
