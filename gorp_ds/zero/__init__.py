"""GORP under DeepSpeed ZeRO-1/2/3: the parallel layer (the only code that knows ZeRO internals:
the distributors and ``deepspeed_patches``)."""

from .checkpoint import (
    CheckpointError,
    has_checkpoint,
    load_checkpoint,
    load_gorp_state,
    load_state,
    read_client_state,
    read_masters,
    save_checkpoint,
    save_gorp_state,
    save_state,
)
from .config_checks import UnsupportedSetupError, check_supported, load_ds_config
from .deepspeed_bridge import initialize
from .distributor import (
    Distributor,
    FlatPartitionDistributor,
    LocalDistributor,
    Stage3Distributor,
    select_distributor_class,
)
from .driver import ZeroDriver
from .layout import FlatTensor, GroupLayout, Piece
from .lowrank_targets import ClaimedTargets, LowRankTargets, claim_targets

__all__ = [
    "initialize", "check_supported", "load_ds_config", "UnsupportedSetupError", "Distributor", "LocalDistributor",
    "FlatPartitionDistributor", "Stage3Distributor", "select_distributor_class", "ZeroDriver",
    "GroupLayout", "FlatTensor", "Piece", "save_checkpoint", "load_checkpoint", "save_gorp_state",
    "load_gorp_state", "CheckpointError", "read_client_state", "has_checkpoint", "read_masters", "save_state", "load_state",
    "LowRankTargets", "ClaimedTargets", "claim_targets",
]
