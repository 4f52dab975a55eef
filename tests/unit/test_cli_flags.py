"""A bad flag is one ``gorp_ds: error:`` line like every other user error (gorp_ds/cli.py
FlagParser): the message argparse gives, the closest known flag of a misspelled one, and where the
flags are listed; never the whole usage text."""

from __future__ import annotations

import pytest

from gorp_ds.cli import check_before_start


def _error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        check_before_start(argv)
    assert stop.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("gorp_ds: error: "), err
    assert "usage:" not in err
    return lines[0]


@pytest.mark.parametrize("typo, meant", [("--max-step-per-task", "--max-steps-per-task"), ("--lr_full", "--lr-full"),
                                         ("--ouput-dir", "--output-dir"), ("--shared-treshold", "--shared-threshold")])
def test_a_misspelled_flag_names_the_closest_one(capsys, typo, meant) -> None:
    line = _error(capsys, [typo, "1"])
    assert f"gorp-ds train: unrecognized arguments: {typo} 1; did you mean {meant}?" in line, line
    assert line.endswith("('gorp-ds train --help' lists the flags)")


def test_other_flag_errors_are_argparse_messages_without_a_guess(capsys) -> None:
    line = _error(capsys, ["--lr-full"])
    assert "gorp-ds train: argument --lr-full: expected one argument (" in line and "did you mean" not in line
    line = _error(capsys, ["--zzzzzz", "3"])
    assert "unrecognized arguments: --zzzzzz 3 (" in line and "did you mean" not in line
