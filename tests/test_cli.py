"""Every tool answers a bad flag with exactly one ``error: ...`` line and exit status 2, not argparse's usage block."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = sorted((Path(__file__).resolve().parents[1] / "tools").glob("*.py"))


def test_every_tool_is_covered() -> None:
    assert {t.stem for t in TOOLS} == {
        "benchmark",
        "diagnose",
        "export",
        "make_dataset",
        "plant_outlier",
        "ptq_eval",
        "qat",
        "train",
    }


@pytest.mark.parametrize("tool", TOOLS, ids=lambda t: t.stem)
def test_bad_flag_is_one_error_line(tool: Path) -> None:
    args = ["fusion", "--runs", "many"] if tool.stem == "benchmark" else ["--no-such-flag"]  # also a subcommand's flag
    result = subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
