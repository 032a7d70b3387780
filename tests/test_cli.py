"""The command line: every command is listed, and every --help page renders."""

from __future__ import annotations

import pytest

from leukoscope.cli.main import COMMANDS, main


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
    assert "blast %" in out  # a literal '%' in a command's summary must not break argparse's formatting


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_renders(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"leukoscope {command}" in capsys.readouterr().out
