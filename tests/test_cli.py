import subprocess
import sys

import pytest

from dreamblend_ray.cli import COMMANDS, main


def test_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith("dreamblend-ray ")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: dreamblend" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "dreamblend_ray.cli", "version"],
                         capture_output=True, text=True, check=True).stdout
    assert "dreamblend-ray" in out
