"""gorp_ds main job: a whole continual-learning task sequence in one launch (``gorp-ds train`` for a
checkout; the command is in ``gorp_ds/cli.py``).

    deepspeed launch/train.py --ds_config ds_configs/zero2.json            # embedded default
    deepspeed launch/train.py --ds_config ds_configs/zero2.json --config my_run.yaml --method gorp,o-lora
    python launch/train.py --tasks emb_color --max-steps-per-task 2          # one process, no launcher
    python launch/train.py --config my_run.yaml --print-config              # resolved settings, sources

Exit status: 0 done, 2 bad input, a busy port or a checkpoint that cannot be written/read (one
``gorp_ds: error:`` line), 75 pre-empted by SIGTERM/SIGUSR1 after checkpointing the last step
(resume with ``--resume``; the SLURM script requeues on 75).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, str(REPO))

from gorp_ds.cli import exit_keeping_status, train  # noqa: E402  (after the checkout is on the path)

PROG = "launch/train.py"


def main(argv: list[str] | None = None) -> int:
    """The run's status (0, 2 or 75) for ``argv`` (default: this process's arguments)."""
    return train(sys.argv[1:] if argv is None else argv, PROG)


_exit = exit_keeping_status  # the exit that keeps the status (tests call it by this name)

if __name__ == "__main__":
    exit_keeping_status(main())
