"""Every tool answers a bad flag with exactly one ``error: ...`` line and exit status 2, not argparse's usage block."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qarep_det.cli.main import TOOLS
from qarep_det.cli.main import main as cli_main

SCRIPTS = Path(__file__).resolve().parents[1] / "tools"


def test_every_subcommand_has_its_script_and_no_script_is_left_over() -> None:
    assert {script.stem for script in SCRIPTS.glob("*.py")} == set(TOOLS.values())


@pytest.mark.parametrize("module", sorted(TOOLS.values()))
def test_bad_flag_is_one_error_line(module: str) -> None:
    args = ["fusion", "--runs", "many"] if module == "benchmark" else ["--no-such-flag"]  # also a subcommand's flag
    result = subprocess.run([sys.executable, str(SCRIPTS / f"{module}.py"), *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr


MISSING = "no_such_file"
BAD_INPUT = {
    "train": (["--cfg", "yolo_qarep_n.yaml", "--data", MISSING], f"data file '{MISSING}' not found"),
    "ptq-eval": (["--weights", f"{MISSING}.pt", "--data", MISSING], f"weights '{MISSING}.pt' not found"),
    "ptq-eval, half of a pair": (["--weights", f"{MISSING}.pt"], "give both --weights and --data, or neither"),
    "export": (["--weights", f"{MISSING}.pt"], f"weights '{MISSING}.pt' not found"),
    "diagnose": (["--weights", f"{MISSING}.pt", "--data", MISSING], f"weights '{MISSING}.pt' not found"),
    "qat": (["--weights", f"{MISSING}.pt", "--data", MISSING], f"'{MISSING}.pt' not found"),
    "benchmark": (["fusion", "--cfg", "yolo_qarep_n.yaml", "--imgsz", "33"], "multiple of the models' stride 32"),
    "make-dataset": (["--train", "0", "--out", "{tmp}/data"], "n_train must be >= 1, got 0"),
    "plant-outlier": (
        [
            "--weights",
            f"{MISSING}.pt",
            "--data",
            MISSING,
            "--producer",
            "model.1",
            "--consumer",
            "model.2",
            "--out",
            "{tmp}/planted.pt",
        ],
        f"weights '{MISSING}.pt' not found",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_error_line_and_exit_status_2(case: str, tmp_path: Path, capsys, monkeypatch) -> None:
    """Bad input to every tool, through the one place that reports it (``qarep_det.cli.main``): exit status 2, one
    ``error: ...`` line naming the fault, no traceback, nothing written."""
    monkeypatch.chdir(tmp_path)
    args, message = BAD_INPUT[case]
    status = cli_main([case.split(",")[0], *(a.replace("{tmp}", str(tmp_path)) for a in args)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_a_fault_that_is_not_bad_input_keeps_its_traceback(monkeypatch) -> None:
    """Only bad input becomes one line: a RuntimeError inside a tool (a bug, or ModelOpt's) propagates."""
    from qarep_det.cli import make_dataset as tool

    def broken(*args, **kwargs):
        raise RuntimeError("a real fault")

    monkeypatch.setattr(tool, "make_dataset", broken)
    with pytest.raises(RuntimeError, match="a real fault"):
        cli_main(["make-dataset", "--out", "somewhere"])
