"""One process without DeepSpeed partitions: every tensor whole, its parameter its own master.

GORP's default driver steps whole parameters; nothing is gathered, nothing is partitioned. Used
where a process holds the optimizer without a ZeRO engine (checkpoint and export tools, tests).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ...optim.gorp import GORP
from ..lowrank_targets import LowRankTargets
from .base import Distributor, Masters


class LocalDistributor(Distributor):
    """Whole tensors in one process (``engine`` may be None)."""

    def __init__(self, optimizer: GORP, params_by_name: dict[str, nn.Parameter], *,
                 low_rank: LowRankTargets | None = None, engine: Any = None) -> None:
        super().__init__(engine, optimizer, params_by_name, low_rank)

    def held_masters(self) -> Masters:
        owned = self.low_rank.held_masters() if self.low_rank is not None else {}
        return {**{name: (0, p.numel(), p.data.view(-1)) for name, p in self.params_by_name.items()}, **owned}

    def replicated_names(self) -> set[str]:
        return {m.name for m in self.low_rank.members} if self.low_rank is not None else set()

    def primary_holders(self) -> set[str]:
        return set(self.params_by_name)

    def masters_from_model(self, names: Iterable[str]) -> None:
        """Nothing to do: the parameters are the masters."""

    @torch.no_grad()
    def model_from_masters(self) -> None:
        if self.low_rank is not None:
            self.low_rank.write_back_masters()

    @torch.no_grad()
    def gather_masters(self, names: Iterable[str], to_rank: int | None = None) -> dict[str, Tensor]:
        return {n: self.params_by_name[n].data.float().clone() for n in names}

    def held_state_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    @contextmanager
    def gathered(self, params: Iterable[Tensor], modify: bool = False) -> Iterator[None]:
        yield  # every tensor is whole already

    @contextmanager
    def for_generation(self, strategy: str = "auto") -> Iterator[str]:
        yield "none"

    def _step_gradients(self) -> list[Tensor]:
        return [p.grad for p in self.params_by_name.values() if p.grad is not None and p.grad.numel()]

    def _agree_on_flag(self, found: Tensor) -> None:
        """Nothing to agree on: one process."""
