"""GORP under DeepSpeed ZeRO-1/2: the parallel layer (the only code that knows ZeRO internals)."""

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
from .deepspeed_bridge import UnsupportedSetupError, ZeroHandle, check_supported, initialize, load_ds_config
from .driver import ZeroDriver
from .layout import FlatTensor, GroupLayout, Piece
from .lowrank_targets import LowRankTargets

__all__ = [
    "initialize", "check_supported", "load_ds_config", "UnsupportedSetupError", "ZeroHandle", "ZeroDriver",
    "GroupLayout", "FlatTensor", "Piece", "save_checkpoint", "load_checkpoint", "save_gorp_state",
    "load_gorp_state", "CheckpointError", "read_client_state", "has_checkpoint", "read_masters", "save_state", "load_state",
    "LowRankTargets",
]
