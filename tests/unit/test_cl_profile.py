"""``--profile``: off by default, a bare flag turns it on, and only then are phases timed."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from gorp_ds.cl.command_line import add_arguments, build_run_config
from gorp_ds.cl.config import ConfigError
from gorp_ds.cl.session import PhaseTimer


def _cfg(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return build_run_config(parser.parse_args(argv))


def test_profile_flag(tmp_path):
    assert _cfg([]).runner.profile is False
    assert _cfg(["--profile"]).runner.profile is True
    assert _cfg(["--profile", "false"]).runner.profile is False
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps({"profile": True}))
    assert _cfg(["--config", str(run_file)]).runner.profile is True
    assert _cfg(["--checkpoints", "false"]).runner.checkpoints is False  # other booleans still take a value
    with pytest.raises(ConfigError, match="--profile must be true or false, got 'maybe'"):
        _cfg(["--profile", "maybe"])


def test_phase_timer_times_only_when_enabled():
    off = PhaseTimer(torch.device("cpu"), enabled=False)
    with off("forward"):
        pass
    assert off.seconds == {} and "--profile" in off.summary()
    on = PhaseTimer(torch.device("cpu"), enabled=True)
    with on("forward"):
        pass
    with on("backward"):
        pass
    assert list(on.seconds) == ["forward", "backward"] and "forward" in on.summary()
