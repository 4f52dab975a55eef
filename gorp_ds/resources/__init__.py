"""Files the package ships beside its code: the run presets (``recipes/*.yaml``) and the DeepSpeed
configurations (``ds_configs/*.json``).

They live inside the package so that an installed wheel finds them as a checkout does; the
checkout's top-level ``recipes/`` and ``ds_configs/`` are links to these folders, so the commands
in the README (``--ds_config ds_configs/zero2.json``) read the same files.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
RECIPES = ROOT / "recipes"
DS_CONFIGS = ROOT / "ds_configs"
# The DeepSpeed configuration a run uses when --ds_config is not given, by the run's dtype.
DEFAULT_DS_CONFIG = {"bf16": DS_CONFIGS / "zero2.json", "fp32": DS_CONFIGS / "zero2_fp32.json"}


def default_ds_config(dtype: str) -> Path:
    """The shipped DeepSpeed configuration for a run of ``dtype`` ("bf16" or "fp32")."""
    return DEFAULT_DS_CONFIG[dtype]


def stage_ds_config(stage: int) -> Path | None:
    """The shipped ``ds_configs/zero{stage}.json``, where there is one."""
    path = DS_CONFIGS / f"zero{stage}.json"
    return path if path.is_file() else None
