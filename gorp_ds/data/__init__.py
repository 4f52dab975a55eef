"""Data layer: tasks, task sequences, prompts, tokenisation and deterministic batch order.

Sources: the embedded generated suite (default), O-LoRA's CL_Benchmark layout (orders A/B/C or
custom sequences), task folders declaring their kind and metric (``task.json``: classification,
instruction or chat files) and any ``datasets`` source (``"hf:<spec>"``). Every data problem raises
:class:`DataError` while loading, before training starts.
"""

from .config import DataConfig
from .embedded import EMBEDDED_DEFAULT
from .errors import DataError
from .registry import ORDERS, load_task_sequence
from .sampling import global_batch_order, rank_slice, split_micro_batches
from .tasks import Example, Task
from .tokenize import (
    collate_training,
    encode_for_training,
    encode_prompts,
    is_correct,
    normalize_answer,
)

__all__ = [
    "EMBEDDED_DEFAULT",
    "ORDERS",
    "DataConfig",
    "DataError",
    "Example",
    "Task",
    "collate_training",
    "encode_for_training",
    "encode_prompts",
    "global_batch_order",
    "is_correct",
    "load_task_sequence",
    "normalize_answer",
    "rank_slice",
    "split_micro_batches",
]
