"""The output-directory decision on two ranks, with a shared filesystem and without one.

One spawned 2-rank gloo group runs every scenario. Nodes without a shared filesystem see different
contents at the same path; that is simulated by giving rank 1 its own directory (``local``) and
making it the first rank of its "node" (LOCAL_RANK 0). No model is loaded: ``settle_output_dir`` and
the output-path check (``path_problem``, then ``agree_on_errors``) are called directly, as
``prepare`` calls them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gorp_ds.cl.config import flatten_run
from tests.support.dist_utils import run_ranks

DS = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "gradient_clipping": 1.0,
      "train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}


def _hold_run(folder: Path, lr: float = 1e-3, checkpoint: bool = True) -> None:
    """An earlier run's files: config.yaml, a checkpoint pointer and TensorBoard events."""
    import yaml

    from gorp_ds.cl.config import RunConfig
    from gorp_ds.cl.run_dir import resolved_config

    (folder / "gorp" / "checkpoints").mkdir(parents=True)
    if checkpoint:
        (folder / "gorp" / "checkpoints" / "latest").write_text("task01_step000002")
    (folder / "tensorboard" / "gorp").mkdir(parents=True)
    (folder / "tensorboard" / "gorp" / "events.out.tfevents.1.host").write_text("old")
    cfg = RunConfig.from_flat(output_dir=str(folder), lr_lora=lr, methods=["gorp"])
    (folder / "config.yaml").write_text(yaml.safe_dump(resolved_config(cfg, DS, 2)))


def _scenarios(rank: int, world: int, root: str) -> dict:
    import torch.distributed as dist

    from gorp_ds.cl.agree import agree_on_errors
    from gorp_ds.cl.config import ConfigError, RunConfig
    from gorp_ds.cl.run_dir import path_problem, settle_output_dir

    root_path = Path(root)
    outcomes = {}

    def settle(name: str, shared: bool, **settings):
        """``settle_output_dir`` for scenario ``name``; rank 1 uses its own directory unless ``shared``."""
        folder = root_path / name / ("shared" if shared or rank == 0 else "local")
        cfg = RunConfig.from_flat(output_dir=str(folder), methods=["gorp"], **settings)
        if not shared and rank == 1:
            os.environ["LOCAL_RANK"] = "0"  # the first rank of another node
        try:
            problem = path_problem(cfg.runner.output_dir)
            agree_on_errors(ConfigError(problem) if problem else None)
            decision = settle_output_dir(cfg, DS, world)
            outcomes[name] = {"resume": decision.resume, "error": None}
        except ConfigError as err:
            outcomes[name] = {"error": str(err)}
        finally:
            os.environ["LOCAL_RANK"] = str(rank)
        dist.barrier()

    if rank == 0:  # the directories exist before the group acts on them
        _hold_run(root_path / "used" / "shared")
        _hold_run(root_path / "resume" / "shared", lr=1e-3)
        _hold_run(root_path / "overwrite" / "shared")
        _hold_run(root_path / "overwrite" / "local")
        (root_path / "fresh").mkdir()
        _hold_run(root_path / "fresh" / "local")
        # killed before its first checkpoint: config.yaml and TensorBoard events, no checkpoint
        _hold_run(root_path / "auto_nothing" / "shared", checkpoint=False)
        (root_path / "blocked").mkdir()
        (root_path / "blocked" / "local").write_text("a file where rank 1's directory should be")
    dist.barrier()
    settle("used", shared=True)
    settle("resume", shared=True, resume="on", lr_lora=2e-3)
    settle("overwrite", shared=False, overwrite=True)
    settle("fresh", shared=False)
    settle("blocked", shared=False)
    settle("auto_nothing", shared=True, resume="auto")
    return outcomes


@pytest.fixture(scope="module")
def outcome(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("run_dir")
    ranks = run_ranks(2, _scenarios, str(root), out_dir=str(root / "_results"))
    return {"root": root, "ranks": ranks}


def test_used_directory_stops_every_rank_with_the_same_error(outcome) -> None:
    first, second = (r["used"] for r in outcome["ranks"])
    assert first["error"] and first == second
    assert "already holds a run" in first["error"] and "--overwrite" in first["error"]


def test_resume_decided_alike_and_changed_settings_allowed(outcome) -> None:
    assert [r["resume"] for r in outcome["ranks"]] == [{"resume": True, "error": None}] * 2
    import yaml

    saved = yaml.safe_load((outcome["root"] / "resume" / "shared" / "config.yaml").read_text())
    assert flatten_run(saved["run"])["lr_lora"] == 2e-3  # config.yaml now holds the values in force


def test_overwrite_clears_every_nodes_copy(outcome) -> None:
    root = outcome["root"] / "overwrite"
    assert all(r["overwrite"]["error"] is None for r in outcome["ranks"])
    moved = sorted(p.name for p in root.iterdir() if ".old-" in p.name)
    assert len(moved) == 2 and moved[0].startswith("local.old-") and moved[1].startswith("shared.old-")
    for folder in moved:
        assert (root / folder / "gorp" / "checkpoints" / "latest").is_file()
        assert (root / folder / "tensorboard" / "gorp" / "events.out.tfevents.1.host").is_file()
    assert (root / "shared" / "config.yaml").is_file() and not (root / "shared" / "gorp").exists()
    assert not (root / "local").exists() or not any((root / "local").iterdir())


def test_fresh_run_moves_a_stale_copy_on_another_node_aside(outcome) -> None:
    root = outcome["root"] / "fresh"
    assert all(r["fresh"]["error"] is None for r in outcome["ranks"])
    assert (root / "shared" / "config.yaml").is_file()
    assert [p.name.split(".old-")[0] for p in root.iterdir() if ".old-" in p.name] == ["local"]


def test_an_unwritable_path_on_one_rank_stops_all(outcome) -> None:
    first, second = (r["blocked"] for r in outcome["ranks"])
    # rank 1 saw the problem and says it; rank 0 says the same and names the rank that saw it
    assert second["error"] and "is a file" in second["error"]
    assert first["error"].startswith(second["error"] + " (seen by rank 1 on host ")
    assert not (outcome["root"] / "blocked" / "shared").exists()  # rank 0 wrote nothing


def test_resume_auto_with_nothing_to_resume_starts_fresh(outcome) -> None:
    """The requeue of a launch killed before its first checkpoint: a fresh start, the earlier
    attempt's files (TensorBoard events) moved aside so they do not mix with the new ones."""
    root = outcome["root"] / "auto_nothing"
    assert [r["auto_nothing"] for r in outcome["ranks"]] == [{"resume": False, "error": None}] * 2
    (aside,) = [p for p in root.iterdir() if p.name.startswith("shared.old-")]
    assert (aside / "tensorboard" / "gorp" / "events.out.tfevents.1.host").is_file()
    assert sorted(p.name for p in (root / "shared").iterdir()) == ["config.yaml"]
