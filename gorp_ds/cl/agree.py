"""All ranks stop together on bad input: each rank runs its own checks (nodes need not share a
filesystem: a data path may exist on one node only), then one all-gather tells every rank what
every other found. A rank that found a problem raises its own; the others raise the first one
found, naming the rank and host that saw it. No rank is left waiting in a collective for one
that stopped."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable

import torch.distributed as dist

from ..safe_write import WriteError
from .config import ConfigError

_DATA_FIELD = re.compile(r"\bdata\.([a-z_]+)\b")


def in_user_terms(message: str, spelling: Callable[[str], str | None]) -> str:
    """Data-layer messages name fields as ``data.<field>``; the run names them as the user wrote
    them (``--data-dir``, ``--config run.yaml: data_dir``)."""
    return _DATA_FIELD.sub(lambda m: spelling(m[1]) or m[0], message)


def agree_on_errors(error: Exception | None) -> None:
    """Raise on every rank if any rank found a problem (``error``); a no-op when none did."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    found: list[tuple[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(found, (str(error), socket.gethostname()) if error is not None else None)
    if error is not None:
        raise error
    first = next(((rank, item) for rank, item in enumerate(found) if item is not None), None)
    if first is not None:
        rank, (message, host) = first
        raise ConfigError(f"{message} (seen by rank {rank} on host {host})")


def agreed(write: Callable[[], object]) -> None:
    """Run ``write`` (on every rank; where only rank 0 writes, the others may take part in its
    collectives), then stop every rank together when a rank's write failed: that rank raises its
    :class:`~gorp_ds.safe_write.WriteError` (the one line naming the file, the bytes needed and
    free), the others an error naming it, instead of failing in their next collective once the
    writing rank is gone."""
    error: WriteError | None = None
    try:
        write()
    except WriteError as err:
        error = err
    agree_on_errors(error)
