"""The continual-learning runner: task sequences, the matrix R of per-task scores and its metrics."""

from .command_line import add_arguments, build_run_config
from .config import ConfigError, RunConfig
from .metrics import all_metrics, average_accuracy, backward_transfer, forgetting, forward_transfer

__all__ = [
    "ConfigError", "RunConfig", "add_arguments", "build_run_config", "all_metrics", "average_accuracy",
    "backward_transfer", "forward_transfer", "forgetting",
]
