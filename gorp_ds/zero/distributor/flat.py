"""ZeRO-1/2 (``DeepSpeedZeroOptimizer``): each param group is one flat buffer cut into ``W`` equal
partitions; rank ``r`` steps the fp32 master of its partition (:class:`~..layout.GroupLayout`).

The bf16 model weights stay whole on every rank (DeepSpeed all-gathers them after each step), so
nothing needs gathering. The projected ``full`` targets are replicated: every rank applies the
same rank-k update to its whole copy.
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
from ..layout import GroupLayout, flat_group_layout
from ..lowrank_targets import ClaimedTargets, LowRankTargets
from .sharded import ShardedDistributor, group_all_reduce

log = get_logger(__name__)


def _group_layout(zero_optimizer: Any, group_index: int, names_by_id: dict[int, str]) -> GroupLayout:
    """Partition geometry of one param group, read off DeepSpeedZeroOptimizer: its tensors in
    flat-buffer order with their offsets, the partition size and the group's world."""
    params = zero_optimizer.round_robin_bit16_groups[group_index]
    offsets = zero_optimizer.round_robin_bit16_offsets[group_index]
    metas = zero_optimizer.round_robin_bit16_meta[group_index]
    tensors = [(names_by_id[id(p)], tuple(meta.shape), int(offset)) for p, meta, offset in zip(params, metas, offsets)]
    world = torch_dist.get_world_size(group=zero_optimizer.real_dp_process_group[group_index])
    return flat_group_layout(tensors, int(zero_optimizer.partition_size[group_index]), world)


class FlatPartitionDistributor(ShardedDistributor):
    """GORP under ZeRO-1/2."""

    @staticmethod
    def zero_optimizer_class() -> type:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        return DeepSpeedZeroOptimizer

    @classmethod
    def install(cls, engine: Any, optimizer: GORP, params_by_name: dict[str, nn.Parameter],
                claimed: ClaimedTargets | None, source: Any, *, refresh_from: str,
                refresh_memory_mib: float) -> FlatPartitionDistributor:
        zero_optimizer = engine.optimizer
        if getattr(zero_optimizer, "cpu_offload", False):
            raise UnsupportedSetupError(f"{source}: optimizer offload is active; remove zero_optimization.offload_optimizer")
        names_by_id = {id(p): name for name, p in params_by_name.items()}
        layouts = [_group_layout(zero_optimizer, i, names_by_id) for i in range(len(optimizer.param_groups))]
        group = zero_optimizer.real_dp_process_group[0]
        all_reduce = group_all_reduce(group)
        driver = ZeroDriver(layouts, torch_dist.get_rank(group=group), all_reduce)
        optimizer.driver = driver
        cut = sum(len(layout.cut_tensors()) for layout in layouts)
        log.info(f"GORP under ZeRO-{engine.zero_optimization_stage()}: {len(params_by_name)} tensors in "
                 f"{len(layouts)} groups, {cut} cut by partition boundaries, world size {layouts[0].world_size}")
        low_rank = None
        if claimed is not None:
            if torch_dist.get_world_size(group=group) != torch_dist.get_world_size():
                raise UnsupportedSetupError(f"{source}: projected gradients need the data-parallel group to be the "
                                            "whole world")
            low_rank = LowRankTargets(optimizer, claimed, rank=torch_dist.get_rank(), world=torch_dist.get_world_size(),
                                      all_reduce=all_reduce, is_boundary=engine.is_gradient_accumulation_boundary,
                                      accumulation=engine.gradient_accumulation_steps(), refresh_from=refresh_from,
                                      refresh_memory_mib=refresh_memory_mib)
            deepspeed_patches.combine_flat_norm_with_targets(zero_optimizer, low_rank)
            deepspeed_patches.step_targets_after_flat_step(zero_optimizer, low_rank)
            log.info(f"GORP: {len(low_rank.members)} full-rank tensors trained from projected gradients outside "
                     f"DeepSpeed (R all-reduce {low_rank.flat_low_rank.numel() * 4 / 2**20:.2f} MiB per step)")
        return cls(engine, optimizer, params_by_name, driver=driver, group=group, low_rank=low_rank)

    def replicated_names(self) -> set[str]:
        """The projected ``full`` targets: every rank holds them whole."""
        return {m.name for m in self.low_rank.members} if self.low_rank is not None else set()

    def _model_slice(self, param: nn.Parameter, start: int, end: int) -> Tensor:
        return param.data.reshape(-1)[start:end]

    @torch.no_grad()
    def model_from_masters(self) -> None:
        self.engine.optimizer.update_lp_params()  # fp32 partitions -> bf16 partitions, all-gathered
        if self.low_rank is not None:
            self.low_rank.write_back_masters()

    @contextmanager
    def gathered(self, params: Iterable[Tensor], modify: bool = False) -> Iterator[None]:
        yield  # the model weights are whole on every rank

    @contextmanager
    def for_generation(self, strategy: str = "auto") -> Iterator[str]:
        yield "none"
