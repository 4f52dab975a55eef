"""A CPU (gloo) process group beside the training group, for small host-side agreements
(checkpoint verdicts, the pre-emption stop step) that must not add a GPU synchronisation.

Created once, lazily, by the first caller; every rank reaches its first use at the same point of
the run (the first checkpoint or the first pre-emption check), as ``new_group`` requires.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_GROUP: Any = None


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def cpu_group() -> Any:
    """The gloo group over all ranks (the default group itself when that is gloo already)."""
    global _GROUP
    if _GROUP is None:
        _GROUP = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _GROUP


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a single process)."""
    if not distributed():
        return [obj]
    result: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(result, obj, group=cpu_group())
    return result


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=cpu_group())
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (one tiny CPU all-reduce)."""
    if not distributed():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=cpu_group())
    return bool(value.item())
