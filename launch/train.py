"""gorp_ds main job: a whole continual-learning task sequence in one launch.

    deepspeed launch/train.py --ds_config ds_configs/zero2.json            # embedded default
    deepspeed launch/train.py --ds_config ds_configs/zero2.json --config my_run.yaml --method gorp,o-lora

Exit status: 0 done, 2 bad input or a checkpoint that cannot be written/read (one
``gorp_ds: error:`` line), 75 pre-empted by SIGTERM/SIGUSR1 after checkpointing the last step
(resume with ``--resume``; the SLURM script requeues on 75).
    deepspeed launch/train.py --config my_run.yaml --print-config           # resolved settings, sources

Settings: `--help` lists every one (grouped by section, with its default); a run file holds the same
settings by section (`optimizer: {rank: 8}`) or flat (`rank: 8`).

Bad input (missing data, unknown task or method, targets that match nothing, a DeepSpeed config
that contradicts the run, an --output-dir holding another run) stops every rank before training
with a one-line message and status 2, printed once per node (by its local rank 0) with the node's
host name; so does a run whose loss or gradients stay non-finite.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, str(REPO))
DEFAULT_DS_CONFIG = {"bf16": REPO / "ds_configs" / "zero2.json", "fp32": REPO / "ds_configs" / "zero2_fp32.json"}


def main(argv: list[str] | None = None) -> int:
    from gorp_ds.cl import add_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    finally:
        _shutdown_distributed()


def _run(args: argparse.Namespace) -> int:
    from gorp_ds.cl import ConfigError, build_run_config
    from gorp_ds.cl.config import format_config
    from gorp_ds.cl.nonfinite import NonFiniteError
    from gorp_ds.cl.preemption import Preempted
    from gorp_ds.data.errors import DataError
    from gorp_ds.log import local_rank
    from gorp_ds.models import ModelError, RoleError
    from gorp_ds.settings import SettingError
    from gorp_ds.zero import CheckpointError, UnsupportedSetupError

    user_errors = (ConfigError, DataError, ModelError, RoleError, UnsupportedSetupError, CheckpointError, SettingError,
                   NonFiniteError)
    try:
        cfg = build_run_config(args)
        if args.print_config:
            if local_rank() == 0 and os.environ.get("RANK", "0") == "0":
                print(format_config(cfg), flush=True)
            return 0
        from gorp_ds.cl.runner import run

        run(cfg, args.ds_config or str(DEFAULT_DS_CONFIG[cfg.dtype]))
    except user_errors as err:
        # Once per node: every rank of a launch stops with the same error (the runner agrees on it
        # across ranks), and a node's local rank 0 says so with the node's name.
        _close_progress_bars()
        if local_rank() == 0:
            print(f"gorp_ds: error: {socket.gethostname()}: {err}", file=sys.stderr, flush=True)
        return 2
    except Preempted as stop:  # SIGTERM/SIGUSR1: the checkpoint of the last step is committed
        _close_progress_bars()
        if os.environ.get("RANK", "0") == "0":
            print(f"gorp_ds: {stop}", file=sys.stderr, flush=True)
        from gorp_ds.cl.preemption import REQUEUE_STATUS

        return REQUEUE_STATUS
    return 0


def _shutdown_distributed() -> None:
    """Destroy the process group before the interpreter exits, whatever the exit status: the
    communication library's threads and sockets are closed in order instead of by the interpreter's
    teardown."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _close_progress_bars() -> None:
    """End an interrupted progress bar's line, so that the message starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _exit(status: int) -> None:
    """Exit with ``status`` once everything is written, without the interpreter's teardown.

    Two-rank CPU launches were seen to abort after a clean finish, in the teardown that follows
    ``sys.exit`` ("terminate called without an active exception" from a C++ destructor; about one
    launch in sixty of the test suite, never reproduced alone), and the launcher then reported 250
    instead of 0, 2 or 75: a pre-empted SLURM job would not be requeued. So the Python-level
    clean-up runs here, in order: the ``atexit`` handlers (W&B's finish among them), the logging
    handlers, the standard streams; then ``os._exit`` skips the module teardown and the C++ static
    destructors, where nothing of the run is left to write (results, checkpoints and TensorBoard
    events are written and flushed as they are produced)."""
    import atexit
    import logging

    try:
        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


if __name__ == "__main__":
    _exit(main())
