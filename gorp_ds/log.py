"""The project's one logger: everything goes through ``get_logger`` and only rank 0 prints.
What the libraries print is decided here too: :func:`quiet_third_party` (warnings, log records
and progress bars that tell the user nothing) and :func:`show_progress` (one bar per node).

The rank is read from the launcher's environment (``RANK``), so this module imports nothing
distributed and can be used by the pure optimizer code as well.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

_ROOT = "gorp_ds"


def _first_int(*names: str) -> int:
    """The first of the launcher variables ``names`` that is set to an integer; 0 when none is."""
    for var in names:
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


def process_rank() -> int:
    """Global rank as set by deepspeed/torchrun/SLURM launchers; 0 in a plain process."""
    return _first_int("RANK", "SLURM_PROCID")


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


def local_rank() -> int:
    """This process's rank on its node, as set by the launchers; 0 in a plain process.

    ``LOCAL_RANK`` (set per process by deepspeed/torchrun) comes first: under SLURM the deepspeed
    launcher runs as one srun task per node, so every rank inherits that task's ``SLURM_LOCALID``."""
    return _first_int("LOCAL_RANK", "SLURM_LOCALID")


def show_progress() -> bool:
    """Whether this process draws progress bars: one per node, by its local rank 0.

    The ranks step in lockstep, so one bar says what every bar would; each node's log (SLURM
    writes one per node) still shows that its ranks are moving. Every bar of the project passes
    ``disable=not show_progress()``; :func:`quiet_third_party` does the same for the libraries'."""
    return local_rank() == 0


# Third-party Python warnings that a run cannot act on: (category, message regex, module regex).
# Each is matched on all three, so the same message from elsewhere, or another deprecation from the
# same module, is still shown. The project's own deprecated calls are fixed, never filtered here.
_IGNORED_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # DeepSpeed 0.19 calls these collectives (deepspeed/comm/torch.py), deprecated in torch 2.13:
    # ZeRO-1/2 gather the updated partitions after every step, ZeRO-3 reduce-scatters the gradients
    # after every backward. The project never calls them; the fix is DeepSpeed's. torch attributes
    # the warning to its c10d_logger wrapper, hence that module.
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
     r"torch\.distributed\.c10d_logger$"),
)

# Third-party log records dropped: (logger name, message regex).
_DROPPED_RECORDS: tuple[tuple[str, str], ...] = (
    # Once per engine, i.e. per method: GORP is the project's own optimizer, which
    # gorp_ds.zero.initialize allows deliberately (zero_allow_untested_optimizer) after checking the
    # ZeRO setup (check_supported refuses the ones it does not support).
    ("DeepSpeed", r"You are using ZeRO with an untested optimizer"),
)


class _DropRecords(logging.Filter):
    """Drops a logger's records whose message matches ``pattern`` (installed once per logger)."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.search(record.getMessage()) is None


def quiet_third_party() -> None:
    """Start-up of a run: the libraries' output that tells the user nothing is silenced, precisely.

    * the warnings of ``_IGNORED_WARNINGS`` (by category, message and module; nothing else);
    * DeepSpeed's log records of ``_DROPPED_RECORDS``;
    * on every rank but a node's local rank 0, the progress bars of transformers and the Hugging
      Face hub (model loading, downloads): every rank loads the model, and the bars of a node's
      ranks share one terminal line.

    Idempotent: the runner calls it for every run of a process."""
    for category, message, module in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, pattern in _DROPPED_RECORDS:
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) and f.pattern.pattern == pattern for f in target.filters):
            target.addFilter(_DropRecords(pattern))
    if not show_progress():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' bars and huggingface_hub's
