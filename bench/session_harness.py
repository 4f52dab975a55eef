"""The runner's settings for benches that drive ``MethodSession``s themselves (``step_profile.py``,
``train_time.py``): everything after ``--`` is parsed as ``launch/train.py`` would parse it, with
the output under ``<out>/run`` and no checkpoints or export (they are not what these benches time)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def bench_arguments(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, list[str]]:
    """The bench's own options (``parser``, plus the launcher's hidden ``--local_rank``) and the
    runner arguments after ``--``."""
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    own, rest = parser.parse_known_args()
    return own, rest[1:] if rest and rest[0] == "--" else rest


def run_config(rest: list[str], out: str) -> tuple[Any, str]:
    """``(RunConfig, DeepSpeed config path)`` from the runner arguments ``rest``; the path is
    ``--ds_config`` or the runner's default for the dtype."""
    from gorp_ds.cl import add_arguments, build_run_config

    run_parser = argparse.ArgumentParser()
    add_arguments(run_parser)
    args = run_parser.parse_args(rest + ["--output-dir", os.path.join(out, "run"), "--overwrite",
                                         "--checkpoints", "false", "--export", "false"])
    cfg = build_run_config(args)
    default = "zero2.json" if cfg.base_model.dtype == "bf16" else "zero2_fp32.json"
    return cfg, args.ds_config or str(REPO / "ds_configs" / default)
