"""The README's benchmark figures name the exact command that reproduces them."""

import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"`(?:git checkout \w+ && )?python (benchmarks/[\w.]+\.py)([^`]*)`")


def benchmark_rows() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Benchmarks", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| benchmark")]
    return [row for row in rows if not set(row) <= set("|- ")]


@lru_cache(maxsize=None)
def script_help(script: str) -> str:
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_table_is_found():
    assert len(benchmark_rows()) >= 5


@pytest.mark.slow  # imports each benchmark script once (torch, diffusers)
@pytest.mark.parametrize("row", benchmark_rows(), ids=lambda row: row.split("|")[1].strip()[:40])
def test_every_benchmark_row_names_its_command(row):
    first_cell = row.split("|")[1]
    commands = COMMAND.findall(first_cell)
    assert commands, f"no `python benchmarks/....py ...` command in the row's first cell: {first_cell!r}"
    for script, arguments in commands:
        assert (ROOT / script).is_file(), f"{script} does not exist"
        if "git checkout" in first_cell:
            continue  # a historical figure: its flags are those of the named commit
        for flag in re.findall(r"(--[a-z][a-z0-9-]*)", arguments):
            assert flag in script_help(script), f"{script} has no {flag} option"
