"""``GORP``: the ``torch.optim.Optimizer`` of docs/algorithm.md §8.

The optimizer is thin: per batch of same-role, same-shape tensors it calls the stacked update
functions of :mod:`gorp_ds.optim.update` (the one implementation of the math; a single tensor is a
batch of one) and hands the result back to a driver, which applies it. *Where* tensors live is the
driver's business: the default driver below updates whole parameters in one process; the ZeRO
layer (``gorp_ds.zero``) installs a driver that updates the slices a rank owns. State is keyed by
module name and holds tensors only (per-name views into stacked buffers, :mod:`.stacks`), so
``state_dict`` is independent of parameter objects, batching and world size.

``full`` tensors can also be trained from low-rank gradients computed elsewhere (from activations,
``gorp_ds.zero.lowrank_targets``): ``refresh_members`` (projectors from ``G``, refresh steps only)
and ``low_rank_batch`` (the step from ``R``) run the same refresh and low-rank step as the path
from full gradients, on the same state; such groups are taken out of ``param_groups`` with
``detach_groups`` so that ``step()`` and DeepSpeed do not see them.

No host-device synchronisation on the step path, with two exceptions: the first projector refresh
of a task reads one success flag per batch back (it decides whether a ``full`` tensor can step at
all), and torch's ``eigh``/``svd`` check their own errors on refresh steps. Projector failures are
counted on the device and read when ``stats`` is asked for (logging intervals).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor

from ..log import get_logger
from .config import DEFAULTS
from .projector import (
    PROJECTOR_METHODS,
    GradientProducts,
    compute_projectors_op,
    project_gradient,
    projector_seed,
)
from .shared_space import extend_shared_space, oriented_moment, shared_side
from .stacks import StateStack, select, store
from .update import (
    PROTECTED_ROLES,
    ROLES,
    BatchUpdate,
    UpdateConfig,
    adam_step_,
    finish_refresh,
    low_rank_step_,
    protected_dense_step_,
    refresh_projectors,
)

log = get_logger(__name__)


def restore_tensor_state(state: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Copy of a saved per-tensor state: the step counter stays on the CPU, everything else
    (the projector failure counter included) goes to ``device``."""
    return {k: v.clone() if k == "step" else v.to(device, copy=True) for k, v in state.items()}


def partition_by_step(steps: list[int]) -> list[tuple[int, list[int]]]:
    """``[(step, member positions)]``: members whose counters agree step together (normally all)."""
    parts: dict[int, list[int]] = {}
    for i, step in enumerate(steps):
        parts.setdefault(step, []).append(i)
    return list(parts.items())


class RefreshTimer:
    """Time spent computing projectors. With ``synchronize`` (profiling) it is wall time between
    device synchronisations; otherwise CUDA events, read only when :meth:`seconds` is called (at
    logging intervals), or plain wall time on the CPU."""

    def __init__(self) -> None:
        self._seconds = 0.0
        self._events: list[tuple[Any, Any]] = []

    @contextmanager
    def __call__(self, device: torch.device, synchronize: bool) -> Iterator[None]:
        cuda = device.type == "cuda"
        if cuda and not synchronize:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
            return
        if cuda:
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(device)
        self._seconds += time.perf_counter() - began

    def seconds(self) -> float:
        for start, end in self._events:
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1000.0
        self._events.clear()
        return self._seconds


class StepDriver(Protocol):
    """Runs one optimizer step for one param group (single process, ZeRO partition, …)."""

    def step_group(self, optimizer: GORP, group: dict[str, Any]) -> None: ...


class LocalDriver:
    """Whole parameters in one process: the reference path. Protected tensors of one shape are
    stacked (one copy of their gradients) and updated as one batch; ``plain`` tensors as lists."""

    def __init__(self) -> None:
        self._batches: dict[int, list[list[int]]] = {}  # group index -> positions of same-shape tensors

    def _shape_batches(self, optimizer: GORP, index: int, group: dict[str, Any]) -> list[list[int]]:
        if index not in self._batches:
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for position, name in enumerate(group["names"]):
                by_shape.setdefault(optimizer.tensor_meta[name][1], []).append(position)
            self._batches[index] = list(by_shape.values())
        return self._batches[index]

    def step_group(self, optimizer: GORP, group: dict[str, Any]) -> None:
        cfg = UpdateConfig.from_group(group)
        params, names = group["params"], group["names"]
        for param, name in zip(params, names):
            if param.grad is not None and param.grad.is_sparse:
                raise ValueError(f"GORP: sparse gradient for {name!r} is not supported")
        if cfg.role == "plain":
            held = [i for i, p in enumerate(params) if p.grad is not None]
            grads = [params[i].grad if params[i].grad.dtype == torch.float32 else params[i].grad.float() for i in held]
            for update in optimizer.update_batch([names[i] for i in held], grads, cfg):
                update.apply_([params[held[j]] for j in update.index], cfg)
            return
        index = optimizer.tensor_meta[names[0]][2]
        for positions in self._shape_batches(optimizer, index, group):
            held = [i for i in positions if params[i].grad is not None]
            if not held:
                continue
            grads = torch.stack([params[i].grad for i in held]).float()  # (B, m, n) fp32
            for update in optimizer.update_batch([names[i] for i in held], grads, cfg):
                update.apply_([params[held[j]] for j in update.index], cfg)


class GORP(torch.optim.Optimizer):
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
        # Groups stepped by an owner outside ``step()`` (``detach_groups``): the ``full`` tensors
        # trained from projected gradients. Their state is here like every other tensor's.
        self.detached_groups: list[dict[str, Any]] = []
        # Run statistics (not state). ``time_refreshes``: time refreshes between device syncs
        # (profiling); otherwise CUDA events are used, read only when ``stats`` is asked for.
        self.time_refreshes = False
        self.refresh_count = 0  # member refreshes attempted (host counter, free to read)
        self._refresh_timer = RefreshTimer()
        self._failures: dict[torch.device, Tensor] = {}  # failed refreshes this run, per device
        self._failures_reported = 0
        # Derived, never stored: stacked state of each batch of same-shape tensors (``stacks.py``).
        self._stacks: dict[tuple[str, ...], StateStack] = {}
        # Set by the trainer when this step's loss or gradients are non-finite: the next step()
        # then changes nothing (moments, projectors, step counters, weights) and only counts the skip.
        self.skip_next_step = False
        self.skipped_steps = 0

    # ------------------------------------------------------------------ validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group`` plus GORP's validation and name registration."""
        if getattr(self, "detached_groups", None):
            raise ValueError("GORP.add_param_group: groups were detached (detach_groups); add groups before that")
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
            self.skipped_steps += 1
            return loss
        for group in self.param_groups:
            self.driver.step_group(self, group)
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
        """``full`` members ``index`` (all at ``step``) from their full gradients: refresh if due,
        ``R = project(G)``, then the low-rank step (the path of full gradients in flat buffers)."""
        if step % cfg.update_gap == 0:
            kept = self._refresh_partition(stack, grad, step, index, cfg)
            if not kept:
                return None
            if len(kept) < len(index):
                grad = select(grad, [index.index(i) for i in kept], len(index))
                shared = select(shared, [index.index(i) for i in kept], len(index)) if shared is not None else None
                index = kept
        projector = select(stack.buffers["projector"], index, len(stack.names))
        low_rank = project_gradient(grad, projector)  # (B, m, k) right or (B, k, n) left
        return self._low_rank_partition(stack, low_rank, shared, step, index, cfg)

    def _refresh_partition(self, stack: StateStack, grad: Tensor | None, step: int, index: list[int],
                           cfg: UpdateConfig, products: GradientProducts | None = None) -> list[int]:
        """New projectors for members ``index`` (all at ``step``, a refresh step) from their full
        gradients ``grad`` (``(len(index), m, n)``), or from ``products`` of those gradients with
        thin matrices (randomized projector only). Returns the members that have a projector now
        (all, except members whose first refresh of the task failed)."""
        batch, buffers = len(stack.names), stack.buffers
        previous = select(buffers["projector"], index, batch) if step > 0 else None
        task = int(self.tasks_completed)  # CPU tensor
        seeds = [projector_seed(stack.names[i], task, step // cfg.update_gap) for i in index]
        device = grad.device if grad is not None else products.device
        with self._refresh_timer(device, self.time_refreshes):
            if products is None:
                projector, ok = refresh_projectors(grad, previous, cfg, seeds)
            else:
                new, ok = compute_projectors_op(products.apply, products.apply_t, (len(index), *stack.shape), cfg.rank,
                                                seeds=seeds, oversample=cfg.oversample, power_iters=cfg.power_iters,
                                                device=device)
                projector, ok = finish_refresh(new, ok, previous, cfg)
        self.refresh_count += len(index)
        failed = ok.logical_not()
        failures = select(buffers["projector_failures"], index, batch)
        failures.add_(failed)
        store(buffers["projector_failures"], index, failures)
        total = self._failures.get(device)
        if total is None:
            total = self._failures[device] = torch.zeros((), dtype=torch.int64, device=device)
        total.add_(failed.sum())
        if previous is None:
            # First refresh of the task: there is no projector to fall back on, so the host must
            # know which members have one at all (one read per batch and task).
            good = [j for j, flag in enumerate(ok.tolist()) if flag]
            if len(good) < len(index):
                projector = select(projector, good, len(index)) if good else projector
                index = [index[j] for j in good]
            if not index:
                return []
            stack.attach_low_rank(self.state, index)
        store(buffers["projector"], index, projector)
        return index

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

    # ------------------------------------------------------------------ full tensors from projected gradients
    # The path where ``R`` is computed outside the optimizer (from activations, gorp_ds.zero.lowrank_targets):
    # the caller asks which members refresh, hands their full gradients to ``refresh_members`` on refresh
    # steps only, and every step hands ``R`` to ``low_rank_batch``. Same state, same functions as above.

    def full_batch(self, names: tuple[str, ...], cfg: UpdateConfig, device: torch.device) -> StateStack:
        """The bound state stack of a batch of same-shape ``full`` tensors (built on first use)."""
        stack = self._stack(tuple(names), cfg)
        stack.bind(self.state, device)
        return stack

    def refresh_due(self, names: tuple[str, ...], cfg: UpdateConfig, device: torch.device) -> list[bool]:
        """Per member: does its next step refresh the projector (step counter a multiple of T)?
        Host-side (CPU step counters): no device sync."""
        return [step % cfg.update_gap == 0 for step in self.full_batch(names, cfg, device).steps()]

    def refresh_members(self, names: tuple[str, ...], index: list[int], grads: Tensor | None, cfg: UpdateConfig,
                        products: GradientProducts | None = None) -> list[int]:
        """New projectors for members ``index`` of the batch ``names`` from their full gradients
        ``grads`` (``(len(index), m, n)``, fp32, already averaged over data-parallel ranks), or,
        with ``grads=None``, from ``products`` of those gradients (randomized projector; the
        members must share their step counter); the members' next step must be a refresh step.
        Returns the members that have a projector now."""
        stack = self.full_batch(names, cfg, grads.device if grads is not None else products.device)
        steps = stack.steps()
        updated: list[int] = []
        parts = partition_by_step([steps[i] for i in index])
        if products is not None and (len(parts) > 1 or cfg.projector != "randomized"):
            raise ValueError("GORP.refresh_members: products need one step counter and the randomized projector")
        for step, part in parts:
            members = [index[j] for j in part]
            assert step % cfg.update_gap == 0, "refresh_members called on a step without a refresh"
            grad = select(grads, part, len(index)) if grads is not None else None
            updated += self._refresh_partition(stack, grad, step, members, cfg, products)
        return updated

    def projector_stack(self, names: tuple[str, ...], cfg: UpdateConfig, device: torch.device) -> Tensor:
        """``(B, n, k)`` or ``(B, m, k)`` projectors of the batch (a view; garbage for members
        without one: see :meth:`has_projector`)."""
        return self.full_batch(names, cfg, device).buffers["projector"]

    def has_projector(self, name: str) -> bool:
        return "projector" in self.state.get(name, {})

    def low_rank_batch(self, names: tuple[str, ...], low_rank: Tensor, cfg: UpdateConfig) -> list[BatchUpdate]:
        """The low-rank step of the batch ``names`` from ``R`` (``(B, m, k)`` or ``(B, k, n)``, fp32,
        averaged and clipped); members without a projector are left out (their step is skipped)."""
        stack = self.full_batch(names, cfg, low_rank.device)
        shared_all = stack.shared_stack(self.shared)
        batch, updates = len(names), []
        for step, index in partition_by_step(stack.steps()):
            index = [i for i in index if self.has_projector(names[i])]
            if not index:
                continue
            shared = select(shared_all, index, batch) if shared_all is not None else None
            updates.append(self._low_rank_partition(stack, select(low_rank, index, batch), shared, step, index, cfg))
        return updates

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
        return {"refreshes": self.refresh_count, "refresh_seconds": self._refresh_timer.seconds(),
                "projector_failures": self.poll_failures(), "skipped_steps": self.skipped_steps}

    def poll_failures(self) -> int:
        """Projector failures of this run so far (a device read); logs a warning naming the tensors
        when there are new ones since the last call."""
        total = sum(int(count) for count in self._failures.values())
        if total > self._failures_reported:
            failing = [name for name, state in self._named_states()
                       if "projector_failures" in state and int(state["projector_failures"]) > 0]
            log.warning(f"{total - self._failures_reported} projector refresh(es) failed (non-finite gradient or "
                        f"decomposition); the previous projectors were kept. Tensors with failures this task: "
                        f"{', '.join(failing) or 'none held'}")
            self._failures_reported = total
        return total

    # ------------------------------------------------------------------ tasks
    @torch.no_grad()
    def end_task(self) -> dict[str, int]:
        """docs/algorithm.md §3–4: extend each protected tensor's S from its first moment, then reset moments,
        projectors and step counters of every group (S is kept). Returns ``{name: columns of S}``
        for the tensors whose state this process holds."""
        for name, state in self._named_states():
            role, shape, group_index = self.tensor_meta[name]
            threshold = float(self.group(group_index)["shared_threshold"])
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
        for group, saved in zip(groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "names"})
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
