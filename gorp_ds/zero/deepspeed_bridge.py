"""The one module that knows DeepSpeed ZeRO internals.

``initialize`` is a drop-in for ``deepspeed.initialize`` with a ``GORP`` optimizer. It refuses, at
start-up and with a message naming the config field and the fix, every setup whose math it does
not guarantee, then installs a :class:`~gorp_ds.zero.driver.ZeroDriver` built from the ZeRO
optimizer's partition geometry.

With projected gradients (the default) the ``full`` groups are detached from the optimizer before
DeepSpeed sees it and handed to :class:`~gorp_ds.zero.lowrank_targets.LowRankTargets`; this module
hooks them into DeepSpeedZeroOptimizer's ``step`` (all-reduce of ``R`` first, their step after
DeepSpeed's) and ``scaled_global_norm`` (the combined clipping norm): the only DeepSpeed internals
that path touches.

Under ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``) DeepSpeed partitions every parameter, frozen ones
included, and steps one sub-group at a time; the driver reads each sub-group's fp32 partition (every
tensor's slice back to back, :class:`~gorp_ds.zero.layout.PartitionedLayout`). The owned ``full``
targets' bf16 weights are partitioned by DeepSpeed too; their masters and the rank-k update cover
each rank's slice (``LowRankTargets.allocate(partition=...)``), and their step is hooked into
stage 3's ``_get_norm_groups`` (combined norm), ``_optimizer_step`` (skipped steps) and
``_post_step`` (before DeepSpeed re-gathers its persistent parameters). Whole parameters are made
available to the rest of the project through :meth:`ZeroHandle.gathered` and
:meth:`ZeroHandle.for_generation`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor

from ..log import get_logger
from ..optim.gorp import GORP
from .driver import ZeroDriver
from .layout import FlatTensor, GroupLayout, PartitionedLayout, partition_numel, partition_range
from .lowrank_targets import LowRankTargets
from .projected_linear import ProjectedLinearError

log = get_logger(__name__)


class UnsupportedSetupError(ValueError):
    """A DeepSpeed configuration that GORP cannot run correctly."""


def load_ds_config(config: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config as a dict; a path must name a readable JSON file."""
    if isinstance(config, dict):
        return dict(config)
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise UnsupportedSetupError(f"DeepSpeed config {path}: file not found (pass --ds_config <file.json>)")
    try:
        with open(path) as handle:
            loaded = json.load(handle)
    except json.JSONDecodeError as err:
        raise UnsupportedSetupError(f"DeepSpeed config {path}: not valid JSON ({err})") from None
    if not isinstance(loaded, dict):
        raise UnsupportedSetupError(f"DeepSpeed config {path}: the top level must be a JSON object")
    return loaded


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and bool(section.get("enabled", False))


def check_supported(config: dict[str, Any], source: str = "DeepSpeed config") -> int:
    """Raise :class:`UnsupportedSetupError` for setups GORP does not support; return the ZeRO stage."""
    where = f"{source}"

    def refuse(field: str, why: str, fix: str) -> None:
        raise UnsupportedSetupError(f"{where}: '{field}' {why}; {fix}")

    # Sections read below must be JSON objects; DeepSpeed itself would fail deep inside with a traceback.
    for section in ("zero_optimization", "bf16", "fp16", "torch_autocast", "tensorboard"):
        if section in config and config[section] is not None and not isinstance(config[section], dict):
            refuse(section, f"is {config[section]!r}, not an object",
                   f'write it as an object, e.g. "{section}": {{"stage": 2}}' if section == "zero_optimization"
                   else f'write it as an object, e.g. "{section}": {{"enabled": true}}')
    zero = config.get("zero_optimization", {}) or {}
    raw_stage = zero.get("stage", 0)
    if isinstance(raw_stage, bool) or not isinstance(raw_stage, int):
        refuse("zero_optimization.stage", f"is {raw_stage!r}, not an integer", "use 1, 2 or 3")
    stage = int(raw_stage)
    if "scheduler" in config:
        # DeepSpeed's scheduler would set the groups' learning rates itself, overriding the run's
        # --lr-* values while results.json records those.
        refuse("scheduler", "is set; a DeepSpeed learning-rate scheduler overrides the run's --lr-lora/--lr-full/"
               "--lr-plain", "remove the \"scheduler\" section")
    if stage not in (1, 2, 3):
        refuse("zero_optimization.stage", f"is {stage}", "use stage 1, 2 or 3 (on one GPU, stage 2 costs nothing)")
    if stage == 3:
        _check_stage3(zero, refuse)
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none") if isinstance(zero.get(key), dict) else "none"
        if device not in (None, "none"):
            refuse(f"zero_optimization.{key}", f"offloads to {device!r}, which GORP does not support (DeepSpeed's "
                   "offload path expects its own CPU Adam, and GORP's projector refreshes would run on the CPU)",
                   f"remove zero_optimization.{key}")
    if zero.get("cpu_offload"):
        refuse("zero_optimization.cpu_offload", "is set", "remove it (optimizer offload is not supported with GORP)")
    if _enabled(config.get("fp16")):
        refuse("fp16.enabled", "is true; fp16 loss scaling is not supported with GORP", "use \"bf16\": {\"enabled\": true}")
    if _enabled(config.get("torch_autocast")):
        refuse("torch_autocast.enabled", "is true", "use \"bf16\": {\"enabled\": true} instead")
    if "optimizer" in config:
        refuse("optimizer", "is set, but the optimizer is GORP (given in code)", "remove the \"optimizer\" section")
    if zero.get("zenflow"):
        refuse("zero_optimization.zenflow", "is set", "remove it")
    return stage


def _offload_device(zero: dict[str, Any], key: str) -> Any:
    section = zero.get(key)
    return section.get("device", "none") if isinstance(section, dict) else "none"


def _check_stage3(zero: dict[str, Any], refuse: Any) -> None:
    """ZeRO-3 settings whose parameter layout or update GORP does not support, each refused with
    the field to change."""
    if _offload_device(zero, "offload_param") not in (None, "none"):
        # With offload_param the partitions (frozen base weights included) live on the host between
        # uses: the `full` targets' rank-k update and their split masters would run on the CPU, and
        # DeepSpeed then also requires its CPU Adam for the trainable partitions.
        refuse("zero_optimization.offload_param", f"offloads parameters to {_offload_device(zero, 'offload_param')!r}, "
               "which GORP under ZeRO-3 does not support (the full-rank targets are updated in their GPU "
               "partitions and DeepSpeed's parameter offload needs its own CPU optimizer)",
               "remove zero_optimization.offload_param (ZeRO-3 already partitions the frozen base weights "
               "across the GPUs)")
    if int(zero.get("zero_hpz_partition_size", 1) or 1) > 1:
        refuse("zero_optimization.zero_hpz_partition_size", f"is {zero['zero_hpz_partition_size']}; hierarchical "
               "secondary partitions are not supported by GORP", "remove it (or set it to 1)")
    for key in ("zero_quantized_weights", "zero_quantized_nontrainable_weights", "zero_quantized_gradients"):
        if zero.get(key):
            refuse(f"zero_optimization.{key}", "is true; quantized ZeRO-3 weights or gradients change the values "
                   "GORP's masters and projected gradients are computed from", f"remove zero_optimization.{key}")
    if int(zero.get("mics_shard_size", -1) or -1) > 0:
        refuse("zero_optimization.mics_shard_size", f"is {zero['mics_shard_size']}; MiCS sharding is not supported "
               "by GORP", "remove it (plain ZeRO-3 partitions over all ranks)")


def _group_layout(zero_optimizer: Any, group_index: int, names_by_id: dict[int, str]) -> GroupLayout:
    """Partition geometry of one group, read off DeepSpeedZeroOptimizer (stage 1 and 2)."""
    params = zero_optimizer.round_robin_bit16_groups[group_index]
    offsets = zero_optimizer.round_robin_bit16_offsets[group_index]
    metas = zero_optimizer.round_robin_bit16_meta[group_index]
    tensors = tuple(
        FlatTensor(names_by_id[id(p)], tuple(meta.shape), int(offset)) for p, meta, offset in zip(params, metas, offsets)
    )
    world = torch_dist.get_world_size(group=zero_optimizer.real_dp_process_group[group_index])
    return GroupLayout(tensors, int(zero_optimizer.partition_size[group_index]), world)


def _stage3_layouts(zero_optimizer: Any, names_by_id: dict[int, str], world: int) -> list[PartitionedLayout]:
    """Partition geometry of every ZeRO-3 sub-group: each tensor's slice (``partition_numel``
    elements, checked against DeepSpeed's) back to back in the sub-group's fp32 partition."""
    layouts = []
    for params, flat in zip(zero_optimizer.fp16_groups, zero_optimizer.fp32_partitioned_groups_flat):
        tensors, offset = [], 0
        for param in params:
            size = int(param.partition_numel())
            if size != partition_numel(int(param.ds_numel), world):
                raise UnsupportedSetupError(f"ZeRO-3 partitions {names_by_id[id(param)]!r} into {size} elements per "
                                            f"rank, not ceil({param.ds_numel}/{world}); unsupported partitioning")
            tensors.append(FlatTensor(names_by_id[id(param)], tuple(param.ds_shape), offset))
            offset += size
        if offset != flat.numel():
            raise UnsupportedSetupError(f"ZeRO-3 fp32 partition of {flat.numel()} elements for {offset} in its tensors")
        layouts.append(PartitionedLayout(tuple(tensors), world))
    return layouts


def _partition_view(param: torch.nn.Parameter) -> tuple[Tensor, int, int]:
    """A ZeRO-3 parameter's slice on this rank: ``(flat view of its valid elements, start, end)``."""
    start, end = partition_range(int(param.ds_numel), torch_dist.get_world_size(group=param.ds_process_group),
                                 torch_dist.get_rank(group=param.ds_process_group))
    return param.ds_tensor.data.view(-1).narrow(0, 0, end - start), start, end


def is_partitioned(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ZeRO-3 parameter (its ``.data`` is empty outside a gather)."""
    return hasattr(tensor, "ds_id")


class ZeroHandle:
    """What the rest of the project needs from a GORP-under-ZeRO engine, without DeepSpeed internals."""

    def __init__(self, engine: Any, optimizer: GORP, params_by_name: dict[str, torch.nn.Parameter],
                 low_rank: LowRankTargets | None = None) -> None:
        self.engine = engine
        self.optimizer = optimizer
        self.params_by_name = params_by_name
        self.sharded = isinstance(optimizer.driver, ZeroDriver)
        self.low_rank = low_rank  # the ``full`` targets owned outside DeepSpeed (projected gradients)
        zero = getattr(engine, "optimizer", None)
        self.stage3 = self.sharded and hasattr(zero, "fp32_partitioned_groups_flat")
        # The data-parallel group (DeepSpeed's) and the trainable tensors' device.
        self.group = (zero.dp_process_group if self.stage3 else zero.real_dp_process_group[0]) if self.sharded else None
        first = next(iter(params_by_name.values()), None)
        self.device = first.device if first is not None else torch.device("cpu")

    @property
    def driver(self) -> ZeroDriver:
        assert isinstance(self.optimizer.driver, ZeroDriver)
        return self.optimizer.driver

    def held_masters(self) -> dict[str, tuple[int, int, Tensor]]:
        """``{name: (elem_start, elem_end, flat fp32 master view)}`` for what this rank updates: its
        partition's pieces under ZeRO, whole parameters otherwise."""
        owned = self.low_rank.held_masters() if self.low_rank is not None else {}
        if self.sharded:
            return {
                **{name: (piece.elem_start, piece.elem_end, master)
                   for name, (piece, master) in self.driver.master_pieces(self.optimizer).items()},
                **owned,
            }
        return {**{name: (0, p.numel(), p.data.view(-1)) for name, p in self.params_by_name.items()}, **owned}

    def replicated_names(self) -> set[str]:
        """Tensors every rank holds whole and updates identically (the ``full`` targets trained from
        projected gradients, except under ZeRO-3 where each rank holds its slice); checkpoints
        write them once."""
        if self.low_rank is None or self.stage3:
            return set()
        return {m.name for m in self.low_rank.members}

    def primary_holders(self) -> set[str]:
        """Names of the tensors whose whole low-rank state and S this rank writes to checkpoints:
        where it is the lowest-ranked holder of a ZeRO partition, and rank 0 for the replicated
        ``full`` targets trained from projected gradients."""
        if not self.sharded:
            return set(self.params_by_name)
        primary = set()
        for layout in self.driver.layouts:
            for name, owners in layout.owners().items():
                if owners and owners[0] == self.driver.rank:
                    primary.add(name)
        if self.low_rank is not None and self.rank == 0:
            primary |= {m.name for m in self.low_rank.members}
        return primary

    @torch.no_grad()
    def masters_from_model(self, names: Iterable[str]) -> None:
        """After the model's trainable tensors ``names`` were changed in place identically on every
        rank (LoRA merge and re-init), copy them into the fp32 master partitions."""
        if not self.sharded:
            return
        masters = self.held_masters()
        for name in names:
            if name in masters:
                start, end, master = masters[name]
                param = self.params_by_name[name]
                if self.stage3:  # the changed values are in this rank's partition (see gathered(modify=True))
                    master.copy_(_partition_view(param)[0])
                else:
                    master.copy_(param.data.reshape(-1)[start:end])

    @staticmethod
    def is_partitioned(tensor: Tensor) -> bool:
        """Whether ``tensor`` is a ZeRO-3 parameter (empty outside :meth:`gathered`)."""
        return is_partitioned(tensor)

    @staticmethod
    def numel(tensor: Tensor) -> int:
        """Elements of the whole tensor (a ZeRO-3 parameter's too)."""
        return int(tensor.ds_numel) if is_partitioned(tensor) else tensor.numel()

    @contextmanager
    def gathered(self, params: Iterable[Tensor], modify: bool = False) -> Iterator[None]:
        """Inside, ``params`` are whole on every rank (ZeRO-3 gathers them; otherwise a no-op).
        ``modify``: changes made inside (identically on every rank) are kept: rank 0's values are
        written back into every rank's partition on exit; the fp32 masters of trainable tensors are
        then refreshed with :meth:`masters_from_model`. Collective under ZeRO-3."""
        params = [p for p in params if is_partitioned(p)]
        if not (self.stage3 and params):
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            yield

    @contextmanager
    def for_generation(self, strategy: str = "auto") -> Iterator[str]:
        """Evaluation and generation under ZeRO-3. ``"gather"``: every parameter is gathered once
        and stage 3's per-module hooks are off inside (no gather per module and token); ``"hooks"``:
        DeepSpeed gathers each module's parameters at every forward (per token when generating);
        ``"auto"``: gather when the whole model fits beside what is allocated, else hooks. Yields the
        strategy used (``"none"`` without ZeRO-3). Collective under ZeRO-3."""
        if not self.stage3:
            yield "none"
            return
        if strategy == "auto":
            strategy = "gather" if self._model_fits() else "hooks"
        if strategy == "hooks":
            yield strategy
            return
        import deepspeed

        offload = self.engine.optimizer.parameter_offload  # owner of stage 3's module hooks
        with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters())):
            for hook in offload.forward_hooks + offload.backward_hooks:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield strategy
            finally:
                offload._register_deepspeed_module(offload.module)

    def _model_fits(self) -> bool:
        """Whether the whole model's parameters fit in free device memory (with a 20 % margin);
        always on the CPU."""
        if self.device.type != "cuda":
            return True
        need = sum(int(p.ds_numel) * p.element_size() if is_partitioned(p) else p.numel() * p.element_size()
                   for p in self.engine.module.parameters())
        free, _ = torch.cuda.mem_get_info(self.device)
        fits = need * 1.2 < free
        agreed = torch.tensor([1.0 if fits else 0.0], device=self.device)
        if self.world_size > 1:  # every rank must choose alike (the gather is collective)
            torch_dist.all_reduce(agreed, op=torch_dist.ReduceOp.MIN, group=self.group)
        return bool(agreed.item())

    @torch.no_grad()
    def gather_masters(self, names: Iterable[str], to_rank: int | None = None) -> dict[str, Tensor]:
        """Whole fp32 masters of ``names`` (each in its parameter's shape). Every rank copies the
        elements it holds into one zero buffer (all tensors back to back) and one all-reduce — or a
        reduce to ``to_rank`` — sums them; exact, since ZeRO gives each element to exactly one rank.
        A collective: every rank calls it with the same names. With ``to_rank`` set, other ranks get
        ``{}``. Meant for small sets (LoRA factors) or one large tensor at a time."""
        names = list(names)
        if not self.sharded:
            return {n: self.params_by_name[n].data.float().clone() for n in names}
        masters = self.held_masters()
        shapes = {name: self.optimizer.tensor_meta[name][1] for name in names}  # a ZeRO-3 parameter's own is empty
        offsets, total = {}, 0
        for name in names:
            offsets[name] = total
            total += FlatTensor(name, shapes[name], 0).numel
        device = self.params_by_name[names[0]].device if names else torch.device("cpu")
        buffer = torch.zeros(total, dtype=torch.float32, device=device)
        for name in names:
            if name in masters:
                start, end, master = masters[name]
                buffer[offsets[name] + start : offsets[name] + end].copy_(master)
        if self.world_size > 1:
            if to_rank is None:
                torch_dist.all_reduce(buffer)
            else:
                torch_dist.reduce(buffer, dst=to_rank)
        if to_rank is not None and self.rank != to_rank:
            return {}
        return {n: buffer[offsets[n] : offsets[n] + FlatTensor(n, shapes[n], 0).numel].view(shapes[n]) for n in names}

    def barrier(self) -> None:
        if torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.barrier()

    @property
    def rank(self) -> int:
        return torch_dist.get_rank() if torch_dist.is_available() and torch_dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return torch_dist.get_world_size() if torch_dist.is_available() and torch_dist.is_initialized() else 1

    # Engine counters a resumed run must continue from (DeepSpeed's module and optimizer files are
    # not written: gorp_ds checkpoints hold the trainable state themselves).
    _COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")

    def engine_state(self) -> dict[str, Any]:
        """DeepSpeed's step counters and its LR scheduler's state (when the config has one)."""
        if self.engine is None:
            return {}
        state: dict[str, Any] = {k: int(getattr(self.engine, k)) for k in self._COUNTERS if hasattr(self.engine, k)}
        scheduler = getattr(self.engine, "lr_scheduler", None)
        if scheduler is not None and hasattr(scheduler, "state_dict"):
            state["lr_scheduler"] = scheduler.state_dict()
        return state

    def restore_engine_state(self, state: dict[str, Any]) -> None:
        if self.engine is None:
            return
        for key in self._COUNTERS:
            if key in state:
                setattr(self.engine, key, int(state[key]))
        scheduler = getattr(self.engine, "lr_scheduler", None)
        if scheduler is not None and state.get("lr_scheduler") is not None:
            scheduler.load_state_dict(state["lr_scheduler"])

    @torch.no_grad()
    def gradients_finite(self, loss: Tensor | None = None) -> Tensor:
        """A device bool (0-d): True when every rank's gradient partition of this optimizer step, and
        every rank's ``loss`` (a local scalar), is finite. Call after the backward pass of the step's
        last micro-batch and before ``engine.step()``: ZeRO has then reduced the averaged gradients
        into each rank's partition (``averaged_gradients``: per group a flat tensor or a list of
        per-parameter views). One fused non-finite check per rank, one 1-element all-reduce (MAX)
        so that all ranks decide alike; no host sync."""
        zero = self.engine.optimizer
        device = self.device
        found = torch.zeros(1, dtype=torch.float32, device=device)
        grads: list[Tensor] = []
        for part in getattr(zero, "averaged_gradients", {}).values():
            if part is None:
                continue
            grads.extend(t for t in (part if isinstance(part, (list, tuple)) else [part]) if t is not None and t.numel())
        if self.low_rank is not None:  # the `full` targets' projected gradients (this rank's sums, before the all-reduce)
            grads.append(self.low_rank.flat_low_rank)
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for grad in grads:
            by_dtype.setdefault(grad.dtype, []).append(grad)
        for dtype, same in by_dtype.items():
            if dtype in (torch.float32, torch.float16) or device.type == "cpu":
                # The AMP check sets `found` to 1 on any inf/NaN; the unscale factor 1 leaves values unchanged.
                torch._amp_foreach_non_finite_check_and_unscale_(same, found, torch.ones(1, device=device))
            else:  # bf16 on CUDA has no AMP check kernel: a NaN or inf makes that tensor's norm non-finite
                norms = torch.stack(torch._foreach_norm(same)).float()
                found = torch.maximum(found, (~torch.isfinite(norms)).any().float().reshape(1))
        if loss is not None:
            found = torch.maximum(found, (~torch.isfinite(loss.detach().float())).float().reshape(1).to(device))
        if self.sharded and torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.all_reduce(found, op=torch_dist.ReduceOp.MAX, group=self.group)
        return found[0] == 0

    @torch.no_grad()
    def model_from_masters(self) -> None:
        """Push fp32 masters into the (bf16) model weights on every rank after loading masters."""
        if self.stage3:
            zero = self.engine.optimizer
            zero.parameter_offload.partition_all_parameters()  # nothing gathered holds stale values
            for sub_group in range(len(zero.fp16_groups)):  # fp32 partition -> bf16 partition
                zero._reassign_or_swap_out_partitioned_parameters(sub_group)
        elif self.sharded:
            self.engine.optimizer.update_lp_params()
        if self.low_rank is not None:
            self.low_rank.write_back_masters()
        if self.stage3 and zero.persistent_parameters:  # DeepSpeed keeps these gathered at all times
            zero.persistent_parameters[0].all_gather(zero.persistent_parameters)


FULL_GRADIENTS = ("projected", "flat")


def initialize(
    model: torch.nn.Module,
    optimizer: GORP,
    config: str | os.PathLike | dict[str, Any],
    full_gradients: str = "projected",
    refresh_from: str = "auto",
    refresh_memory_mib: float = 1024.0,
    **kwargs: Any,
):
    """``deepspeed.initialize`` for a ``GORP`` optimizer; returns the same tuple
    ``(engine, optimizer, dataloader, lr_scheduler)``. ``engine.gorp`` is a :class:`ZeroHandle`.

    ``full_gradients``: ``"projected"`` (default) trains the ``full`` tensors from low-rank gradients
    formed in their Linear's backward, outside DeepSpeed (:mod:`.lowrank_targets`; clipping then uses
    the projected-gradient norm); ``"flat"`` hands their full gradients to DeepSpeed's flat buffers
    like every other tensor (clipping uses ‖G‖). ``refresh_from`` (projected only): ``"gradient"``
    forms the refreshing layers' G and refreshes them in batches of as many as fit
    ``refresh_memory_mib``; ``"sketch"`` computes each layer's projector from products of G through
    its activations when a step has one micro-batch (randomized projector), never forming G;
    ``"auto"`` (default) batches from G when all of a shape's due G's fit the budget, else sketches."""
    import deepspeed
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, GORP):
        raise TypeError(f"gorp_ds.initialize needs a gorp_ds.GORP optimizer, got {type(optimizer).__name__}")
    for key in ("mpu", "mesh_param"):
        if kwargs.get(key) is not None:
            raise UnsupportedSetupError(f"gorp_ds.initialize: '{key}' (model/pipeline parallelism) is not supported")
    source = config if isinstance(config, (str, os.PathLike)) else "DeepSpeed config"
    ds_config = load_ds_config(config)
    stage = check_supported(ds_config, str(source))
    ds_config["zero_allow_untested_optimizer"] = True
    if refresh_from not in ("auto", "sketch", "gradient"):
        raise UnsupportedSetupError(f"refresh_from (--refresh-from) is {refresh_from!r}; use auto, sketch or gradient")
    if not refresh_memory_mib > 0:
        raise UnsupportedSetupError(f"refresh_memory_mib (--refresh-memory-mib) is {refresh_memory_mib!r}; use a "
                                    "positive number of MiB")
    if full_gradients not in FULL_GRADIENTS:
        raise UnsupportedSetupError(f"full_gradients (--full-gradients) is {full_gradients!r}; use one of {FULL_GRADIENTS}")
    owned_groups = []
    if full_gradients == "projected" and any(g["role"] == "full" for g in optimizer.param_groups):
        if any(g["role"] != "full" for g in optimizer.param_groups[-1:]) or \
                not any(g["role"] != "full" for g in optimizer.param_groups):
            raise UnsupportedSetupError("--full-gradients projected: the 'full' param groups must come last and at "
                                        "least one other group (LoRA, plain) must remain for DeepSpeed")
        if ds_config.get("managed_gradient_accumulation") is False:
            raise UnsupportedSetupError(f"{source}: 'managed_gradient_accumulation' is false; projected gradients "
                                        "need DeepSpeed's micro-step counter (remove it, or --full-gradients flat)")
        zero = ds_config.get("zero_optimization") or {}
        if float(ds_config.get("gradient_clipping", 0.0) or 0.0) > 0.0 and zero.get("compute_grad_norm") is False:
            raise UnsupportedSetupError(f"{source}: 'gradient_clipping' is set but 'zero_optimization.compute_grad_norm' "
                                        "is false; projected gradients clip by the combined norm, which needs it "
                                        "(remove compute_grad_norm)")
        owned_groups = optimizer.detach_groups("full")
    params_by_name: dict[str, torch.nn.Parameter] = {}
    for group in optimizer.param_groups:
        for param, name in zip(group["params"], group["names"]):
            if not param.requires_grad:
                raise UnsupportedSetupError(f"GORP tensor {name!r} has requires_grad=False; remove it from the optimizer")
            params_by_name[name] = param
    names_by_id = {id(p): name for name, p in params_by_name.items()}
    low_rank = None
    if owned_groups:
        # Before DeepSpeed sees the model: the weights stop requiring gradients, so DeepSpeed
        # builds no flat buffers, gradient hooks or partitions for them.
        import deepspeed.comm as ds_comm

        if not ds_comm.is_initialized():
            deepspeed.init_distributed()
        world = torch_dist.get_world_size()
        try:
            low_rank = LowRankTargets(optimizer, owned_groups, model, rank=torch_dist.get_rank(), world=world,
                                      all_reduce=lambda t: torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM),
                                      is_boundary=lambda: False, accumulation=1, refresh_from=refresh_from,
                                      refresh_memory_mib=refresh_memory_mib)
        except ProjectedLinearError as err:
            raise UnsupportedSetupError(str(err)) from None

    engine, ds_optimizer, loader, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, **kwargs
    )
    expected = DeepSpeedZeroOptimizer_Stage3 if stage == 3 else DeepSpeedZeroOptimizer
    if type(engine.optimizer) is not expected or engine.optimizer.optimizer is not optimizer:
        raise UnsupportedSetupError(
            f"{source}: DeepSpeed built {type(engine.optimizer).__name__} around GORP; only the plain ZeRO-1/2/3 "
            "optimizer is supported"
        )
    zero_optimizer = engine.optimizer
    if stage == 3:
        _install_stage3(engine, optimizer, params_by_name, names_by_id, low_rank, source)
        return engine, ds_optimizer, loader, scheduler
    if stage == 1 and engine.zero_overlap_comm() and engine.gradient_accumulation_steps() > 1:
        # Measured with DeepSpeed 0.19.8: ZeRO-1 + overlap_comm + accumulation drifts from the
        # single-process trajectory even with torch AdamW (2e-2 relative after one step).
        raise UnsupportedSetupError(
            f"{source}: 'zero_optimization.overlap_comm' is true with ZeRO stage 1 and "
            f"gradient_accumulation_steps={engine.gradient_accumulation_steps()}; DeepSpeed then accumulates "
            "gradients incorrectly. Set overlap_comm to false or use stage 2"
        )
    if getattr(zero_optimizer, "cpu_offload", False):
        raise UnsupportedSetupError(f"{source}: optimizer offload is active; remove zero_optimization.offload_optimizer")
    layouts = [_group_layout(zero_optimizer, i, names_by_id) for i in range(len(optimizer.param_groups))]
    group = zero_optimizer.real_dp_process_group[0]
    rank = torch_dist.get_rank(group=group)

    def all_reduce(tensor: Tensor) -> None:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM, group=group)

    optimizer.driver = ZeroDriver(layouts, rank, all_reduce)
    cut = sum(len(layout.cut_tensors()) for layout in layouts)
    log.info(f"GORP under ZeRO-{stage}: {len(params_by_name)} tensors in {len(layouts)} groups, "
             f"{cut} cut by partition boundaries, world size {layouts[0].world_size}")
    if low_rank is not None:
        if torch_dist.get_world_size(group=group) != torch_dist.get_world_size():
            raise UnsupportedSetupError(f"{source}: projected gradients need the data-parallel group to be the whole world")
        low_rank.allocate()
        low_rank.all_reduce = all_reduce
        low_rank.is_boundary = engine.is_gradient_accumulation_boundary
        low_rank.accumulation = engine.gradient_accumulation_steps()
        _own_full_targets_step(zero_optimizer, low_rank)
        log.info(f"GORP: {len(low_rank.members)} full-rank tensors trained from projected gradients outside "
                 f"DeepSpeed (R all-reduce {low_rank.flat_low_rank.numel() * 4 / 2**20:.2f} MiB per step)")
    engine.gorp = ZeroHandle(engine, optimizer, params_by_name, low_rank)
    return engine, ds_optimizer, loader, scheduler


def _install_stage3(engine: Any, optimizer: GORP, params_by_name: dict[str, torch.nn.Parameter],
                    names_by_id: dict[int, str], low_rank: LowRankTargets | None, source: Any) -> None:
    """The ZeRO-3 driver (per sub-group layouts of the fp32 partitions) and, with projected
    gradients, the owned ``full`` targets on their partitions."""
    zero_optimizer = engine.optimizer
    if zero_optimizer.offload_optimizer or zero_optimizer.offload_param:
        raise UnsupportedSetupError(f"{source}: ZeRO-3 offload is active; remove zero_optimization.offload_optimizer "
                                    "and zero_optimization.offload_param")
    group = zero_optimizer.dp_process_group
    world = torch_dist.get_world_size(group=group)
    if world != torch_dist.get_world_size() or any(
            torch_dist.get_world_size(group=p.ds_process_group) != world for p in engine.module.parameters()):
        raise UnsupportedSetupError(f"{source}: ZeRO-3 partitions some parameters over another group than the "
                                    "data-parallel world; GORP needs one partition group (all ranks)")
    layouts = _stage3_layouts(zero_optimizer, names_by_id, world)
    rank = torch_dist.get_rank(group=group)

    def all_reduce(tensor: Tensor) -> None:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM, group=group)

    optimizer.driver = ZeroDriver(layouts, rank, all_reduce, flats=list(zero_optimizer.fp32_partitioned_groups_flat))
    log.info(f"GORP under ZeRO-3: {len(params_by_name)} tensors in {len(layouts)} sub-groups, each partitioned "
             f"over {world} ranks; {len(zero_optimizer.persistent_parameters)} small parameters kept gathered")
    if low_rank is not None:
        low_rank.allocate(partition=_partition_view)
        low_rank.all_reduce = all_reduce
        low_rank.is_boundary = engine.is_gradient_accumulation_boundary
        low_rank.accumulation = engine.gradient_accumulation_steps()
        log.info(f"GORP: {len(low_rank.members)} full-rank tensors trained from projected gradients on their ZeRO-3 "
                 f"partitions (R all-reduce {low_rank.flat_low_rank.numel() * 4 / 2**20:.2f} MiB per step)")
    _own_stage3_step(zero_optimizer, optimizer, low_rank)
    original_backward = engine.backward

    def backward(loss: Tensor, *args: Any, **kwargs: Any) -> Any:
        # Stage 3 counts micro-steps (copy the first micro-batch's gradient partition, add the
        # others) in engine.forward(); the trainer calls the module or its decoder directly, so
        # the count is advanced here, before each backward (idempotent after an engine.forward()).
        zero_optimizer.clear_backward_seen_flag()
        return original_backward(loss, *args, **kwargs)

    engine.backward = backward
    engine.gorp = ZeroHandle(engine, optimizer, params_by_name, low_rank)


def _own_stage3_step(zero_optimizer: Any, optimizer: GORP, targets: LowRankTargets | None) -> None:
    """Hook GORP into DeepSpeedZeroOptimizer_Stage3's step, which calls ``GORP.step`` once per
    sub-group: a step the trainer marked non-finite (``GORP.skip_next_step``) skips every
    sub-group (``_optimizer_step``) and is counted once; with owned ``full`` targets, ``R`` is
    all-reduced first, ``_get_norm_groups`` gains ``‖R‖`` (the combined clipping norm), and the
    targets step on their partitions in ``_post_step``, before DeepSpeed re-gathers its persistent
    (small, always gathered) parameters from the partitions; not at all on an overflow."""
    from deepspeed.runtime.utils import combine_grad_norm_groups

    original_step = zero_optimizer.step
    original_optimizer_step = zero_optimizer._optimizer_step
    original_post_step = zero_optimizer._post_step
    original_norm_groups = zero_optimizer._get_norm_groups
    this = {"skip": False, "stepped": False}

    def norm_groups():
        groups = original_norm_groups()
        if targets is not None:
            groups = list(groups) + [torch.sqrt(targets.squared_norm())]
            targets.total_norm = combine_grad_norm_groups(groups)
        return groups

    def optimizer_step(sub_group_id: int) -> None:
        if not this["skip"]:
            original_optimizer_step(sub_group_id)

    def post_step(timer_names) -> None:
        if targets is not None and not this["skip"]:
            targets.step_(float(zero_optimizer.clip_grad))
            this["stepped"] = True
        original_post_step(timer_names)

    def step(closure=None):
        this["skip"], this["stepped"] = bool(optimizer.skip_next_step), False
        try:
            if targets is not None:
                targets.reduce_()
            result = original_step(closure)
            if this["skip"]:
                optimizer.step()  # counts the skipped step and clears the flag (every group is empty here)
            if targets is not None and not this["stepped"]:
                targets.undo_refreshes()
        finally:
            if targets is not None:
                targets.reset()
        return result

    zero_optimizer._get_norm_groups = norm_groups
    zero_optimizer._optimizer_step = optimizer_step
    zero_optimizer._post_step = post_step
    zero_optimizer.step = step


def _own_full_targets_step(zero_optimizer: Any, targets: LowRankTargets) -> None:
    """Hook the owned ``full`` targets into DeepSpeedZeroOptimizer's step: ``R`` is all-reduced before
    DeepSpeed's gradient norm, the norm becomes ``√(‖g‖² + Σ‖R‖²)`` (so DeepSpeed clips its own
    partitions by the combined norm), and after DeepSpeed's step (unless it skipped it) the targets
    take theirs with the same clipping coefficient."""
    original_norm = zero_optimizer.scaled_global_norm
    original_step = zero_optimizer.step

    def scaled_global_norm(norm_type: int = 2):
        base = torch.as_tensor(original_norm(norm_type), dtype=torch.float32, device=targets.flat_low_rank.device)
        targets.total_norm = torch.sqrt(base.square() + targets.squared_norm())
        return targets.total_norm

    def step(closure=None):
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

    zero_optimizer.scaled_global_norm = scaled_global_norm
    zero_optimizer.step = step
