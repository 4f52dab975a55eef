"""Every change gorp_ds makes to DeepSpeed's own objects, one named function each.

DeepSpeed has no extension points for an optimizer that trains some tensors outside its flat
buffers (the projected ``full`` targets) or that must skip a step it has already begun (a
non-finite step under ZeRO-3), so the distributors replace a few methods on the *instances* they
were given (never on DeepSpeed's classes); the process group's start-up removes the CPU all-reduce
buffers DeepSpeed leaves in /dev/shm (:func:`unlink_cpu_allreduce_buffer`). Each function below says what DeepSpeed does there,
why gorp_ds needs to change it and which DeepSpeed version it was written against
(:data:`WRITTEN_AGAINST`). ``tests/integration/test_deepspeed_patches.py`` pins the DeepSpeed behaviour each
patch relies on, so that an upgrade that changes it fails there first, not in a training run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

# The DeepSpeed release every patch below was read against and tested with.
WRITTEN_AGAINST = "0.19.8"


class ProjectedTargets(Protocol):
    """What the step patches need from the owner of the projected ``full`` targets
    (:class:`~gorp_ds.zero.lowrank_targets.LowRankTargets`)."""

    optimizer: Any  # the GORP optimizer (``skip_next_step``)
    flat_low_rank: Tensor  # every target's R back to back (fp32)
    total_norm: Tensor | None  # the combined clipping norm of the step under way

    def reduce_(self) -> None: ...
    def squared_norm(self) -> Tensor: ...
    def step_(self, clip: float) -> None: ...
    def undo_refreshes(self) -> None: ...
    def reset(self) -> None: ...


class SkippableOptimizer(Protocol):
    """The wrapped optimizer (``GORP``): a step the trainer marked non-finite is skipped, and
    ``step()`` with every group empty counts it and clears the mark."""

    skip_next_step: bool

    def step(self, closure: Any = None) -> Any: ...


# ---------------------------------------------------------------------------- ZeRO-1/2


def combine_flat_norm_with_targets(zero_optimizer: Any, targets: ProjectedTargets) -> None:
    """``DeepSpeedZeroOptimizer.scaled_global_norm(norm_type=2)``.

    DeepSpeed: ``step()`` calls ``self.scaled_global_norm()`` once, before any update, and uses
    the result both to clip every partition's gradient (``unscale_and_clip_grads``: divided by
    ``max(1, (norm + 1e-6) / clip_grad)``) and as the reported ``get_global_grad_norm()``.
    Why: the projected targets' gradients ``R`` live outside DeepSpeed; clipping must use the norm
    of all gradients, ``√(‖g‖² + Σ‖R‖²)``. The combined norm is kept in ``targets.total_norm`` for
    the targets' own clipping in :func:`step_targets_after_flat_step`.
    Written against DeepSpeed 0.19.8."""
    original_norm = zero_optimizer.scaled_global_norm

    def scaled_global_norm(norm_type: int = 2) -> Tensor:
        base = torch.as_tensor(original_norm(norm_type), dtype=torch.float32, device=targets.flat_low_rank.device)
        targets.total_norm = torch.sqrt(base.square() + targets.squared_norm())
        return targets.total_norm

    zero_optimizer.scaled_global_norm = scaled_global_norm


def step_targets_after_flat_step(zero_optimizer: Any, targets: ProjectedTargets) -> None:
    """``DeepSpeedZeroOptimizer.step(closure=None)``.

    DeepSpeed: steps every param group's fp32 partition, all-gathers the bf16 weights, and leaves
    ``self.overflow`` True when it skipped the step (non-finite norm); ``self.clip_grad`` is the
    config's ``gradient_clipping``.
    Why: the projected targets step with DeepSpeed: their ``R`` is all-reduced before DeepSpeed's
    norm (which :func:`combine_flat_norm_with_targets` extends by ``‖R‖``), and after DeepSpeed's
    step they take theirs with the same clipping coefficient, unless DeepSpeed overflowed or the
    trainer marked the step non-finite (``GORP.skip_next_step``); then the projector refreshes
    made in the backward are undone. Every step ends with ``R`` emptied.
    Written against DeepSpeed 0.19.8."""
    original_step = zero_optimizer.step

    def step(closure: Any = None) -> Any:
        # A step the trainer marked non-finite (GORP.skip_next_step, reset by GORP.step) changes nothing here either.
        skip = bool(getattr(targets.optimizer, "skip_next_step", False))
        targets.reduce_()
        try:
            result = original_step(closure)
            if not zero_optimizer.overflow and not skip:
                targets.step_(float(zero_optimizer.clip_grad))
            else:
                targets.undo_refreshes()
        finally:
            targets.reset()
        return result

    zero_optimizer.step = step


# ---------------------------------------------------------------------------- ZeRO-3


@dataclass
class Stage3StepState:
    """What the ZeRO-3 step patches share during one ``step()``."""

    skip: bool = False  # the trainer marked this step non-finite: no sub-group steps
    stepped: bool = False  # the projected targets took their step (in ``_post_step``)


def combine_stage3_norm_with_targets(zero_optimizer: Any, targets: ProjectedTargets) -> None:
    """``DeepSpeedZeroOptimizer_Stage3._get_norm_groups()``.

    DeepSpeed: ``step()`` combines the returned per-sub-group norms with
    ``deepspeed.runtime.utils.combine_grad_norm_groups`` into the norm that clips every sub-group
    (``unscale_and_clip_grads``) and is reported by ``get_global_grad_norm()``.
    Why: as under ZeRO-1/2, clipping must use ``√(‖g‖² + Σ‖R‖²)``: ``‖R‖`` joins the groups, and
    the combined norm is kept in ``targets.total_norm`` for the targets' own clipping.
    Written against DeepSpeed 0.19.8."""
    from deepspeed.runtime.utils import combine_grad_norm_groups

    original_norm_groups = zero_optimizer._get_norm_groups

    def norm_groups() -> list[Tensor]:
        groups = list(original_norm_groups()) + [torch.sqrt(targets.squared_norm())]
        targets.total_norm = combine_grad_norm_groups(groups)
        return groups

    zero_optimizer._get_norm_groups = norm_groups


def skip_marked_stage3_steps(zero_optimizer: Any, state: Stage3StepState) -> None:
    """``DeepSpeedZeroOptimizer_Stage3._optimizer_step(sub_group_id)``.

    DeepSpeed: ``step()`` calls it once per sub-group, with only that sub-group's fp32 partition
    in the wrapped optimizer's ``param_groups``; the optimizer's ``step()`` runs inside.
    Why: ``GORP.step`` would skip a step marked non-finite in the first sub-group and clear the
    mark, stepping the others; so the whole step's sub-groups are skipped here instead.
    Written against DeepSpeed 0.19.8."""
    original_optimizer_step = zero_optimizer._optimizer_step

    def optimizer_step(sub_group_id: int) -> None:
        if not state.skip:
            original_optimizer_step(sub_group_id)

    zero_optimizer._optimizer_step = optimizer_step


def step_targets_in_stage3_post_step(zero_optimizer: Any, targets: ProjectedTargets, state: Stage3StepState) -> None:
    """``DeepSpeedZeroOptimizer_Stage3._post_step(timer_names)``.

    DeepSpeed: ``step()`` calls it after every sub-group's fp32 partition was stepped and copied to
    its bf16 partition, and not at all when it overflowed; inside, it re-gathers the persistent
    parameters (small ones kept whole on every rank) from their partitions.
    Why: the projected targets update their bf16 partitions themselves; stepping them here, before
    that re-gather, keeps a persistent target's gathered copy current.
    Written against DeepSpeed 0.19.8."""
    original_post_step = zero_optimizer._post_step

    def post_step(timer_names: Any) -> None:
        if not state.skip:
            targets.step_(float(zero_optimizer.clip_grad))
            state.stepped = True
        original_post_step(timer_names)

    zero_optimizer._post_step = post_step


def drive_stage3_step(zero_optimizer: Any, optimizer: SkippableOptimizer, targets: ProjectedTargets | None,
                      state: Stage3StepState) -> None:
    """``DeepSpeedZeroOptimizer_Stage3.step(closure=None)``.

    DeepSpeed: one optimizer step over every sub-group; it returns early, calling no
    ``_optimizer_step`` and no ``_post_step``, when the gradients overflowed.
    Why: reads the trainer's non-finite mark once for the whole step (:func:`skip_marked_stage3_steps`),
    counts a skipped step once (``GORP.step`` with every group empty), and, with projected
    targets, all-reduces ``R`` first and undoes the backward's projector refreshes when the targets
    did not step (:func:`step_targets_in_stage3_post_step`). Every step ends with ``R`` emptied.
    Written against DeepSpeed 0.19.8."""
    original_step = zero_optimizer.step

    def step(closure: Any = None) -> Any:
        state.skip, state.stepped = bool(optimizer.skip_next_step), False
        try:
            if targets is not None:
                targets.reduce_()
            result = original_step(closure)
            if state.skip:
                optimizer.step()  # counts the skipped step and clears the flag (every group is empty here)
            if targets is not None and not state.stepped:
                targets.undo_refreshes()
        finally:
            if targets is not None:
                targets.reset()
        return result

    zero_optimizer.step = step


def hook_gorp_into_stage3_step(zero_optimizer: Any, optimizer: SkippableOptimizer,
                               targets: ProjectedTargets | None) -> None:
    """The ZeRO-3 step patches together: non-finite steps skipped whole, and with projected
    targets the combined clipping norm and their step before the persistent re-gather."""
    state = Stage3StepState()
    skip_marked_stage3_steps(zero_optimizer, state)
    if targets is not None:
        combine_stage3_norm_with_targets(zero_optimizer, targets)
        step_targets_in_stage3_post_step(zero_optimizer, targets, state)
    drive_stage3_step(zero_optimizer, optimizer, targets, state)


def count_micro_steps_in_backward(engine: Any) -> None:
    """``DeepSpeedEngine.backward(loss, ...)`` of a ZeRO-3 engine.

    DeepSpeed: stage 3 counts micro-steps (the first micro-batch's gradient partition is copied,
    the others added) in ``DeepSpeedZeroOptimizer_Stage3.clear_backward_seen_flag()``, which
    ``engine.forward()`` calls; calling it again before the next backward changes nothing.
    Why: the trainer calls the module (or its decoder) directly, not ``engine.forward()``, so the
    count is advanced before each backward instead.
    Written against DeepSpeed 0.19.8."""
    zero_optimizer = engine.optimizer
    original_backward = engine.backward

    def backward(loss: Tensor, *args: Any, **kwargs: Any) -> Any:
        zero_optimizer.clear_backward_seen_flag()
        return original_backward(loss, *args, **kwargs)

    engine.backward = backward


@contextmanager
def stage3_module_hooks_removed(engine: Any) -> Iterator[None]:
    """Inside, the ZeRO-3 engine's per-module hooks are off; on exit they are registered again.

    DeepSpeed: ``DeepSpeedZeroOptimizer_Stage3.parameter_offload`` (a ``DeepSpeedZeRoOffload``)
    keeps the removable handles of its per-module forward and backward hooks in ``forward_hooks``
    and ``backward_hooks``; ``_register_deepspeed_module(module)`` registers them all again.
    Why: generation with the whole model gathered once (``Distributor.for_generation``) would
    otherwise pay a gather and release per module and token.
    Written against DeepSpeed 0.19.8."""
    offload = engine.optimizer.parameter_offload  # owner of stage 3's module hooks
    for hook in offload.forward_hooks + offload.backward_hooks:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        offload._register_deepspeed_module(offload.module)


# ------------------------------------------------------------------ CPU all-reduce buffers
# DeepSpeed's CPU accelerator (ops/csrc/cpu/comm/shm.cpp) gives each rank of a group whose ranks
# are all on one host (WORLD_SIZE == LOCAL_SIZE) a 66 MB POSIX shared-memory buffer for its
# low-latency all-reduce, named as below from the launcher's MASTER_ADDR and MASTER_PORT. The ranks
# open each other's by name while the backend starts (inside ``deepspeed.init_distributed``), and
# DeepSpeed never unlinks them: every launch left one file per rank in /dev/shm, killed or not.
CPU_ALLREDUCE_BUFFER = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


def unlink_cpu_allreduce_buffer(rank: int, world: int, barrier: Callable[[], None]) -> str | None:
    """Unlink this rank's buffer after ``barrier()`` (every rank has returned from the backend's
    start-up, so has mapped every buffer): the mappings stay valid, and the memory is freed when the
    last rank exits, however it exits (SIGKILL included). Only this group's own name is touched
    (its port and rank; other jobs on the machine rendezvous on other ports). ``barrier`` runs only
    where DeepSpeed makes the buffers (the CPU accelerator, every rank on this host: the same answer
    on every rank). Returns the path unlinked, or None."""
    import deepspeed

    if world == 1 or deepspeed.get_accelerator().device_name() != "cpu" or os.environ.get("LOCAL_SIZE") != str(world):
        return None
    barrier()
    path = CPU_ALLREDUCE_BUFFER.format(uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""),
                                       port=os.environ.get("MASTER_PORT", ""), rank=rank)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        return path
    return None
