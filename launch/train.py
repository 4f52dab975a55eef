"""gorp_ds main job: a whole continual-learning task sequence in one launch.

    deepspeed launch/train.py --ds_config ds_configs/zero2.json            # embedded default
    deepspeed launch/train.py --ds_config ds_configs/zero2.json --config my_run.yaml --method gorp,o-lora

Exit status: 0 done, 2 bad input or a checkpoint that cannot be written/read (one
``gorp_ds: error:`` line), 75 pre-empted by SIGTERM/SIGUSR1 after checkpointing the last step
(resume with ``--resume``; the SLURM script requeues on 75).

Bad input (missing data, unknown task or method, targets that match nothing, a DeepSpeed config
that contradicts the run, an --output-dir holding another run) stops every rank before training
with a one-line message and status 2; so does a run whose loss or gradients stay non-finite.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, str(REPO))
DEFAULT_DS_CONFIG = REPO / "ds_configs" / "zero2.json"


def main(argv: list[str] | None = None) -> int:
    from gorp_ds.cl import ConfigError, add_arguments, build_run_config
    from gorp_ds.cl.nonfinite import NonFiniteError
    from gorp_ds.cl.preemption import Preempted
    from gorp_ds.data.errors import DataError
    from gorp_ds.models import ModelError, RoleError
    from gorp_ds.zero import CheckpointError, UnsupportedSetupError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    user_errors = (ConfigError, DataError, ModelError, RoleError, UnsupportedSetupError, CheckpointError,
                   NonFiniteError)
    try:
        cfg = build_run_config(args)
        from gorp_ds.cl.runner import run

        run(cfg, args.ds_config or str(DEFAULT_DS_CONFIG))
    except user_errors as err:
        _close_progress_bars()
        if os.environ.get("RANK", "0") == "0":
            print(f"gorp_ds: error: {err}", file=sys.stderr, flush=True)
        return 2
    except Preempted as stop:  # SIGTERM/SIGUSR1: the checkpoint of the last step is committed
        _close_progress_bars()
        if os.environ.get("RANK", "0") == "0":
            print(f"gorp_ds: {stop}", file=sys.stderr, flush=True)
        from gorp_ds.cl.preemption import REQUEUE_STATUS

        return REQUEUE_STATUS
    return 0


def _close_progress_bars() -> None:
    """End an interrupted progress bar's line, so that the message starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
