"""GORP under DeepSpeed ZeRO-1/2: the parallel layer (the only code that knows ZeRO internals)."""

from .checkpoint import CheckpointError, load_checkpoint, load_gorp_state, save_checkpoint, save_gorp_state
from .deepspeed_bridge import UnsupportedSetupError, ZeroHandle, check_supported, initialize, load_ds_config
from .driver import ZeroDriver
from .layout import FlatTensor, GroupLayout, Piece
from .lowrank_targets import LowRankTargets

__all__ = [
    "initialize", "check_supported", "load_ds_config", "UnsupportedSetupError", "ZeroHandle", "ZeroDriver",
    "GroupLayout", "FlatTensor", "Piece", "save_checkpoint", "load_checkpoint", "save_gorp_state",
    "load_gorp_state", "CheckpointError", "LowRankTargets",
]
