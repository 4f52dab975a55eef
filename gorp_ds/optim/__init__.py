"""GORP math (pure tensor functions) and the ``GORP`` optimizer. No distributed imports here."""

from .gorp import GORP, LocalDriver, StepDriver
from .projector import (
    align_basis,
    back_project,
    compute_projector,
    exact_basis,
    project_gradient,
    projection_side,
    projector_seed,
    randomized_range_basis,
)
from .shared_space import extend_shared_space, oriented_moment, project_off, shared_side
from .update import PROTECTED_ROLES, ROLES, TensorUpdate, UpdateConfig, apply_update_, tensor_update

__all__ = [
    "GORP", "LocalDriver", "align_basis", "StepDriver", "UpdateConfig", "TensorUpdate", "tensor_update", "apply_update_",
    "ROLES", "PROTECTED_ROLES", "compute_projector", "randomized_range_basis", "exact_basis",
    "project_gradient", "back_project", "projection_side", "projector_seed", "extend_shared_space",
    "project_off", "oriented_moment", "shared_side",
]
