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
