"""``full`` targets trained from projected gradients, owned outside DeepSpeed's flat buffers.

Between projector refreshes a ``full`` tensor needs only its low-rank gradient ``R`` (``m × k`` or
``k × n``), and that comes straight from the layer's activations (``gorp_ds.optim.lowrank_grad``)
in the backward of its Linear (``gorp_ds.zero.projected_linear``). This module owns those tensors:

- **Gradients.** Each micro-batch's backward adds ``R`` into one fp32 buffer holding every target's
  ``R`` back to back; at the optimizer step one all-reduce sums it over the data-parallel group
  (``Σ B·m·k·4`` bytes, independent of the world size). No ``m × n`` gradient exists.
- **Refresh steps** (every ``update_gap`` steps per tensor, when ``GORP.refresh_due`` says:
  ``gorp_ds.optim.refresh_schedule``; only the due members of a batch refresh) come in two kinds, chosen per batch of
  same-shape targets (``refresh_from``):

  - *Batched from G* (``"gradient"``; ``"auto"`` when the batch's due ``G``'s fit
    ``refresh_memory_mib``): the backward forms ``G = δᵀ X`` (fp32) into a ``(c, m, n)`` stack;
    once the step's last micro-batch has completed ``c`` layers' ``G`` (``c`` = as many as fit the
    memory budget; all 30 gate_proj of a 135M model, a few at 7B), the stack is all-reduced (one
    collective) and refreshed **as one batch** by the optimizer's ``refresh_members`` (the batched
    range finder: a fixed number of kernels and host syncs per refresh, not per layer); then
    ``R = project(G)`` is written by rank 0 and the stack is reused. With accumulation, every due
    target's ``G`` is held across the step's micro-batches (``m·n·4`` bytes each).
  - *Sketch* (``"sketch"``; ``"auto"`` when the due ``G``'s would not fit; one micro-batch per step
    and the randomized projector): no ``G`` at all. The randomized range finder touches ``G`` only
    through thin products, and ``G v = δᵀ(X v)``, ``Gᵀ u = Xᵀ(δ u)`` come from the activations in the
    layer's backward, each all-reduced over the data-parallel group: ``2 + 2·power_iters``
    collectives of ``(m or n) × (k + oversample)`` per target and refresh, never an ``m × n`` one. It
    is the same algorithm on the same test matrices, so the projector equals the one from ``G`` up to
    rounding; but it runs layer by layer (the activations exist only in that layer's backward), so
    each layer pays the range finder's kernels and syncs: cheaper in memory and bytes, dearer in time.
- **Masters, replicated.** Every rank applies the same rank-k update from the same all-reduced ``R``
  to its own copy, so weights need no gather at all. The fp32 master of a bf16 weight is stored as
  the weight plus its 16 low bits (``split_master``): exact fp32 arithmetic, 2 extra bytes per
  element, and the bf16 weight is always the rounded master (no drift). An fp32 weight is its own
  master. Sharding fp32 masters instead would cost ``4/W`` bytes per element but an ``m × n``
  all-gather of the bf16 weights after every step; at W = 2 it saves nothing (2 bytes either way).
- **Masters under ZeRO-3, sharded.** DeepSpeed partitions the bf16 weights like every other
  parameter (the constructor's ``partition`` gives each weight's flat slice on this rank, elements
  ``[start, end)``); each rank keeps the 16 low bits of its slice only and applies the replicated
  rank-k update to its slice: the rows of ``left`` that the slice touches times ``right``
  (``(rows, n)`` fp32, one matrix at a time), cut to the slice. Nothing is gathered for the update.
- **Clipping.** The global norm for ``gradient_clipping`` is ``√(‖g‖² + Σ‖R‖²)``: DeepSpeed's norm of
  the LoRA/``plain`` gradients combined with the norm of the ``full`` targets' projected gradients
  ``R = G Q`` (or ``Pᵀ G``; before the projection off S). ``R`` is clipped with DeepSpeed's
  coefficient ``max(1, (norm + 1e-6) / clip)``.

State lives in the ``GORP`` optimizer as for every other tensor (keyed by module name), so
checkpoints and ``end_task`` treat these tensors like the rest.

Two steps build it, because DeepSpeed must not see these weights as trainable while the owner needs
the engine's device placement, data-parallel group and micro-step counter: :func:`claim_targets`
(before ``deepspeed.initialize``) stops the weights requiring gradients and finds their Linear
modules; :class:`LowRankTargets` (after it) is then built complete, buffers included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..log import get_logger
from ..optim.gorp import GORP
from ..optim.lowrank_grad import accumulate_full_gradient_, accumulate_low_rank_
from ..optim.param_group import UpdateConfig
from ..optim.projector import GradientProducts, Side, project_gradient, projection_side
from ..optim.stacks import select
from ..optim.update import BatchUpdate, LowRankStep, apply_low_rank_member_, low_rank_factors
from ..optim.weight_update import weight_update
from . import projected_linear, split_master

log = get_logger(__name__)
AllReduce = Callable[[Tensor], None]
# The split-master update forms ``left @ right`` for several targets at once ((c, m, n) fp32): at most
# this many bytes of them (after the backward, when activations are gone; 256 MiB keeps 7B's
# 11008 × 4096 one at a time).
UPDATE_BYTES = 256 * 2**20
# The fused (``torch.compile``d) split-master update pays for its compilation (8–16 s in a fresh
# process, measured on one H200) where the update's memory traffic matters: 16 bytes per element
# against the eager path's ~90. Below this many ``full``-target elements in all (135M's 30 gate_proj:
# 26.5M, 0.5 ms of extra traffic per step) the eager path is used; above (7B's 32 gate_proj: 1.44G,
# ~25 ms per step) the fused one.
FUSED_UPDATE_MIN_ELEMENTS = 2**28
# ZeRO-3: a weight's slice on this rank, as (flat view of the partition's valid elements, start, end).
Partition = Callable[[nn.Parameter], tuple[Tensor, int, int]]


@dataclass
class Member:
    name: str
    key: int  # position in LowRankTargets.members
    batch: int  # position in LowRankTargets.batches
    index: int  # position in its batch
    weight: nn.Parameter
    remainder: Tensor | None  # int16 low bits of the fp32 master (bf16 weights), None for fp32 weights
    start: int  # the elements [start, end) of the flattened weight held here (ZeRO-3: this rank's slice)
    end: int
    grad: Tensor | None = None  # G (fp32, m × n) while a refresh step's micro-batches run
    calls: int = 0  # backward calls since the last step
    refreshed: bool = False
    slot: int | None = None  # position of ``grad`` in its batch's refresh stack (one micro-batch per step)


@dataclass
class Batch:
    """Same-shape targets of one param group: stepped together, ``R`` a ``(B, …)`` view."""

    names: tuple[str, ...]
    shape: tuple[int, int]
    side: Side
    group: dict[str, Any]
    members: list[Member] = field(default_factory=list)
    low_rank: Tensor | None = None  # (B, m, k) or (B, k, n) view of the flat R buffer
    # Per step (see LowRankTargets._plan): how this batch refreshes and what is pending.
    mode: str = "gradient"  # "gradient" (batched from G) or "sketch"
    chunk: int = 1  # members refreshed together from G (memory budget)
    waiting: int = 0  # due members whose G is not refreshed yet
    pending: list[Member] = field(default_factory=list)  # complete G's not refreshed yet
    stack: Tensor | None = None  # (chunk, m, n) fp32 G's of the pending members (one micro-batch per step)
    basis: Tensor | None = None  # projectors in the activations' dtype, cast once per step


@dataclass(frozen=True)
class ClaimedTargets:
    """The ``full`` groups taken out of the optimizer before DeepSpeed sees the model: their
    weights no longer require a gradient (so DeepSpeed builds no flat buffer, gradient hook or
    fp32 partition for them), ``modules`` maps each name to its ``nn.Linear`` and ``shapes`` to
    its weight's whole ``(m, n)`` (ZeRO-3 leaves an empty placeholder in the parameter)."""

    groups: list[dict[str, Any]]
    modules: dict[str, nn.Linear]
    shapes: dict[str, tuple[int, int]]


def claim_targets(groups: list[dict[str, Any]], model: nn.Module) -> ClaimedTargets:
    """Claim the ``full`` tensors of ``groups`` (detached from the optimizer) for projected
    gradients: each must be the weight of a plain Linear of ``model``
    (:class:`~.projected_linear.ProjectedLinearError` otherwise)."""
    names = [name for group in groups for name in group["names"]]
    modules = projected_linear.linear_modules(model, names)
    shapes = {}
    for group in groups:
        for name, param in zip(group["names"], group["params"]):
            if modules[name].weight is not param:
                raise ValueError(f"full-rank target {name!r}: the optimizer's tensor is not the module's weight")
            shapes[name] = tuple(param.shape)
            param.requires_grad_(False)  # no weight gradient from autograd; DeepSpeed never sees it
    return ClaimedTargets(groups, modules, shapes)


class LowRankTargets:
    """Owner of the claimed ``full`` tensors under data parallelism. Build it once the model is
    placed (after ``deepspeed.initialize`` moved it): buffers go to the weights' device, and a
    bf16 weight's master starts equal to it. ``rank``/``world``/``all_reduce``: the data-parallel
    group (the whole world); ``is_boundary``: whether the micro-batch under way is the step's last;
    ``accumulation``: micro-batches per step; ``partition`` (ZeRO-3): each weight's slice on this
    rank, whose masters are then the slice's only."""

    def __init__(self, optimizer: GORP, claimed: ClaimedTargets, *, rank: int, world: int,
                 all_reduce: AllReduce, is_boundary: Callable[[], bool], accumulation: int,
                 partition: Partition | None = None, refresh_from: str = "auto",
                 refresh_memory_mib: float = 1024.0) -> None:
        self.optimizer, self.rank, self.world = optimizer, rank, world
        # "auto" (batched from G where the due G's fit the budget, else the sketch), "sketch", "gradient"
        self.refresh_from = refresh_from
        self.refresh_bytes = int(refresh_memory_mib * 2**20)  # transient fp32 G's of one batched refresh
        self.update_bytes = UPDATE_BYTES  # transient fp32 products of one batched master update
        self.all_reduce, self.is_boundary, self.accumulation = all_reduce, is_boundary, accumulation
        self.partition = partition
        self.modules = claimed.modules
        self.batches: list[Batch] = []
        self.members: list[Member] = []
        by_key: dict[tuple[int, tuple[int, int]], Batch] = {}
        for group in claimed.groups:
            for name, param in zip(group["names"], group["params"]):
                shape = claimed.shapes[name]
                batch = by_key.get((id(group), shape))
                if batch is None:
                    batch = by_key[(id(group), shape)] = Batch((), shape, projection_side(shape), group)
                    self.batches.append(batch)
                batch.names += (name,)
                member = self._member(name, len(self.members), self.batches.index(batch), len(batch.members), param)
                batch.members.append(member)
                self.members.append(member)
        self.fused_update = sum(m.weight.numel() for m in self.members) >= FUSED_UPDATE_MIN_ELEMENTS
        # R of every target back to back, fp32; each batch's R is a (B, m, k) or (B, k, n) view of it.
        sizes = [len(b.names) * self._low_rank_numel(b) for b in self.batches]
        self.flat_low_rank = torch.zeros(sum(sizes), dtype=torch.float32, device=self.members[0].weight.device)
        offset = 0
        for batch, size in zip(self.batches, sizes):
            m, n = batch.shape
            k = self.cfg(batch).rank
            inner = (m, k) if batch.side == "right" else (k, n)
            batch.low_rank = self.flat_low_rank[offset : offset + size].view(len(batch.names), *inner)
            offset += size
        self._due: list[list[bool]] | None = None  # per batch and member, for the step under way
        self._projectors: list[Tensor] = []
        self._replaced: list[Tensor | None] = []
        self._materialized: dict[str, Tensor] = {}
        self.total_norm: Tensor | None = None
        projected_linear.install(self.modules, {m.name: m.key for m in self.members}, self)

    def _member(self, name: str, key: int, batch: int, index: int, weight: nn.Parameter) -> Member:
        """A target with the elements this rank holds and, for a bf16 weight, the zero low bits of
        its master (the master starts equal to the weight)."""
        if weight.dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"full-rank target {name!r} is {weight.dtype}; projected gradients need bf16 or fp32")
        if self.partition is None:
            held, start, end = weight.data, 0, weight.numel()
        else:
            held, start, end = self.partition(weight)
        remainder = split_master.zero_remainder(held) if weight.dtype == torch.bfloat16 else None
        return Member(name, key, batch, index, weight, remainder, start, end)

    def _low_rank_numel(self, batch: Batch) -> int:
        m, n = batch.shape
        return self.cfg(batch).rank * (m if batch.side == "right" else n)

    def cfg(self, batch: Batch) -> UpdateConfig:
        """The batch's group hyperparameters, as the optimizer parsed them (current ``lr`` included)."""
        return self.optimizer.group_config(batch.group)

    # ------------------------------------------------------------------ backward (the gradient sink)
    def _plan(self) -> list[list[bool]]:
        """Which members refresh in the step under way (decided at its first backward, from the
        optimizer's CPU step counters: after ``end_task`` or a checkpoint load too)."""
        if self._due is None:
            device = self.flat_low_rank.device
            self._due = [self.optimizer.refresh_due(b.names, self.cfg(b), device) for b in self.batches]
            # The stacked projector buffers (refreshes write into them in place): looked up once per step.
            self._projectors = [self.optimizer.projector_stack(b.names, self.cfg(b), device) for b in self.batches]
            # Refreshes run inside the backward, before the trainer may decide to skip the step (a
            # non-finite loss or gradient): keep the projectors they replace ((B, n|m, k): small).
            self._replaced = [p.clone() if any(due) else None for p, due in zip(self._projectors, self._due)]
            for batch, due in zip(self.batches, self._due):
                self._plan_batch(batch, sum(due))
        return self._due

    def _plan_batch(self, batch: Batch, due: int) -> None:
        """How ``batch`` refreshes this step: from the sketch when asked for (or, under ``auto``,
        when its ``due`` members' ``G`` would not fit the budget together), else batched from ``G``
        in chunks of as many members as fit the budget (at least one)."""
        m, n = batch.shape
        g_bytes = m * n * 4
        batch.basis, batch.pending, batch.waiting = None, [], due
        batch.chunk = max(1, min(due, self.refresh_bytes // g_bytes))
        sketch = self._sketch_possible(batch) and (
            self.refresh_from == "sketch" or (self.refresh_from == "auto" and due * g_bytes > self.refresh_bytes))
        batch.mode = "sketch" if sketch else "gradient"

    @torch.no_grad()
    def undo_refreshes(self) -> None:
        """Put back the projectors this step's refreshes replaced (a skipped step changes nothing;
        a member's first refresh of a task needs no undo: its next step refreshes from scratch)."""
        for projectors, replaced in zip(self._projectors or [], self._replaced or []):
            if replaced is not None:
                projectors.copy_(replaced)

    @torch.no_grad()
    def linear_backward(self, key: int, x: Tensor, delta: Tensor) -> None:
        member = self.members[key]
        batch = self.batches[member.batch]
        member.calls += 1
        if not self._plan()[member.batch][member.index]:
            if batch.basis is None or batch.basis.dtype != x.dtype:  # one cast per batch and step, not per layer
                batch.basis = self._projectors[member.batch].to(x.dtype)
            accumulate_low_rank_(batch.low_rank[member.index], x, delta, batch.basis[member.index], batch.side)
            return
        if batch.mode == "sketch":
            self._refresh_from_activations(member, batch, x, delta)
            return
        if member.grad is None:
            member.grad = self._gradient_buffer(member, batch, x)
            member.grad.copy_(delta.mT @ x)  # G = δᵀ X, rounded like autograd's weight gradient
        else:
            accumulate_full_gradient_(member.grad, x, delta)
        if self.is_boundary():  # the step's last micro-batch: this layer's G is complete here
            batch.pending.append(member)
            if len(batch.pending) == min(batch.chunk, batch.waiting):
                self._refresh_pending(batch)

    def _gradient_buffer(self, member: Member, batch: Batch, x: Tensor) -> Tensor:
        """Where ``member``'s ``G`` (fp32, ``m × n``) is formed: with one micro-batch per step, the
        next slot of the batch's refresh stack (allocated once per step, reused chunk after chunk);
        with accumulation, a tensor of its own (every due ``G`` lives until the last micro-batch)."""
        if self.accumulation > 1:
            return torch.empty(batch.shape, dtype=torch.float32, device=x.device)
        if batch.stack is None:
            batch.stack = torch.empty((batch.chunk, *batch.shape), dtype=torch.float32, device=x.device)
        # Backward meets layers last to first: filling the chunk from its end puts the G's in
        # ascending member order, so the refresh takes the stack as a view (else it stacks a copy).
        member.slot = min(batch.chunk, batch.waiting) - 1 - len(batch.pending)
        return batch.stack[member.slot]

    def _sketch_possible(self, batch: Batch) -> bool:
        """Refresh from products of ``G`` through the activations (no ``G``) is possible when the
        step has one micro-batch (its ``X`` and ``δ`` are all of ``G``) and the projector is
        the randomized range finder, which touches ``G`` only through thin products."""
        return self.accumulation == 1 and self.cfg(batch).projector == "randomized"

    def _summed(self, local: Tensor) -> Tensor:
        """``local`` summed over ranks and divided by the world size (in place)."""
        if self.world > 1:
            self.all_reduce(local)
            local.div_(self.world)
        return local

    def _refresh_from_activations(self, member: Member, batch: Batch, x: Tensor, delta: Tensor) -> None:
        """The distributed randomized range finder of ``G = (1/W) Σ_r δ_rᵀ X_r``: every product
        ``G v = δᵀ(X v)`` or ``Gᵀ u = Xᵀ(δ u)`` is formed from this rank's activations and
        all-reduced (``(m or n) × l``, ``l = k + oversample``; ``2 + 2·power_iters`` of them), then
        ``R = δᵀ(X Q)`` (or ``(δ P)ᵀ X``) accumulates like on any other step."""
        def apply(v: Tensor) -> Tensor:  # (1, n, l) -> (1, m, l)
            return self._summed((delta.mT @ (x @ v[0].to(x.dtype))).float()).unsqueeze(0)

        def apply_t(u: Tensor) -> Tensor:  # (1, m, l) -> (1, n, l)
            return self._summed((x.mT @ (delta @ u[0].to(x.dtype))).float()).unsqueeze(0)

        cfg = self.cfg(batch)
        products = GradientProducts(apply, apply_t, x.device)
        kept = self.optimizer.refresh_members(batch.names, [member.index], None, cfg, products)
        if kept:  # a local R, averaged by the all-reduce of R like on steps without a refresh
            projector = self._projectors[member.batch][member.index]
            accumulate_low_rank_(batch.low_rank[member.index], x, delta, projector, batch.side)

    def _refresh_pending(self, batch: Batch) -> None:
        """Refresh the pending members of ``batch`` as one batch from their complete ``G``'s: one
        all-reduce of the ``(c, m, n)`` stack, one batched ``refresh_members``, then ``R = project(G)``."""
        members = sorted(batch.pending, key=lambda m: m.index)  # the optimizer's batch order
        batch.pending = []
        batch.waiting -= len(members)
        if all(m.slot == j for j, m in enumerate(members)):
            grads = batch.stack[: len(members)]
        else:  # accumulation (G's of their own), or layers met in an unusual order
            grads = torch.stack([m.grad for m in members])
        for m in members:
            m.grad, m.slot = None, None
        grads = self._summed(grads)  # the m × n collective of a refresh step, once per chunk
        kept = set(self.optimizer.refresh_members(batch.names, [m.index for m in members], grads, self.cfg(batch)))
        projectors = self._projectors[members[0].batch]
        for j, m in enumerate(members):
            m.refreshed = True
            if m.index in kept and self.rank == 0:  # R of the averaged G, summed once by the all-reduce of R
                batch.low_rank[m.index].copy_(project_gradient(grads[j], projectors[m.index]))
        if batch.waiting == 0:
            batch.stack = None  # the step's last chunk: free the stack

    # ------------------------------------------------------------------ the optimizer step
    def reduce_(self) -> None:
        """Sum ``R`` over the data-parallel group (average of the ranks' micro-batch sums)."""
        wrong = [m for m in self.members if m.calls != self.accumulation]
        if wrong:
            m = wrong[0]
            raise RuntimeError(
                f"full-rank target {m.name!r} ran its backward {m.calls} times in a step of {self.accumulation} "
                "micro-batches; projected gradients need exactly one call per micro-batch (a module applied "
                "twice, or not at all); use --full-gradients flat for such a model")
        if self.world == 1:
            return
        if any(m.refreshed for m in self.members):  # refreshed members' R is an average already (rank 0)
            for batch in self.batches:
                for m in batch.members:
                    if not m.refreshed:
                        batch.low_rank[m.index].div_(self.world)
        else:
            self.flat_low_rank.div_(self.world)
        self.all_reduce(self.flat_low_rank)

    def squared_norm(self) -> Tensor:
        """``Σ‖R‖²`` of the step (after :meth:`reduce_`), on the device."""
        return self.flat_low_rank.square().sum()

    @torch.no_grad()
    def step_(self, clip: float) -> None:
        """The low-rank step of every target from its (clipped) ``R``, applied on this rank."""
        self._materialized.clear()
        if clip > 0.0 and self.total_norm is not None:
            coefficient = torch.clamp((self.total_norm + 1e-6) / clip, min=1.0)  # DeepSpeed's
            self.flat_low_rank.mul_(1.0 / coefficient)
        for batch in self.batches:
            cfg = self.cfg(batch)
            for update in self.optimizer.low_rank_batch(batch.names, batch.low_rank, cfg):
                assert isinstance(update.step, LowRankStep)
                split = []  # positions of whole bf16 matrices with split masters: updated together
                for position, j in enumerate(update.index):
                    if not self._apply(batch.members[j], update.step, position, cfg):
                        split.append(position)
                if split:
                    self._apply_split(batch, update, split, cfg)

    def _apply_split(self, batch: Batch, update: BatchUpdate, positions: list[int], cfg: UpdateConfig) -> None:
        """The split-master update of the members at ``positions`` of ``update``, as few calls as the
        ``(c, m, n)`` fp32 products allow (``update_bytes``): all 30 gate_proj of a 135M model in
        one call, one at a time at 7B."""
        left, right = low_rank_factors(update.step)  # (B, m, k), (B, k, n)
        m, n = batch.shape
        chunk = max(1, self.update_bytes // (m * n * 4))
        members = [batch.members[update.index[p]] for p in positions]
        scalars = (split_master.scalars(cfg.decay, update.step.step_size, left.device)
                   if left.is_cuda and self.fused_update else None)
        for s in range(0, len(positions), chunk):
            part = positions[s : s + chunk]  # consecutive (the usual case): views, no copy
            lefts, rights = select(left, part, len(left)), select(right, part, len(right))
            chunk_members = members[s : s + chunk]
            split_master.update_([self._weight(mb).view(m, n) for mb in chunk_members],
                                 [mb.remainder.view(m, n) for mb in chunk_members], lefts, rights,
                                 cfg.decay, update.step.step_size, scalars, fused=self.fused_update)

    def _weight(self, member: Member) -> Tensor:
        """The weight this rank updates: the whole ``m × n`` matrix, or under ZeRO-3 the flat view
        of its partition's valid elements ``[member.start, member.end)`` (looked up at each use:
        DeepSpeed re-points a partition's storage when it steps)."""
        if self.partition is None:
            return member.weight.data
        return self.partition(member.weight)[0]

    def _apply(self, member: Member, update: LowRankStep, position: int, cfg: UpdateConfig) -> bool:
        """Apply ``member``'s update where it needs a path of its own (a ZeRO-3 slice, an fp32 weight);
        ``False`` for a whole bf16 matrix with a split master (the caller batches those)."""
        weight = self._weight(member)
        left, right = low_rank_factors(update)
        m, n = left.shape[-2], right.shape[-1]
        if (member.start, member.end) != (0, m * n):  # a ZeRO-3 slice
            self._apply_slice(member, weight, left[position], right[position], cfg.decay, update.step_size)
            return True
        if member.remainder is None:
            apply_low_rank_member_(weight.view(m, n), update, position, cfg)
            return True
        return False

    @staticmethod
    def _apply_slice(member: Member, weight: Tensor, left: Tensor, right: Tensor, decay: float, step: float) -> None:
        """The update with ``U = left @ right`` on elements ``[start, end)`` of the flattened ``W``
        only: the rows the slice touches (``left[r0:r1] @ right``, ``(r1 − r0) × n`` fp32)."""
        if member.start >= member.end:
            return
        n = right.shape[-1]
        r0, r1 = member.start // n, (member.end - 1) // n + 1
        product = (left[r0:r1] @ right).reshape(-1)[member.start - r0 * n : member.end - r0 * n]
        if member.remainder is None:
            weight_update(weight, product, decay, step)
            return
        split_master.update_flat_(weight, member.remainder, product, decay, step)

    def reset(self) -> None:
        """After every optimizer step (also a skipped one): empty ``R``, re-plan the next step."""
        self.flat_low_rank.zero_()
        for m in self.members:
            m.calls, m.refreshed, m.grad, m.slot = 0, False, None, None
        for batch in self.batches:
            batch.pending, batch.stack, batch.basis, batch.waiting = [], None, None, 0
        self._due = None
        self._replaced = []
        self.total_norm = None

    # ------------------------------------------------------------------ masters
    def held_masters(self) -> dict[str, tuple[int, int, Tensor]]:
        """``{name: (0, numel, flat fp32 master)}``: a view of an fp32 weight, else a materialized
        copy whose changes take effect at :meth:`write_back_masters` (checkpoint loads)."""
        result = {}
        for m in self.members:
            weight = self._weight(m)
            if m.start >= m.end:  # ZeRO-3: this rank's slice is padding only
                continue
            if m.remainder is None:
                master = weight.reshape(-1)
            else:
                master = self._materialized.get(m.name)
                if master is None:
                    master = self._materialized[m.name] = split_master.join(weight, m.remainder).view(-1)
            result[m.name] = (m.start, m.end, master)
        return result

    @torch.no_grad()
    def write_back_masters(self) -> None:
        for m in self.members:
            master = self._materialized.get(m.name)
            if master is not None:
                weight = self._weight(m)
                split_master.split_(master.view(weight.shape), weight, m.remainder)
        self._materialized.clear()

    def remove(self) -> None:
        projected_linear.uninstall(self.modules)
