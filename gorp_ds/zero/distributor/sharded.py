"""What ZeRO-1/2 and ZeRO-3 share: each rank holds pieces of the fp32 masters, described by the
:class:`~gorp_ds.zero.driver.ZeroDriver`'s layouts, and steps them with GORP inside DeepSpeed's
optimizer step. The subclasses differ in where the pieces come from and how whole tensors are
made available (``flat.py``, ``stage3.py``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from ...log import get_logger
from ...optim.gorp import GORP
from ..config_checks import UnsupportedSetupError
from ..driver import ZeroDriver
from ..layout import FlatTensor
from ..lowrank_targets import ClaimedTargets, LowRankTargets
from .base import Distributor, Masters

log = get_logger(__name__)


def group_all_reduce(group: Any) -> Callable[[Tensor], None]:
    """In-place sum of a tensor over ``group``."""

    def all_reduce(tensor: Tensor) -> None:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM, group=group)

    return all_reduce


class ShardedDistributor(Distributor):
    """A ZeRO engine's GORP: ``driver`` steps this rank's pieces, ``group`` is the data-parallel
    group (DeepSpeed's)."""

    def __init__(self, engine: Any, optimizer: GORP, params_by_name: dict[str, nn.Parameter], *,
                 driver: ZeroDriver, group: Any, low_rank: LowRankTargets | None) -> None:
        super().__init__(engine, optimizer, params_by_name, low_rank)
        self.driver = driver
        self.group = group

    # ------------------------------------------------------------------ start-up
    @staticmethod
    @abstractmethod
    def zero_optimizer_class() -> type:
        """The DeepSpeed optimizer this distributor reads (imported only when asked)."""

    @classmethod
    def check_zero_optimizer(cls, engine: Any, optimizer: GORP, source: Any) -> None:
        """DeepSpeed must have wrapped GORP in the plain ZeRO optimizer of the configured stage."""
        if type(engine.optimizer) is not cls.zero_optimizer_class() or engine.optimizer.optimizer is not optimizer:
            raise UnsupportedSetupError(
                f"{source}: DeepSpeed built {type(engine.optimizer).__name__} around GORP; only the plain ZeRO-1/2/3 "
                "optimizer is supported"
            )

    @classmethod
    @abstractmethod
    def install(cls, engine: Any, optimizer: GORP, params_by_name: dict[str, nn.Parameter],
                claimed: ClaimedTargets | None, source: Any, *, refresh_from: str,
                refresh_memory_mib: float) -> ShardedDistributor:
        """Read the partition geometry off ``engine`` and install GORP's driver; with ``claimed``,
        build the projected targets (refreshing as ``refresh_from``/``refresh_memory_mib`` say) on
        this rank's share and hook them into DeepSpeed's step. Refuses, naming ``source``, what the
        built engine does not support."""

    # ------------------------------------------------------------------ masters
    def held_masters(self) -> Masters:
        owned = self.low_rank.held_masters() if self.low_rank is not None else {}
        return {
            **{name: (piece.elem_start, piece.elem_end, master)
               for name, (piece, master) in self.driver.master_pieces(self.optimizer).items()},
            **owned,
        }

    def primary_holders(self) -> set[str]:
        """Where this rank is the lowest-ranked holder of a ZeRO partition, and rank 0 for the
        projected ``full`` targets (whose low-rank state every rank holds alike)."""
        primary = set()
        for layout in self.driver.layouts:
            for name, owners in layout.owners().items():
                if owners and owners[0] == self.driver.rank:
                    primary.add(name)
        if self.low_rank is not None and self.rank == 0:
            primary |= {m.name for m in self.low_rank.members}
        return primary

    @abstractmethod
    def _model_slice(self, param: nn.Parameter, start: int, end: int) -> Tensor:
        """Elements ``[start, end)`` of the flattened model weight ``param`` as this rank holds them."""

    @torch.no_grad()
    def masters_from_model(self, names: Iterable[str]) -> None:
        masters = self.held_masters()
        for name in names:
            if name in masters:
                start, end, master = masters[name]
                master.copy_(self._model_slice(self.params_by_name[name], start, end))

    @torch.no_grad()
    def gather_masters(self, names: Iterable[str], to_rank: int | None = None) -> dict[str, Tensor]:
        """Every rank copies the elements it holds into one zero buffer (all tensors back to back)
        and one all-reduce — or a reduce to ``to_rank`` — sums them; exact, since ZeRO gives each
        element to exactly one rank. Meant for small sets (LoRA factors) or one large tensor at a
        time."""
        names = list(names)
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

    def held_state_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (-1,)

    # ------------------------------------------------------------------ the step
    def _step_gradients(self) -> list[Tensor]:
        """ZeRO has reduced the averaged gradients into each rank's partition after the step's last
        backward (``averaged_gradients``: per group a flat tensor or a list of per-parameter views)."""
        grads: list[Tensor] = []
        for part in getattr(self.engine.optimizer, "averaged_gradients", {}).values():
            if part is None:
                continue
            grads.extend(t for t in (part if isinstance(part, (list, tuple)) else [part]) if t is not None and t.numel())
        return grads

    def _agree_on_flag(self, found: Tensor) -> None:
        if torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.all_reduce(found, op=torch_dist.ReduceOp.MAX, group=self.group)
