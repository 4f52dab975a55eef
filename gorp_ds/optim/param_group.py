"""A param group's GORP hyperparameters as one typed, validated value: :class:`UpdateConfig`.

``torch.optim`` keeps hyperparameters in plain dicts (``param_groups``) that others write to:
DeepSpeed's ``set_lr`` and torch's LR schedulers set ``group["lr"]`` between steps, and a checkpoint
load or a resume puts saved values back. The optimizer therefore parses a group's dict into an
``UpdateConfig`` where the group is added (every check runs there, and a wrong value fails naming
its key), and again only when one of the group's values changed: :func:`group_values` is compared
with the values the config was built from, a tuple comparison per step and group, no parsing.

Plain Python: no torch, no distributed imports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Integral
from typing import Any

from .config import DEFAULTS, PROJECTOR_CHOICES
from .refresh_schedule import REFRESH_SCHEDULES

ROLES = ("lora_a", "lora_b", "full", "plain")
PROTECTED_ROLES = ("lora_a", "lora_b", "full")
# The group keys an UpdateConfig is built from (its other keys, 'params' and 'names', identify the group).
GROUP_KEYS = ("role", "lr", "betas", "eps", "weight_decay", "shared_threshold", "rank", "update_gap", "scale",
              "projector", "oversample", "power_iters", "align_projector", "refresh_schedule")


@dataclass(frozen=True)
class UpdateConfig:
    """Hyperparameters of one param group's update (docs/algorithm.md §8), checked on construction:
    a wrong value raises ``ValueError`` naming its key. ``rank``, ``update_gap``, ``scale``,
    ``projector``, ``oversample`` and ``power_iters`` are checked for ``full`` groups only, the only
    ones that use them; ``rank`` against the tensors' shapes by the optimizer, which knows them."""

    role: str
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    rank: int = DEFAULTS.rank
    update_gap: int = DEFAULTS.update_gap
    scale: float = DEFAULTS.scale
    projector: str = DEFAULTS.projector
    oversample: int = DEFAULTS.oversample
    power_iters: int = DEFAULTS.power_iters
    align_projector: bool = DEFAULTS.align_projector
    refresh_schedule: str = DEFAULTS.refresh_schedule  # docs/algorithm.md §2.1
    shared_threshold: float = DEFAULTS.shared_threshold  # ε_S of end_task (0: no shared space)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        for key in ("lr", "eps", "weight_decay"):
            if not getattr(self, key) >= 0.0:  # also refuses NaN
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"betas must be two numbers in [0, 1), got {(self.beta1, self.beta2)}")
        if not 0.0 <= self.shared_threshold <= 1.0:
            raise ValueError(f"shared_threshold must be in [0, 1], got {self.shared_threshold}")
        if self.role != "full":
            return
        if self.projector not in PROJECTOR_CHOICES:
            raise ValueError(f"projector must be one of {PROJECTOR_CHOICES}, got {self.projector!r}")
        if self.refresh_schedule not in REFRESH_SCHEDULES:
            raise ValueError(f"refresh_schedule must be one of {REFRESH_SCHEDULES}, got {self.refresh_schedule!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.update_gap < 1:
            raise ValueError(f"update_gap must be >= 1, got {self.update_gap}")
        if not self.scale > 0.0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        for key in ("oversample", "power_iters"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")

    @property
    def decay(self) -> float:
        """The decoupled weight-decay factor ``1 − lr·wd`` of a step."""
        return 1.0 - self.lr * self.weight_decay

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> UpdateConfig:
        """Parse and check a param-group dict; absent keys take the run's defaults (``role`` and
        ``lr`` have none: the caller, or ``GORP``'s ``lr`` argument, sets them)."""
        betas = group.get("betas", DEFAULTS.betas)
        try:
            beta1, beta2 = (_real(beta) for beta in betas)
        except (TypeError, ValueError):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}") from None
        return cls(
            role=group.get("role"),  # type: ignore[arg-type]  (checked on construction)
            lr=_value(group, "lr", _real),
            beta1=beta1,
            beta2=beta2,
            eps=_value(group, "eps", _real),
            weight_decay=_value(group, "weight_decay", _real),
            rank=_value(group, "rank", _integer),
            update_gap=_value(group, "update_gap", _integer),
            scale=_value(group, "scale", _real),
            projector=_value(group, "projector", _string),
            oversample=_value(group, "oversample", _integer),
            power_iters=_value(group, "power_iters", _integer),
            align_projector=bool(group.get("align_projector", DEFAULTS.align_projector)),
            refresh_schedule=_value(group, "refresh_schedule", _string),
            shared_threshold=_value(group, "shared_threshold", _real),
        )


def group_values(group: Mapping[str, Any]) -> tuple[Any, ...]:
    """The raw values of ``group``'s :data:`GROUP_KEYS`: equal tuples mean the same ``UpdateConfig``
    (lists copied into tuples, so that ``betas`` changed in place shows up as a change)."""
    return tuple(_frozen(group.get(key)) for key in GROUP_KEYS)


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _value(group: Mapping[str, Any], key: str, parse: Callable[[Any], Any]) -> Any:
    """``group[key]`` (the run's default when absent) through ``parse``; a missing ``lr`` or a
    value of the wrong type raises ``ValueError`` naming ``key``."""
    if key not in group and not hasattr(DEFAULTS, key):
        raise ValueError(f"{key} is missing")
    value = group[key] if key in group else getattr(DEFAULTS, key)
    try:
        return parse(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be {parse.__doc__}, got {value!r}") from None


def _real(value: Any) -> float:
    """a number"""
    if isinstance(value, (bool, str, bytes)):  # float() would take "1e-3" and True
        raise TypeError
    return float(value)  # Python and NumPy numbers, a 0-d tensor an LR scheduler may write


def _integer(value: Any) -> int:
    """an integer"""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError
    return int(value)


def _string(value: Any) -> str:
    """a string"""
    if not isinstance(value, str):
        raise TypeError
    return value
