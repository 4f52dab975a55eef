"""The project's one logger: everything goes through ``get_logger`` and only rank 0 prints.

The rank is read from the launcher's environment (``RANK``), so this module imports nothing
distributed and can be used by the pure optimizer code as well.
"""

from __future__ import annotations

import logging
import os
import sys

_ROOT = "gorp_ds"


def process_rank() -> int:
    """Global rank as set by deepspeed/torchrun/SLURM launchers; 0 in a plain process."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return process_rank() == 0 or getattr(record, "all_ranks", False)


def _configure_root() -> logging.Logger:
    root = logging.getLogger(_ROOT)
    if not getattr(root, "_gorp_configured", False):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[gorp_ds %(asctime)s] %(message)s", datefmt="%H:%M:%S"))
        handler.addFilter(_RankZeroFilter())
        root.addHandler(handler)
        root.setLevel(os.environ.get("GORP_LOG_LEVEL", "INFO").upper())
        root.propagate = False
        root._gorp_configured = True  # type: ignore[attr-defined]
    return root


def get_logger(name: str | None = None) -> logging.Logger:
    """A child of the project logger; messages from ranks other than 0 are dropped unless
    logged with ``extra={"all_ranks": True}``."""
    root = _configure_root()
    return root if not name else root.getChild(name.removeprefix(_ROOT + "."))
