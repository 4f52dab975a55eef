"""The W&B section of the DeepSpeed config (gorp_ds/cl/wandb_log.py): what start-up refuses, and that
DeepSpeed never gets the section. Needs no wandb package; the W&B run itself is tested in
tests/integration/test_cl_wandb.py."""

from __future__ import annotations

import importlib.util

import pytest

from gorp_ds.cl.wandb_log import take_wandb_section, wandb_problem


def test_missing_package_is_named_with_the_fix(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    problem = wandb_problem({"wandb": {"enabled": True, "project": "p"}})
    assert problem is not None and "'wandb.enabled'" in problem and "pip install 'gorp_ds[wandb]'" in problem
    # Disabled, or no section: nothing to install.
    assert wandb_problem({"wandb": {"enabled": False}}) is None
    assert wandb_problem({}) is None


@pytest.mark.parametrize(("section", "words"), [
    ("yes", ("'wandb'", "not an object")),
    ({"enabled": True, "name": "x"}, ("'wandb.name'", "enabled, project, group, team")),
])
def test_bad_section(section, words) -> None:
    problem = wandb_problem({"wandb": section})
    assert problem is not None and all(word in problem for word in words), problem


@pytest.mark.parametrize(("section", "taken"), [
    ({"enabled": True, "project": "p", "group": "g"}, {"enabled": True, "project": "p", "group": "g"}),
    ({"enabled": False, "project": "p"}, None),
    (None, None),
])
def test_deepspeed_never_gets_the_section(section, taken) -> None:
    config = {"zero_optimization": {"stage": 2}, "tensorboard": {"enabled": True}}
    if section is not None:
        config["wandb"] = section
    rest, got = take_wandb_section(config)
    assert "wandb" not in rest and rest == {k: v for k, v in config.items() if k != "wandb"}
    assert got == taken
    assert ("wandb" in config) == (section is not None)  # the caller's dict is left as it was


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch) -> None:
    """Two opens of one method directory (a launch, then its --resume) log into one W&B run: the id
    written by the first is passed back to wandb with resume allowed (offline W&B names each local
    run folder after its id); another method directory gets a run of its own."""
    pytest.importorskip("wandb", reason="the optional wandb package is not installed")
    from gorp_ds.cl.wandb_log import ID_FILE, open_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    section = {"enabled": True, "project": "gorp_ds_test"}
    ids = []
    for method_dir in ("gorp", "gorp", "seq-lora"):
        run = open_wandb(section, method_dir, 0, {"lr": 1e-3}, out_dir=str(tmp_path / "out" / method_dir))
        run.write([("train/loss", 1.0, len(ids) + 1)])
        run.finish()
        ids.append(run.id)
        assert (tmp_path / "out" / method_dir / ID_FILE).read_text().strip() == run.id
    assert ids[0] == ids[1] != ids[2]
    # offline-run-<date>_<time>-<run id>[-n]: W&B adds -n to a second folder made in the same second
    folders = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert sorted(name.split("-")[3] for name in folders) == sorted(ids), folders
    assert open_wandb(section, "gorp", 1, out_dir=str(tmp_path / "out" / "gorp")) is None  # rank 1 opens none
