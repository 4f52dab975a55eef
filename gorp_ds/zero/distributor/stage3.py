"""ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): every parameter, frozen ones included, is
partitioned on its own: a tensor of ``N`` elements gives each rank ``⌈N / W⌉`` of them
(``param.ds_tensor``; ``param.data`` is empty outside a gather). DeepSpeed steps one sub-group at
a time; the driver reads each sub-group's fp32 partition, every tensor's slice back to back
(:class:`~..layout.PartitionedLayout`).

The projected ``full`` targets' bf16 weights are partitioned by DeepSpeed too; their masters and
the rank-k update cover each rank's slice, and they step inside DeepSpeed's ``_post_step``
(:mod:`..deepspeed_patches`). Whole parameters are made available through :meth:`gathered` and
:meth:`Stage3Distributor.for_generation`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from ...log import get_logger
from ...optim.gorp import GORP
from .. import deepspeed_patches
from ..config_checks import UnsupportedSetupError
from ..driver import ZeroDriver
from ..layout import PartitionedLayout, PartitioningMismatch, partition_range, partitioned_layout
from ..lowrank_targets import ClaimedTargets, LowRankTargets
from .sharded import ShardedDistributor, group_all_reduce

log = get_logger(__name__)


def is_partitioned(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ZeRO-3 parameter (its ``.data`` is empty outside a gather)."""
    return hasattr(tensor, "ds_id")


def partition_view(param: nn.Parameter) -> tuple[Tensor, int, int]:
    """A ZeRO-3 parameter's slice on this rank: ``(flat view of its valid elements, start, end)``."""
    start, end = partition_range(int(param.ds_numel), torch_dist.get_world_size(group=param.ds_process_group),
                                 torch_dist.get_rank(group=param.ds_process_group))
    return param.ds_tensor.data.view(-1).narrow(0, 0, end - start), start, end


def _subgroup_layouts(zero_optimizer: Any, names_by_id: dict[int, str], world: int) -> list[PartitionedLayout]:
    """Partition geometry of every sub-group: each tensor's slice (DeepSpeed's ``partition_numel()``,
    checked against ``⌈N / W⌉``) back to back in the sub-group's fp32 partition."""
    layouts = []
    for params, flat in zip(zero_optimizer.fp16_groups, zero_optimizer.fp32_partitioned_groups_flat):
        tensors = [(names_by_id[id(p)], tuple(p.ds_shape), int(p.ds_numel), int(p.partition_numel())) for p in params]
        try:
            layouts.append(partitioned_layout(tensors, flat.numel(), world))
        except PartitioningMismatch as err:
            raise UnsupportedSetupError(str(err)) from None
    return layouts


class Stage3Distributor(ShardedDistributor):
    """GORP under ZeRO-3."""

    @staticmethod
    def zero_optimizer_class() -> type:
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

        return DeepSpeedZeroOptimizer_Stage3

    @classmethod
    def install(cls, engine: Any, optimizer: GORP, params_by_name: dict[str, nn.Parameter],
                claimed: ClaimedTargets | None, source: Any, *, refresh_from: str,
                refresh_memory_mib: float) -> Stage3Distributor:
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
        names_by_id = {id(p): name for name, p in params_by_name.items()}
        layouts = _subgroup_layouts(zero_optimizer, names_by_id, world)
        rank = torch_dist.get_rank(group=group)
        all_reduce = group_all_reduce(group)
        driver = ZeroDriver(layouts, rank, all_reduce, flats=list(zero_optimizer.fp32_partitioned_groups_flat))
        optimizer.driver = driver
        log.info(f"GORP under ZeRO-3: {len(params_by_name)} tensors in {len(layouts)} sub-groups, each partitioned "
                 f"over {world} ranks; {len(zero_optimizer.persistent_parameters)} small parameters kept gathered")
        low_rank = None
        if claimed is not None:
            low_rank = LowRankTargets(optimizer, claimed, rank=torch_dist.get_rank(), world=world,
                                      all_reduce=all_reduce, is_boundary=engine.is_gradient_accumulation_boundary,
                                      accumulation=engine.gradient_accumulation_steps(), partition=partition_view,
                                      refresh_from=refresh_from, refresh_memory_mib=refresh_memory_mib)
            log.info(f"GORP: {len(low_rank.members)} full-rank tensors trained from projected gradients on their ZeRO-3 "
                     f"partitions (R all-reduce {low_rank.flat_low_rank.numel() * 4 / 2**20:.2f} MiB per step)")
        deepspeed_patches.hook_gorp_into_stage3_step(zero_optimizer, optimizer, low_rank)
        deepspeed_patches.count_micro_steps_in_backward(engine)
        return cls(engine, optimizer, params_by_name, driver=driver, group=group, low_rank=low_rank)

    # ------------------------------------------------------------------ masters
    def replicated_names(self) -> set[str]:
        """None: the projected ``full`` targets are partitioned like every other tensor."""
        return set()

    def _model_slice(self, param: nn.Parameter, start: int, end: int) -> Tensor:
        # The changed values are in this rank's partition (see gathered(modify=True)).
        return partition_view(param)[0]

    @torch.no_grad()
    def model_from_masters(self) -> None:
        zero = self.engine.optimizer
        zero.parameter_offload.partition_all_parameters()  # nothing gathered holds stale values
        for sub_group in range(len(zero.fp16_groups)):  # fp32 partition -> bf16 partition
            zero._reassign_or_swap_out_partitioned_parameters(sub_group)
        if self.low_rank is not None:
            self.low_rank.write_back_masters()
        if zero.persistent_parameters:  # DeepSpeed keeps these gathered at all times
            zero.persistent_parameters[0].all_gather(zero.persistent_parameters)

    # ------------------------------------------------------------------ whole tensors
    def is_partitioned(self, tensor: Tensor) -> bool:
        return is_partitioned(tensor)

    def numel(self, tensor: Tensor) -> int:
        return int(tensor.ds_numel) if is_partitioned(tensor) else tensor.numel()

    def shape(self, tensor: Tensor) -> tuple[int, ...]:
        return tuple(tensor.ds_shape) if is_partitioned(tensor) else tuple(tensor.shape)

    @contextmanager
    def gathered(self, params: Iterable[Tensor], modify: bool = False) -> Iterator[None]:
        """With ``modify``, rank 0's values are written back into every rank's partition on exit.
        Collective."""
        params = [p for p in params if is_partitioned(p)]
        if not params:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            yield

    @contextmanager
    def for_generation(self, strategy: str = "auto") -> Iterator[str]:
        """``"gather"``: every parameter is gathered once and stage 3's per-module hooks are off
        inside (no gather per module and token); ``"hooks"``: DeepSpeed gathers each module's
        parameters at every forward (per token when generating); ``"auto"``: gather when the whole
        model fits beside what is allocated, else hooks. Yields the strategy used. Collective."""
        if strategy == "auto":
            strategy = "gather" if self._model_fits() else "hooks"
        if strategy == "hooks":
            yield strategy
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters())):
            with deepspeed_patches.stage3_module_hooks_removed(self.engine):
                yield strategy

    def _model_fits(self) -> bool:
        """Whether the whole model's parameters fit in free device memory (with a 20 % margin);
        always on the CPU."""
        if self.device.type != "cuda":
            return True
        need = sum(self.numel(p) * p.element_size() for p in self.engine.module.parameters())
        free, _ = torch.cuda.mem_get_info(self.device)
        fits = need * 1.2 < free
        agreed = torch.tensor([1.0 if fits else 0.0], device=self.device)
        if self.world_size > 1:  # every rank must choose alike (the gather is collective)
            torch_dist.all_reduce(agreed, op=torch_dist.ReduceOp.MIN, group=self.group)
        return bool(agreed.item())
