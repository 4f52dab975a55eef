"""Where GORP's trainable tensors live, one class per case behind :class:`Distributor`:

==========================  =====================================================================
:class:`LocalDistributor`    one process, no DeepSpeed: whole tensors (tools, tests)
:class:`FlatPartitionDistributor`  ZeRO-1/2: flat fp32 partitions, whole bf16 weights on every rank
:class:`Stage3Distributor`   ZeRO-3: every tensor partitioned on its own
==========================  =====================================================================

:func:`select_distributor_class` picks the ZeRO class once, from the stage of the (checked)
DeepSpeed config; the projected ``full`` targets are a component every ZeRO class can carry
(:class:`~gorp_ds.zero.lowrank_targets.LowRankTargets`).
"""

from __future__ import annotations

from ..config_checks import UnsupportedSetupError
from .base import Distributor, Masters
from .flat import FlatPartitionDistributor
from .local import LocalDistributor
from .sharded import ShardedDistributor
from .stage3 import Stage3Distributor

_BY_STAGE: dict[int, type[ShardedDistributor]] = {
    1: FlatPartitionDistributor,
    2: FlatPartitionDistributor,
    3: Stage3Distributor,
}


def select_distributor_class(stage: int) -> type[ShardedDistributor]:
    """The distributor for ZeRO ``stage`` (as returned by
    :func:`~gorp_ds.zero.config_checks.check_supported`, which refuses the others first)."""
    try:
        return _BY_STAGE[stage]
    except KeyError:
        raise UnsupportedSetupError(f"ZeRO stage {stage} has no GORP distributor; use stage 1, 2 or 3") from None


__all__ = [
    "Distributor", "Masters", "LocalDistributor", "ShardedDistributor", "FlatPartitionDistributor",
    "Stage3Distributor", "select_distributor_class",
]
