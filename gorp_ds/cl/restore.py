"""A method's engine rebuilt from any saved checkpoint, for export and evaluation: the run's
configuration comes from the checkpoint itself (client state ``run_config``), the weights and fp32
masters through the public checkpoint API (``gorp_ds.zero.load_checkpoint``), on any number of
ranks (one process included), whatever number wrote it.
"""

from __future__ import annotations

import os
from typing import Any

from ..data.tasks import Task
from ..log import get_logger
from ..zero import CheckpointError, has_checkpoint, read_client_state
from .config import RunConfig, reconcile_ds_config
from .session import MethodSession

log = get_logger(__name__)


def find_checkpoint(path: str) -> tuple[str, str | None] | None:
    """``(load_dir, tag)`` for a method's output directory (``<out>/<method>``), its
    ``checkpoints/`` folder, or one tag folder in it; ``None`` if ``path`` is none of those. A
    folder without ``latest`` but with committed tags counts: the tag is chosen when loading (the
    newest complete one, with a warning that says so)."""
    path = os.path.abspath(os.path.expanduser(path))
    if has_checkpoint(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    if has_checkpoint(path) and not os.path.isdir(os.path.join(path, "gorp_state")):
        return path, None
    if os.path.isdir(os.path.join(path, "gorp_state")):
        return os.path.dirname(path), os.path.basename(path)
    return None


def saved_run(load_dir: str, tag: str | None) -> tuple[str, RunConfig, dict[str, Any]]:
    """``(method, run configuration, client state)`` stored in a checkpoint."""
    client = read_client_state(load_dir, tag)
    saved = client.get("run_config")
    if not isinstance(saved, dict) or "method" not in client:
        raise CheckpointError(f"{load_dir}: the checkpoint holds no run configuration (written before gorp_ds "
                              "stored it); it cannot be rebuilt without one")
    cfg = RunConfig.from_dict(saved)
    return client["method"], cfg, client


def rebuild_session(load_dir: str, tag: str | None, tasks: list[Task], world: int,
                    out_dir: str, **overrides: Any) -> MethodSession:
    """The saved method's engine on this process group, the checkpoint loaded into it. Batch sizes
    are set to fit ``world`` (they do not affect the weights); ``overrides`` replace run settings
    that only concern evaluation (eval batch size, lengths, prompt format)."""
    method, cfg, client = saved_run(load_dir, tag)
    cfg = cfg.replace(global_batch_size=world, micro_batch_size=1, gradient_checkpointing=False,
                              checkpoints=False, **overrides)
    ds_config = reconcile_ds_config({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}, cfg, world,
                                    "the rebuilt engine's DeepSpeed config")
    session = MethodSession(method, tasks, cfg, ds_config, out_dir)
    session.resume(load_dir, tag, record_changes=False)  # batch sizes differ on purpose: not a resumed run
    log.info(f"[{method}] loaded checkpoint {os.path.join(load_dir, tag or 'latest')} (model {cfg.base_model.model}, {cfg.base_model.dtype})")
    return session
