"""Every recipe in recipes/ is a valid run file for today's config loader."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gorp_ds.cl import add_arguments, build_run_config
from gorp_ds.cl.command_line import read_run_file
from tests.support import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_the_three_recipes_exist() -> None:
    assert {p.name for p in RECIPES} >= {"embedded_quick.yaml", "llama2_7b_order1.yaml", "llama2_7b_order4_long.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_validates(recipe: Path) -> None:
    settings = {flat: value for flat, (value, _) in read_run_file(str(recipe)).settings.items()}
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = build_run_config(parser.parse_args(["--config", str(recipe)]))
    for key, value in settings.items():
        assert cfg.value(key) == value, key
    if cfg.data.order in ("1", "4"):
        assert (cfg.data.max_source_length, cfg.data.max_target_length) == (512, 50)
        assert (cfg.optimizer.lr_lora, cfg.optimizer.lr_full, cfg.optimizer.rank, cfg.optimizer.update_gap, cfg.optimizer.scale) == (2e-4, 1e-6, 8, 20, 0.25)
