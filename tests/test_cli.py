"""Every tool answers a bad flag with exactly one ``error: ...`` line and exit status 2, not argparse's usage block."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qarep_det.cli.main import TOOLS
from qarep_det.cli.main import main as cli_main
from qarep_det.data.synthetic import make_dataset

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
TRAIN = ["--cfg", "yolo_qarep_n.yaml", "--data", "{data}", "--device", "cpu"]
# tool[, what is wrong] -> (arguments, the error line's text); "{data}" is a valid data set, "{tmp}" the test's folder
BAD_INPUT = {
    "train": (["--cfg", "yolo_qarep_n.yaml", "--data", MISSING], f"data file '{MISSING}' not found"),
    "train, missing cfg": (["--cfg", "nope.yaml", "--data", "{data}"], "model cfg 'nope.yaml' not found"),
    "train, no cfg": (["--data", "{data}"], "--cfg and --data are required"),
    "train, CUDA index without CUDA": ([*TRAIN, "--device", "7"], "CUDA device 7 is not available"),
    "train, device name": ([*TRAIN, "--device", "gpu"], "--device 'gpu' is not a device"),
    "train, custom L2 without RepVGG": ([*TRAIN, "--rep-l2", "custom"], "has none"),
    "train, imgsz not a stride multiple": ([*TRAIN, "--imgsz", "100"], "multiple of the models' stride 32"),
    "train, resume with new settings": (["--resume", "x/last.pt", "--epochs", "5"], "drop --epochs"),
    "train, resume a missing checkpoint": (["--resume", "x/last.pt"], "checkpoint 'x/last.pt' not found"),
    "train, not an integer": ([*TRAIN, "--epochs", "many"], "invalid int value"),
    "ptq-eval": (["--weights", f"{MISSING}.pt", "--data", MISSING], f"weights '{MISSING}.pt' not found"),
    "ptq-eval, half of a pair": (["--weights", f"{MISSING}.pt"], "give both --weights and --data, or neither"),
    "export": (["--weights", f"{MISSING}.pt"], f"weights '{MISSING}.pt' not found"),
    "diagnose": (["--weights", f"{MISSING}.pt", "--data", MISSING], f"weights '{MISSING}.pt' not found"),
    "qat": (["--weights", f"{MISSING}.pt", "--data", MISSING], f"'{MISSING}.pt' not found"),
    "benchmark": (["fusion", "--cfg", "yolo_qarep_n.yaml", "--imgsz", "33"], "multiple of the models' stride 32"),
    "make-dataset": (["--train", "0", "--out", "{tmp}/data"], "n_train must be >= 1, got 0"),
    "make-dataset, imgsz too small": (["--out", "{tmp}/data", "--imgsz", "16"], "imgsz must be >= 32, got 16"),
    "make-dataset, imgsz not a number": (["--out", "{tmp}/data", "--imgsz", "abc"], "invalid int value: 'abc'"),
    "make-dataset, too many classes": (["--out", "{tmp}/data", "--classes", "9"], "n_classes must be in 1..6, got 9"),
    "make-dataset, unknown flag": (["--out", "{tmp}/data", "--bogus"], "unrecognized arguments: --bogus"),
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
    "ladder, unknown step": (["--data", "{data}", "--steps", "S1", "S7"], "argument --steps: invalid choice: 'S7'"),
    "ladder, unknown groups": (["--data", "{data}", "--groups", "2"], "argument --groups: invalid choice: 2"),
    "ladder, missing data": (["--data", MISSING], f"data file '{MISSING}' not found"),
    "ladder, a seed twice": (["--data", "{data}", "--seeds", "0", "0"], "--seeds: a seed is listed twice"),
    "ladder, a step twice": (["--data", "{data}", "--steps", "S1", "S1"], "--steps: a step is listed twice"),
    "ladder, more activation than calibration images": (
        ["--data", "{data}", "--calib-images", "4", "--activation-images", "8"],
        "--activation-images: at most",
    ),
    "ladder, no epoch": (["--data", "{data}", "--epochs", "0"], "--epochs must be an integer >= 1"),
    "ladder, unknown backend": (["--data", "{data}", "--backend", "tensorrt"], "invalid choice: 'tensorrt'"),
    "ladder, CUDA index without CUDA": (["--data", "{data}", "--device", "7"], "CUDA"),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid data set for the cases whose fault is another flag."""
    return make_dataset(tmp_path_factory.mktemp("bad_input") / "data", n_train=2, n_val=2, imgsz=64, seed=0)


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_error_line_and_exit_status_2(case: str, data: Path, tmp_path: Path, capsys, monkeypatch):
    """Bad input to every tool, through the one place that reports it (``qarep_det.cli.main``): exit status 2, one
    ``error: ...`` line naming the fault, no traceback, nothing written (the tools write into the current folder by
    default: the test's own)."""
    monkeypatch.chdir(tmp_path)
    args, message = BAD_INPUT[case]
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{data}", str(data)) for a in args]
    if case.startswith("ladder"):
        argv += ["--out", "study"]
    try:
        status = cli_main([case.split(",")[0], *argv])
    except SystemExit as exit_:  # argparse's own errors (still one line: qarep_det.cli.common.OneLineErrorParser)
        status = exit_.code
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
