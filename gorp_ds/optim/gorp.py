"""``GORP``: the ``torch.optim.Optimizer`` of docs/algorithm.md §8.

The optimizer is thin: per batch of same-role, same-shape tensors it calls the stacked update
functions of :mod:`gorp_ds.optim.update` (the one implementation of the math; a single tensor is a
batch of one) and hands the result back to a driver, which applies it. *Where* tensors live is the
driver's business (:mod:`.local_driver`: whole parameters in one process by default; the ZeRO layer
installs a driver that updates the slices a rank owns). State is keyed by module name and holds
tensors only (per-name views into stacked buffers, :mod:`.stacks`), so ``state_dict`` is
independent of parameter objects, batching and world size.

Each param group's hyperparameters are parsed and checked once, into an
:class:`~.param_group.UpdateConfig`, when the group is added or changed through :meth:`GORP.update_group`;
a step compares the group's values with those the config was built from and rebuilds it only when
one changed (an LR scheduler or DeepSpeed's ``set_lr`` writing ``group["lr"]``).

Projector refreshes run in :mod:`.refresh` (which also counts and times them); ``full`` tensors
trained from low-rank gradients computed elsewhere are driven through :mod:`.projected_service`.

No host-device synchronisation on the step path, with two exceptions: the first projector refresh
of a task reads one success flag per batch back (it decides whether a ``full`` tensor can step at
all), and torch's ``eigh``/``svd`` check their own errors on refresh steps. Projector failures are
counted on the device and read when ``stats`` is asked for (logging intervals).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .config import DEFAULTS
from .local_driver import LocalDriver, StepDriver
from .param_group import PROTECTED_ROLES, UpdateConfig, group_values
from .projected_service import ProjectedGradientService
from .projector import GradientProducts, project_gradient
from .refresh import ProjectorRefresher
from .refresh_schedule import refresh_due, refresh_phases
from .shared_space import extend_shared_space, oriented_moment, shared_side
from .stacks import StateStack, partition_by_step, restore_tensor_state, select, store
from .update import BatchUpdate, adam_step_, low_rank_step_, protected_dense_step_


class GORP(ProjectedGradientService, torch.optim.Optimizer):
    """GORP optimizer. Param groups carry ``role`` (``lora_a``, ``lora_b``, ``full``, ``plain``) and
    ``names`` (one module name per tensor); ``full`` groups also ``rank``, ``update_gap``,
    ``scale``, ``projector`` (``"randomized"`` or ``"exact"``), ``oversample``, ``power_iters``.
    ``shared_threshold`` (ε_S) may be set per group; 0 disables the shared space (GaLore).
    ``scale`` only affects ``full`` tensors. ``align_projector`` (default on, ours) rotates each
    refreshed projector within its span to the basis closest to the previous one, so that the
    Adam moments kept across refreshes stay in consistent coordinates; off gives docs/algorithm.md §2 as
    written (raw singular vectors).

    Every keyword's default is :class:`~gorp_ds.optim.config.OptimizerConfig`'s (the run's
    defaults); ``lr`` is set per group by the caller.

    ``stats`` (refreshes attempted, refresh seconds, projector failures) synchronises with the
    device and logs new projector failures: read it at logging intervals. ``time_refreshes = True``
    (profiling) times each refresh between device syncs instead of with CUDA events.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = DEFAULTS.betas,
        eps: float = DEFAULTS.eps,
        weight_decay: float = DEFAULTS.weight_decay,
        *,
        shared_threshold: float = DEFAULTS.shared_threshold,
        rank: int = DEFAULTS.rank,
        update_gap: int = DEFAULTS.update_gap,
        scale: float = DEFAULTS.scale,
        projector: str = DEFAULTS.projector,
        oversample: int = DEFAULTS.oversample,
        power_iters: int = DEFAULTS.power_iters,
        align_projector: bool = DEFAULTS.align_projector,
        refresh_schedule: str = DEFAULTS.refresh_schedule,
    ) -> None:
        groups = list(params)
        if not groups or not all(isinstance(g, dict) for g in groups):
            raise ValueError("GORP: params must be a non-empty list of param-group dicts with 'role' and 'names'")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, shared_threshold=shared_threshold,
            rank=rank, update_gap=update_gap, scale=scale, projector=projector, oversample=oversample,
            power_iters=power_iters, align_projector=align_projector, refresh_schedule=refresh_schedule,
        )
        # Derived, never stored: name -> (role, shape, group index), and per group index its typed
        # hyperparameters with the raw values they were built from. Recorded (by add_param_group)
        # before any wrapper (DeepSpeed) replaces the groups' params with flat partitions.
        self.tensor_meta: dict[str, tuple[str, tuple[int, ...], int]] = {}
        self._configs: dict[int, tuple[tuple[Any, ...], UpdateConfig]] = {}
        # Per group index, its names in order (refresh phases are positions in it; a wrapper may
        # replace the group dicts themselves).
        self._group_names: dict[int, tuple[str, ...]] = {}
        super().__init__(groups, defaults)
        self.shared: dict[str, Tensor] = {}
        self.tasks_completed = torch.zeros((), dtype=torch.int64)
        self.driver: StepDriver = LocalDriver()
        # Groups stepped by an owner outside ``step()`` (``detach_groups``): the ``full`` tensors
        # trained from projected gradients. Their state is here like every other tensor's.
        self.detached_groups: list[dict[str, Any]] = []
        self.refresher = ProjectorRefresher()  # runs, counts and times the projector refreshes (not state)
        # Derived, never stored: stacked state of each batch of same-shape tensors (``stacks.py``).
        self._stacks: dict[tuple[str, ...], StateStack] = {}
        # Derived, never stored: {(group index, T, schedule): {name: refresh phase}} (refresh_phases).
        self._phases: dict[tuple[int, int, str], dict[str, int]] = {}
        # Set by the trainer when this step's loss or gradients are non-finite: the next step()
        # then changes nothing (moments, projectors, step counters, weights) and only counts the skip.
        self.skip_next_step = False
        self.skipped_steps = 0

    # ------------------------------------------------------------------ groups and their hyperparameters
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group`` plus GORP's validation and name registration."""
        if getattr(self, "detached_groups", None):
            raise ValueError("GORP.add_param_group: groups were detached (detach_groups); add groups before that")
        index = len(self.param_groups)
        super().add_param_group(param_group)
        try:
            self._register_group(index, self.param_groups[index])
        except ValueError:
            self.param_groups.pop()
            for name in [n for n, meta in self.tensor_meta.items() if meta[2] == index]:
                del self.tensor_meta[name]
            raise

    def _register_group(self, index: int, group: dict[str, Any]) -> None:
        params = group["params"]
        names = group.get("names")
        where = f"GORP param group {index}"
        if names is None or isinstance(names, str) or len(names) != len(params):
            got = "missing" if names is None else f"{1 if isinstance(names, str) else len(names)} names: {names!r}"
            raise ValueError(f"{where}: 'names' must list one module name per tensor ({len(params)} tensors, {got})")
        cfg = self._parse_group(index, group)
        for param, name in zip(params, names):
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: every name must be a non-empty string, got {name!r}")
            if name in self.tensor_meta:
                raise ValueError(f"{where}: module name {name!r} appears twice; names must be unique")
            shape = tuple(param.shape)
            if cfg.role in PROTECTED_ROLES and param.dim() != 2:
                raise ValueError(f"GORP: tensor {name!r} has role {cfg.role!r} but shape {shape}; it must be 2-D")
            self._check_rank(cfg, name, shape)
            self.tensor_meta[name] = (cfg.role, shape, index)
        self._configs[index] = (group_values(group), cfg)
        self._group_names[index] = tuple(names)

    @staticmethod
    def _parse_group(index: int, group: Mapping[str, Any]) -> UpdateConfig:
        """``group``'s typed hyperparameters; a wrong value fails naming the group, its tensors and the key."""
        try:
            return UpdateConfig.from_group(group)
        except ValueError as err:
            names = group["names"]
            label = f"GORP param group {index} ({names[0]!r}{', …' if len(names) > 1 else ''})"
            raise ValueError(f"{label}: {err}") from None

    @staticmethod
    def _check_rank(cfg: UpdateConfig, name: str, shape: tuple[int, ...]) -> None:
        if cfg.role == "full" and not cfg.rank <= min(shape):
            raise ValueError(f"GORP: tensor {name!r} of shape {shape}: rank must be an integer in [1, {min(shape)}], "
                             f"got {cfg.rank!r}")

    def _rebuilt_config(self, index: int, group: Mapping[str, Any]) -> UpdateConfig:
        """The typed hyperparameters of registered group ``index`` from new values ``group``."""
        cfg = self._parse_group(index, group)
        role = self._configs[index][1].role
        if cfg.role != role:
            raise ValueError(f"GORP param group {index}: role cannot change (was {role!r}, got {cfg.role!r})")
        for name in group["names"]:
            self._check_rank(cfg, name, self.tensor_meta[name][1])
        return cfg

    def group_config(self, group: Mapping[str, Any]) -> UpdateConfig:
        """The typed hyperparameters of ``group`` (one of this optimizer's groups, detached ones
        included). Rebuilt, and checked, only when one of the group's values changed since it was
        built: an LR scheduler or DeepSpeed's ``set_lr`` writes ``group["lr"]`` between steps, and
        the step must use the value written."""
        index = self.tensor_meta[group["names"][0]][2]
        values = group_values(group)
        built, cfg = self._configs[index]
        if values != built:
            cfg = self._rebuilt_config(index, group)
            self._configs[index] = (values, cfg)
        return cfg

    def update_group(self, index: int, values: Mapping[str, Any]) -> None:
        """Change the hyperparameters of group ``index`` (numbered as in :meth:`group`) to ``values``
        (``params`` and ``names``, which identify the group, are ignored): checked first, so a wrong
        value raises ``ValueError`` naming its key and leaves the group as it was. A resume puts the
        run's settings back this way, a checkpoint load the saved ones."""
        group = self.group(index)
        changes = {key: value for key, value in values.items() if key not in ("params", "names")}
        candidate = {**group, **changes}
        cfg = self._rebuilt_config(index, candidate)
        group.update(changes)
        self._configs[index] = (group_values(group), cfg)

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.skip_next_step:
            self.skip_next_step = False
            self.skipped_steps += 1
            return loss
        for group in self.param_groups:
            self.driver.step_group(self, group, self.group_config(group))
        return loss

    def update_batch(self, names: list[str], grads: Tensor | list[Tensor], cfg: UpdateConfig) -> list[BatchUpdate]:
        """One step of a batch of tensors of one param group, through the stacked update functions.

        ``lora_*``/``full``: ``names`` share a shape and ``grads`` is their full fp32 gradients as
        one ``(B, m, n)`` stack (any strides: a view of a flat ZeRO partition works). ``plain``:
        ``grads`` is a list of fp32 gradients (or slices) of any shapes. Returns what to apply,
        usually one update for every member; members whose step counters differ are updated in
        separate partitions, and a ``full`` member whose first projector of the task failed is
        left out (its step is skipped)."""
        if cfg.role == "plain":
            return self._plain_batch(names, grads, cfg)
        assert isinstance(grads, Tensor) and grads.dim() == 3, "protected roles take a (B, m, n) gradient stack"
        stack = self._stack(tuple(names), cfg)
        stack.bind(self.state, grads.device)
        shared_all = stack.shared_stack(self.shared)
        side = shared_side(cfg.role, stack.shape)
        batch, updates = len(names), []
        for step, index in partition_by_step(stack.steps()):
            grad = select(grads, index, batch)
            shared = select(shared_all, index, batch) if shared_all is not None else None
            if cfg.role == "full":
                update = self._full_partition(stack, grad, shared, step, index, cfg)
                if update is not None:
                    updates.append(update)
                continue
            exp_avg = select(stack.buffers["exp_avg"], index, batch)
            exp_avg_sq = select(stack.buffers["exp_avg_sq"], index, batch)
            adam = protected_dense_step_(grad, exp_avg, exp_avg_sq, shared, side, step + 1, cfg)
            store(stack.buffers["exp_avg"], index, exp_avg)
            store(stack.buffers["exp_avg_sq"], index, exp_avg_sq)
            self._advance(stack, index)
            updates.append(BatchUpdate(index, adam))
        return updates

    def _plain_batch(self, names: list[str], grads: list[Tensor], cfg: UpdateConfig) -> list[BatchUpdate]:
        states = []
        for name, grad in zip(names, grads):
            state = self.state[name]
            if not state:  # step counters live on the CPU: reading them needs no device sync
                state["step"] = torch.zeros((), dtype=torch.int64)
                state["exp_avg"] = torch.zeros_like(grad, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(grad, dtype=torch.float32)
            states.append(state)
        updates = []
        for step, index in partition_by_step([int(st["step"]) for st in states]):
            members = [states[i] for i in index]
            torch._foreach_add_([st["step"] for st in members], 1)
            adam = adam_step_([grads[i] for i in index], [st["exp_avg"] for st in members],
                              [st["exp_avg_sq"] for st in members], step + 1, cfg)
            updates.append(BatchUpdate(index, adam))
        return updates

    def _full_partition(self, stack: StateStack, grad: Tensor, shared: Tensor | None, step: int,
                        index: list[int], cfg: UpdateConfig) -> BatchUpdate | None:
        """``full`` members ``index`` (all at ``step``) from their full gradients: refresh those due
        (:mod:`.refresh_schedule`), ``R = project(G)``, then the low-rank step (the path of full
        gradients in flat buffers)."""
        phases = self.refresh_phases(stack.names, cfg)
        due = [j for j, i in enumerate(index) if refresh_due(step, phases[i], cfg.update_gap)]
        if due:
            # Only step 0 can fail a member (later refreshes keep the previous projector), and
            # at step 0 every member is due: the members left out below are all among ``due``.
            refreshed = [index[j] for j in due]
            kept = self._refresh_partition(stack, select(grad, due, len(index)), step, refreshed, cfg)
            kept = [i for i in index if i in kept or i not in refreshed]  # ascending, like index
            if not kept:
                return None
            if len(kept) < len(index):
                grad = select(grad, [index.index(i) for i in kept], len(index))
                shared = select(shared, [index.index(i) for i in kept], len(index)) if shared is not None else None
                index = kept
        projector = select(stack.buffers["projector"], index, len(stack.names))
        low_rank = project_gradient(grad, projector)  # (B, m, k) right or (B, k, n) left
        return self._low_rank_partition(stack, low_rank, shared, step, index, cfg)

    def _refresh_partition(self, stack: StateStack, source: Tensor | GradientProducts, step: int, index: list[int],
                           cfg: UpdateConfig) -> list[int]:
        """New projectors for members ``index`` (all at ``step``, a refresh step) from their full
        gradients (``(len(index), m, n)``) or products of them: :meth:`.refresh.ProjectorRefresher.refresh`."""
        phases = self.refresh_phases(stack.names, cfg)
        return self.refresher.refresh(stack, self.state, source, step, index, cfg, int(self.tasks_completed),
                                      [phases[i] for i in index])

    def refresh_phases(self, names: tuple[str, ...], cfg: UpdateConfig) -> list[int]:
        """Refresh phase of each of ``names`` (``full`` tensors of one group): from its position in
        its param group's ``names`` (docs/algorithm.md §2.1), so independent of batching and ranks."""
        index = self.tensor_meta[names[0]][2]
        key = (index, cfg.update_gap, cfg.refresh_schedule)
        cached = self._phases.get(key)
        if cached is None:
            members = self._group_names[index]
            cached = self._phases[key] = dict(zip(members, refresh_phases(len(members), cfg.update_gap,
                                                                          cfg.refresh_schedule)))
        return [cached[name] for name in names]

    def _low_rank_partition(self, stack: StateStack, low_rank: Tensor, shared: Tensor | None, step: int,
                            index: list[int], cfg: UpdateConfig) -> BatchUpdate:
        """The low-rank step of members ``index`` (all at ``step``, each with a projector) from
        ``R`` (``(len(index), m, k)`` or ``(len(index), k, n)``)."""
        batch, buffers = len(stack.names), stack.buffers
        projector = select(buffers["projector"], index, batch)
        exp_avg = select(buffers["exp_avg"], index, batch)
        exp_avg_sq = select(buffers["exp_avg_sq"], index, batch)
        update = low_rank_step_(low_rank, exp_avg, exp_avg_sq, projector, shared, shared_side("full", stack.shape),
                                step + 1, cfg, stack.shape)
        store(buffers["exp_avg"], index, exp_avg)
        store(buffers["exp_avg_sq"], index, exp_avg_sq)
        self._advance(stack, index)
        return BatchUpdate(index, update)

    @staticmethod
    def _advance(stack: StateStack, index: list[int]) -> None:
        steps = stack.buffers["step"]  # CPU
        if len(index) == len(stack.names):
            steps += 1
        else:
            for i in index:
                steps[i] += 1

    def _stack(self, names: tuple[str, ...], cfg: UpdateConfig) -> StateStack:
        stack = self._stacks.get(names)
        if stack is None or stack.rank != cfg.rank:
            members = set(names)
            for key in [k for k in self._stacks if members.intersection(k)]:
                del self._stacks[key]  # a tensor belongs to one batch at a time
            stack = self._stacks[names] = StateStack(names, cfg.role, self.tensor_meta[names[0]][1], cfg.rank)
        return stack

    # ------------------------------------------------------------------ statistics
    @property
    def stats(self) -> dict[str, float | int]:
        """Refreshes attempted, their time in seconds and the projector failures of this run.
        Reading it synchronises with the device (events, counters): do it at logging intervals."""
        return {"refreshes": self.refresh_count, "refresh_seconds": self.refresher.seconds(),
                "projector_failures": self.poll_failures(), "skipped_steps": self.skipped_steps}

    @property
    def refresh_count(self) -> int:
        """Member refreshes attempted this run (a host counter, free to read)."""
        return self.refresher.count

    @property
    def time_refreshes(self) -> bool:
        """Profiling: time each refresh between device syncs (otherwise CUDA events, read by ``stats``)."""
        return self.refresher.synchronize

    @time_refreshes.setter
    def time_refreshes(self, value: bool) -> None:
        self.refresher.synchronize = bool(value)

    def poll_failures(self) -> int:
        """Projector failures of this run so far (a device read); logs a warning naming the tensors
        when there are new ones since the last call."""
        return self.refresher.poll_failures(self._named_states())

    # ------------------------------------------------------------------ tasks
    @torch.no_grad()
    def end_task(self) -> dict[str, int]:
        """docs/algorithm.md §3–4: extend each protected tensor's S from its first moment, then reset moments,
        projectors and step counters of every group (S is kept). Returns ``{name: columns of S}``
        for the tensors whose state this process holds."""
        for name, state in self._named_states():
            role, shape, group_index = self.tensor_meta[name]
            threshold = self.group_config(self.group(group_index)).shared_threshold
            if role not in PROTECTED_ROLES or "exp_avg" not in state or threshold <= 0.0:
                continue
            side = shared_side(role, shape)
            basis = extend_shared_space(self.shared.get(name), oriented_moment(state["exp_avg"], side), threshold)
            if basis is not None:
                self.shared[name] = basis
        self.state.clear()
        self._stacks.clear()
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
            "param_groups": [{k: v for k, v in g.items() if k != "params"}
                             for g in self.param_groups + self.detached_groups],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        saved_groups = state_dict["param_groups"]
        groups = self.param_groups + self.detached_groups
        if [g["names"] for g in saved_groups] != [g["names"] for g in groups]:
            raise ValueError("GORP.load_state_dict: the saved param groups name different tensors than this optimizer's")
        for index, saved in enumerate(saved_groups):  # groups numbered as in group(): detached ones last
            self.update_group(index, saved)
        devices = {name: self._device_of(name) for name in self.tensor_meta}
        self.state.clear()
        self._stacks.clear()
        for name, st in state_dict["state"].items():
            if name not in self.tensor_meta:
                raise ValueError(f"GORP.load_state_dict: state for unknown tensor {name!r}")
            self.state[name] = restore_tensor_state(st, devices[name])
        self.shared = {name: s.to(devices[name], copy=True) for name, s in state_dict["shared"].items()}
        self.tasks_completed = state_dict["tasks_completed"].clone()

    def _device_of(self, name: str) -> torch.device:
        group = self.group(self.tensor_meta[name][2])
        return group["params"][0].device

    # ------------------------------------------------------------------ detached groups
    def group(self, index: int) -> dict[str, Any]:
        """Param group ``index`` as numbered at construction, detached groups included."""
        if index < len(self.param_groups):
            return self.param_groups[index]
        return self.detached_groups[index - len(self.param_groups)]

    def detach_groups(self, role: str) -> list[dict[str, Any]]:
        """Take the groups of ``role`` out of ``param_groups`` (so that ``step()`` and a wrapper
        such as DeepSpeed no longer see them) and return them; their tensors keep their names,
        state and group numbers. They must be the last groups (``build_param_groups`` puts
        ``full`` last), so that the other groups keep their numbers."""
        if self.detached_groups:
            raise ValueError("GORP.detach_groups: groups were detached already")
        roles = [g["role"] for g in self.param_groups]
        first = next((i for i, r in enumerate(roles) if r == role), len(roles))
        if any(r != role for r in roles[first:]):
            raise ValueError(f"GORP.detach_groups: the {role!r} groups must come after every other group")
        self.detached_groups = self.param_groups[first:]
        del self.param_groups[first:]
        return self.detached_groups
