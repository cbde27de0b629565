"""Every tool answers a bad flag with exactly one ``error: ...`` line and exit status 2, not argparse's usage block."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qarep_det.cli.main import TOOLS

SCRIPTS = Path(__file__).resolve().parents[1] / "tools"


def test_every_subcommand_has_its_script_and_no_script_is_left_over() -> None:
    assert {script.stem for script in SCRIPTS.glob("*.py")} == set(TOOLS.values())


@pytest.mark.parametrize("module", sorted(TOOLS.values()))
def test_bad_flag_is_one_error_line(module: str) -> None:
    args = ["fusion", "--runs", "many"] if module == "benchmark" else ["--no-such-flag"]  # also a subcommand's flag
    result = subprocess.run([sys.executable, str(SCRIPTS / f"{module}.py"), *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
