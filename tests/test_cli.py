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


def _exit_codes_listed(help_text: str) -> set[int]:
    import re

    block = help_text.split("exit codes:", 1)[1]
    return {int(code) for code in re.findall(r"^\s+(\d+)\s", block, flags=re.MULTILINE)}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_lists_its_exit_codes(command, capsys):
    from dreamblend_ray.runtime import exit_codes

    with pytest.raises(SystemExit):
        main([command, "--help"])
    listed = _exit_codes_listed(capsys.readouterr().out)
    assert set(exit_codes.COMMON) <= listed
    if command == "submit":
        assert exit_codes.FAILED in listed


@pytest.mark.parametrize("script, partial", [("jobs/finetune_subjects.py", True),
                                             ("jobs/generate_batch.py", True),
                                             ("jobs/evaluate.py", False)])
def test_every_job_script_lists_its_exit_codes(script, partial):
    from pathlib import Path

    from dreamblend_ray.runtime import exit_codes

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / script), "--help"], capture_output=True, text=True,
                         check=True, cwd=root).stdout
    listed = _exit_codes_listed(out)
    assert set(exit_codes.COMMON) <= listed
    assert (exit_codes.PARTIAL in listed) == partial

