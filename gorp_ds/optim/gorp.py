"""``GORP``: the ``torch.optim.Optimizer`` of GORP.md §8.

The optimizer is thin: per tensor it calls :func:`gorp_ds.optim.update.tensor_update` (the one
implementation of the math) and applies the result. *Where* tensors live is a driver's business:
the default driver below updates whole parameters in one process; the ZeRO layer
(``gorp_ds.zero``) installs a driver that updates the slices a rank owns. State is keyed by module
name and holds tensors only, so ``state_dict`` is independent of parameter objects and world size.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Protocol

import torch
from torch import Tensor

from ..log import get_logger
from .projector import PROJECTOR_METHODS
from .shared_space import extend_shared_space, oriented_moment, shared_side
from .update import PROTECTED_ROLES, ROLES, TensorUpdate, UpdateConfig, apply_update_, tensor_update

log = get_logger(__name__)


def restore_tensor_state(state: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Copy of a saved per-tensor state: counters stay on the CPU, everything else on ``device``."""
    return {k: v.clone() if k in ("step", "projector_failures") else v.to(device, copy=True) for k, v in state.items()}


class StepDriver(Protocol):
    """Runs one optimizer step for one param group (single process, ZeRO partition, …)."""

    def step_group(self, optimizer: GORP, group: dict[str, Any]) -> None: ...


class LocalDriver:
    """Whole parameters in one process: the reference path."""

    def step_group(self, optimizer: GORP, group: dict[str, Any]) -> None:
        cfg = UpdateConfig.from_group(group)
        for param, name in zip(group["params"], group["names"]):
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise ValueError(f"GORP: sparse gradient for {name!r} is not supported")
            grad = param.grad if param.grad.dtype == torch.float32 else param.grad.float()
            update = optimizer.update_tensor(name, grad, cfg)
            if update is not None:
                apply_update_(param.data, update, cfg)


class GORP(torch.optim.Optimizer):
    """GORP optimizer. Param groups carry ``role`` (``lora_a``, ``lora_b``, ``full``, ``plain``) and
    ``names`` (one module name per tensor); ``full`` groups also ``rank``, ``update_gap``,
    ``scale``, ``projector`` (``"randomized"`` or ``"exact"``), ``oversample``, ``power_iters``.
    ``shared_threshold`` (ε_S) may be set per group; 0 disables the shared space (GaLore).
    ``scale`` only affects ``full`` tensors. ``align_projector`` (default on, ours) rotates each
    refreshed projector within its span to the basis closest to the previous one, so that the
    Adam moments kept across refreshes stay in consistent coordinates; off gives GORP.md §2 as
    written (raw singular vectors).
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        shared_threshold: float = 0.9,
        rank: int = 8,
        update_gap: int = 20,
        scale: float = 1.0,
        projector: str = "randomized",
        oversample: int = 8,
        power_iters: int = 2,
        align_projector: bool = True,
    ) -> None:
        groups = list(params)
        if not groups or not all(isinstance(g, dict) for g in groups):
            raise ValueError("GORP: params must be a non-empty list of param-group dicts with 'role' and 'names'")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, shared_threshold=shared_threshold,
            rank=rank, update_gap=update_gap, scale=scale, projector=projector, oversample=oversample,
            power_iters=power_iters, align_projector=align_projector,
        )
        # Derived, never stored: name -> (role, shape, group index). Recorded (by add_param_group)
        # before any wrapper (DeepSpeed) replaces the groups' params with flat partitions.
        self.tensor_meta: dict[str, tuple[str, tuple[int, ...], int]] = {}
        super().__init__(groups, defaults)
        self.shared: dict[str, Tensor] = {}
        self.tasks_completed = torch.zeros((), dtype=torch.int64)
        self.driver: StepDriver = LocalDriver()
        # Run statistics (not state): refreshes done, their wall time, projector failures.
        self.stats = {"refreshes": 0, "refresh_seconds": 0.0, "projector_failures": 0, "skipped_steps": 0}
        self.time_refreshes = False
        # Set by the trainer when this step's loss or gradients are non-finite: the next step()
        # then changes nothing (moments, projectors, step counters, weights) and only counts the skip.
        self.skip_next_step = False

    # ------------------------------------------------------------------ validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group`` plus GORP's validation and name registration."""
        index = len(self.param_groups)
        super().add_param_group(param_group)
        try:
            self._validate_group(index, self.param_groups[index])
        except ValueError:
            self.param_groups.pop()
            for name in [n for n, meta in self.tensor_meta.items() if meta[2] == index]:
                del self.tensor_meta[name]
            raise

    def _validate_group(self, index: int, group: dict[str, Any]) -> None:
        params = group["params"]
        names = group.get("names")
        where = f"GORP param group {index}"
        if names is None or isinstance(names, str) or len(names) != len(params):
            got = "missing" if names is None else f"{1 if isinstance(names, str) else len(names)} names: {names!r}"
            raise ValueError(f"{where}: 'names' must list one module name per tensor ({len(params)} tensors, {got})")
        label = f"{where} ({names[0]!r}{', …' if len(names) > 1 else ''})"
        role = group.get("role")
        if role not in ROLES:
            raise ValueError(f"{label}: unknown role {role!r}; expected one of {ROLES}")
        if not group["lr"] >= 0.0:
            raise ValueError(f"{label}: lr must be >= 0, got {group['lr']}")
        if not group["eps"] >= 0.0:
            raise ValueError(f"{label}: eps must be >= 0, got {group['eps']}")
        if not group["weight_decay"] >= 0.0:
            raise ValueError(f"{label}: weight_decay must be >= 0, got {group['weight_decay']}")
        betas = group["betas"]
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"{label}: betas must be two numbers in [0, 1), got {betas}")
        if not 0.0 <= group["shared_threshold"] <= 1.0:
            raise ValueError(f"{label}: shared_threshold must be in [0, 1], got {group['shared_threshold']}")
        if role == "full":
            if group["projector"] not in PROJECTOR_METHODS:
                raise ValueError(f"{label}: projector must be one of {PROJECTOR_METHODS}, got {group['projector']!r}")
            if int(group["update_gap"]) < 1:
                raise ValueError(f"{label}: update_gap must be >= 1, got {group['update_gap']}")
            if not group["scale"] > 0.0:
                raise ValueError(f"{label}: scale must be > 0, got {group['scale']}")
            if int(group["oversample"]) < 0 or int(group["power_iters"]) < 0:
                raise ValueError(f"{label}: oversample and power_iters must be >= 0")
        for param, name in zip(params, names):
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: every name must be a non-empty string, got {name!r}")
            if name in self.tensor_meta:
                raise ValueError(f"{where}: module name {name!r} appears twice; names must be unique")
            shape = tuple(param.shape)
            if role in PROTECTED_ROLES and param.dim() != 2:
                raise ValueError(f"GORP: tensor {name!r} has role {role!r} but shape {shape}; it must be 2-D")
            if role == "full":
                rank = group["rank"]
                if not isinstance(rank, int) or rank < 1 or rank > min(shape):
                    raise ValueError(
                        f"GORP: tensor {name!r} of shape {shape}: rank must be an integer in [1, {min(shape)}], got {rank!r}"
                    )
            self.tensor_meta[name] = (role, shape, index)

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.skip_next_step:
            self.skip_next_step = False
            self.stats["skipped_steps"] += 1
            return loss
        for group in self.param_groups:
            self.driver.step_group(self, group)
        return loss

    def update_tensor(self, name: str, grad: Tensor, cfg: UpdateConfig) -> TensorUpdate | None:
        """One tensor's step through the single update implementation; drivers call this with
        the full fp32 gradient (``lora_*``/``full``) or any slice (``plain``)."""
        state = self.state[name]
        failures_before = int(state["projector_failures"]) if "projector_failures" in state else 0
        update = tensor_update(
            grad, state, cfg, shared=self.shared.get(name), name=name, task_index=int(self.tasks_completed),
            refresh_timer=self._refresh_timer if self.time_refreshes else nullcontext,
        )
        if update is not None and update.refreshed:
            self.stats["refreshes"] += 1
        if "projector_failures" in state and int(state["projector_failures"]) > failures_before:
            self.stats["projector_failures"] += 1
            log.warning(f"projector for {name} failed (non-finite gradient or decomposition); kept the previous one")
        return update

    @contextmanager
    def _refresh_timer(self) -> Iterator[None]:
        """Wall time of projector computations, device-synchronised (only when timing is on)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stats["refresh_seconds"] += time.perf_counter() - start

    # ------------------------------------------------------------------ tasks
    @torch.no_grad()
    def end_task(self) -> dict[str, int]:
        """GORP.md §3–4: extend each protected tensor's S from its first moment, then reset moments,
        projectors and step counters of every group (S is kept). Returns ``{name: columns of S}``
        for the tensors whose state this process holds."""
        for name, state in self._named_states():
            role, shape, group_index = self.tensor_meta[name]
            threshold = float(self.param_groups[group_index]["shared_threshold"])
            if role not in PROTECTED_ROLES or "exp_avg" not in state or threshold <= 0.0:
                continue
            side = shared_side(role, shape)
            basis = extend_shared_space(self.shared.get(name), oriented_moment(state["exp_avg"], side), threshold)
            if basis is not None:
                self.shared[name] = basis
        self.state.clear()
        self.tasks_completed += 1
        return {name: basis.shape[1] for name, basis in self.shared.items()}

    def _named_states(self) -> list[tuple[str, dict[str, Tensor]]]:
        # Wrappers may probe ``state[flat_param]`` (DeepSpeed does), leaving empty non-name entries.
        return [(k, v) for k, v in self.state.items() if isinstance(k, str) and v]

    def shared_space(self, name: str) -> Tensor | None:
        """The orthonormal basis S (``d × s``) of that module name, or ``None``."""
        if name not in self.tensor_meta:
            raise KeyError(f"GORP: no tensor named {name!r}")
        return self.shared.get(name)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Tensors only, keyed by module name: ``state`` (per tensor), ``shared`` (S per module),
        ``tasks_completed``, and the groups' hyperparameters (without the tensors)."""
        return {
            "state": {name: dict(st) for name, st in self._named_states()},
            "shared": dict(self.shared),
            "tasks_completed": self.tasks_completed.clone(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        saved_groups = state_dict["param_groups"]
        groups = self.param_groups
        if [g["names"] for g in saved_groups] != [g["names"] for g in groups]:
            raise ValueError("GORP.load_state_dict: the saved param groups name different tensors than this optimizer's")
        for group, saved in zip(groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "names"})
        devices = {name: self._device_of(name) for name in self.tensor_meta}
        self.state.clear()
        for name, st in state_dict["state"].items():
            if name not in self.tensor_meta:
                raise ValueError(f"GORP.load_state_dict: state for unknown tensor {name!r}")
            self.state[name] = restore_tensor_state(st, devices[name])
        self.shared = {name: s.to(devices[name], copy=True) for name, s in state_dict["shared"].items()}
        self.tasks_completed = state_dict["tasks_completed"].clone()

    def _device_of(self, name: str) -> torch.device:
        group = self.param_groups[self.tensor_meta[name][2]]
        return group["params"][0].device
