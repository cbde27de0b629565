"""The package as a user without this repository meets it: models by name, one console command, Ultralytics' own
CLI, the wheel installed elsewhere; and the layering the import-linter contracts in pyproject.toml state."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fresh_env
from ultralytics import YOLO

import qarep_det
from qarep_det.cli import main as cli_main
from qarep_det.data.synthetic import make_dataset

REPO = Path(__file__).resolve().parents[1]


def test_shipped_yamls_load_by_name_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = qarep_det.model_yamls()
    assert {f"yolo_{f}_{s}.yaml" for f in ("qarep", "qarepv2", "repvgg") for s in "nsm"} <= set(names)
    assert (REPO / "model_yamls").resolve() == qarep_det.model_yaml(names[0]).parent  # one copy, linked
    monkeypatch.chdir(tmp_path)
    model = YOLO("yolo_qarep_s.yaml").model
    assert type(model.model[0]).__name__ == "QARepBlock"
    assert type(YOLO("model_yamls/yolo_repvgg_n.yaml").model.model[0]).__name__ == "RepVGGBlock"  # docs' paths
    # a file that exists wins over the name: here a one-layer-different local yolo_qarep_s.yaml
    local = (REPO / "model_yamls/yolo_qarep_s.yaml").read_text().replace("QARepBlock, [64, 2]", "RepVGGBlock, [64, 2]")
    (tmp_path / "yolo_qarep_s.yaml").write_text(local)
    assert type(YOLO("yolo_qarep_s.yaml").model.model[0]).__name__ == "RepVGGBlock"
    with pytest.raises(FileNotFoundError):
        YOLO("yolo_qarep_x.yaml")
    with pytest.raises(FileNotFoundError, match="choose from yolo_"):
        qarep_det.model_yaml("nope")


def test_layering_contracts_hold_and_catch_an_upward_import(tmp_path: Path) -> None:
    lint = shutil.which("lint-imports")
    if lint is None:
        pytest.skip("import-linter not installed (pip install -e .[dev])")
    env = fresh_env(PYTHONPATH=str(REPO))
    result = subprocess.run([lint], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "3 kept, 0 broken" in result.stdout
    # the same contracts on a copy where quant/ reaches up into eval/: they must break
    shutil.copytree(REPO / "qarep_det", tmp_path / "qarep_det", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    recipe = tmp_path / "qarep_det/quant/recipe.py"
    recipe.write_text(recipe.read_text() + "\nfrom qarep_det.evaluation.table import format_console  # noqa\n")
    broken = subprocess.run(
        [lint], cwd=tmp_path, env=fresh_env(PYTHONPATH=str(tmp_path)), capture_output=True, text=True
    )
    assert broken.returncode != 0 and "qarep_det.quant.recipe -> qarep_det.evaluation.table" in broken.stdout


def test_console_command_lists_every_tool_and_runs_each_parser(capsys: pytest.CaptureFixture) -> None:
    assert cli_main.main(["--help"]) == 0
    usage = capsys.readouterr().out
    for name in (*cli_main.TOOLS, "yolo"):
        assert f"\n  {name} " in usage
    assert cli_main.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    for name in cli_main.TOOLS:
        with pytest.raises(SystemExit) as exit_:
            cli_main.main([name, "--help"])
        assert exit_.value.code == 0
        assert f"usage: qarep-det {name}" in capsys.readouterr().out


@pytest.mark.parametrize(("name", "module"), cli_main.TOOLS.items())
def test_tools_scripts_and_subcommands_share_one_parser(
    name: str, module: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tools/<module>.py --help and qarep-det <name> --help print the same flags (only the program name differs)."""
    script = REPO / "tools" / f"{module}.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code == 0
    script_help = capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli_main.main([name, "--help"])
    assert exit_.value.code == 0
    assert script_help.split("options:", 1)[1] == capsys.readouterr().out.split("options:", 1)[1]


def test_python_m_is_the_console_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qarep_det_launcher", "--help"], capture_output=True, text=True, env=fresh_env()
    )
    assert result.returncode == 0 and result.stdout == cli_main.usage() + "\n"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=8, n_val=4, imgsz=64, seed=5)


def test_yolo_subcommand_trains_a_shipped_yaml_by_name(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    """Ultralytics' own CLI, with our modules registered and our YAML found by name (plain 'yolo' fails on both)."""
    monkeypatch.chdir(tmp_path)
    args = ["train", "model=yolo_qarep_n.yaml", f"data={tiny_data}", "epochs=1", "imgsz=64", "batch=4", "workers=0",
            "device=cpu", f"project={tmp_path}", "name=run", "plots=False", "val=False"]  # fmt: skip
    assert cli_main.main(["yolo", *args]) == 0
    assert (tmp_path / "run" / "weights" / "last.pt").is_file()


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout and installed (without dependencies: they are this environment's) into
    a folder of its own, as a user outside the checkout gets it."""
    dist, target = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(REPO)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = dist.glob("qarep_det-*.whl")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    return target


def run_from_wheel(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """A command in a fresh process that imports qarep_det from ``site`` (the installed wheel), in ``cwd``."""
    env = fresh_env(PYTHONPATH=str(site), PATH=f"{site / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_wheel_works_outside_the_checkout(installed_wheel: Path, tiny_data: Path, tmp_path: Path) -> None:
    load = "import qarep_det; from ultralytics import YOLO; YOLO('yolo_qarep_s.yaml'); print(qarep_det.__file__)"
    result = run_from_wheel(installed_wheel, tmp_path, sys.executable, "-c", load)
    assert result.returncode == 0, result.stderr[-2000:]
    assert Path(result.stdout.strip()).is_relative_to(installed_wheel)  # the wheel's copy, not the checkout's
    assert len(list((installed_wheel / "qarep_det" / "model_yamls").glob("*.yaml"))) == len(qarep_det.model_yamls())

    result = run_from_wheel(installed_wheel, tmp_path, "qarep-det", "--help")
    assert result.returncode == 0 and "ptq-eval" in result.stdout, result.stderr[-2000:]
    bench = ["qarep-det", "benchmark", "fusion", "--cfg", "yolo_qarep_n.yaml", "--imgsz", "64", "--runs", "1"]
    result = run_from_wheel(installed_wheel, tmp_path, *bench)  # a shipped name, from a folder without model_yamls/
    assert result.returncode == 0, result.stderr[-2000:]
    printed = {line.split()[0]: float(line.split()[1].rstrip("x")) for line in result.stdout.splitlines()[1:4]}
    assert printed.keys() == {"unfused", "fused", "speedup"} and printed["fused"] > 0, result.stdout
    assert printed["speedup"] == pytest.approx(printed["unfused"] / printed["fused"], rel=0.05), result.stdout

    train = ["--cfg", "yolo_qarep_n.yaml", "--data", str(tiny_data), "--epochs", "1", "--imgsz", "64", "--batch",
             "4", "--workers", "0", "--device", "cpu", "--project", "runs", "--hyp"]  # fmt: skip
    hyp = tmp_path / "hyp.yaml"
    hyp.write_text("plots: false\nval: false\n")
    result = run_from_wheel(installed_wheel, tmp_path, "qarep-det", "train", *train, str(hyp))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "runs" / "exp" / "weights" / "last.pt").is_file()

    yolo = ["train", "model=yolo_repvgg_n.yaml", f"data={tiny_data}", "epochs=1", "imgsz=64", "batch=4", "workers=0",
            "device=cpu", f"project={tmp_path / 'yolo_runs'}", "name=run", "plots=False", "val=False"]  # fmt: skip
    result = run_from_wheel(installed_wheel, tmp_path, "qarep-det", "yolo", *yolo)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "yolo_runs" / "run" / "weights" / "last.pt").is_file()


def test_the_demo_runs_from_the_wheel(installed_wheel: Path, tmp_path: Path) -> None:
    """The demo's code path from the installed wheel (its model YAMLs are package data), at toy size: the full
    'qarep-det ptq-eval' takes minutes (docs/results.md, The demo)."""
    demo = (
        "from pathlib import Path; from qarep_det.cli.demo import DemoSettings, run_demo; "
        "data, weights = run_demo(Path('demo'), DemoSettings(train_images=8, val_images=4, imgsz=64, epochs=1, "
        "batch=4)); print(*weights)"
    )
    result = run_from_wheel(installed_wheel, tmp_path, sys.executable, "-c", demo)
    assert result.returncode == 0, result.stderr[-2000:]
    weights = result.stdout.strip().splitlines()[-1].split()
    assert len(weights) == 2 and all(Path(tmp_path, w).is_file() for w in weights)
    ptq = ["qarep-det", "ptq-eval", "--weights", *weights, "--data", "demo/data/data.yaml", "--imgsz", "64",
           "--calib-images", "4", "--out", "ptq"]  # fmt: skip
    result = run_from_wheel(installed_wheel, tmp_path, *ptq)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "ptq" / "results.json").read_text())
    assert {row["model"] for row in rows} == {Path(w).parent.parent.name for w in weights}
    assert all(row["calib_images"] == 4 and 0 <= row["int8_map50_95"] <= 100 for row in rows), rows


def test_importing_us_first_leaves_torch_every_thread_it_would_have() -> None:
    """Ultralytics sets OMP_NUM_THREADS=1 at import when it is unset; our tools import qarep_det first, and must
    still evaluate with the threads torch takes by itself (a one-core run of ptq_eval otherwise)."""
    env = {k: v for k, v in fresh_env().items() if k != "OMP_NUM_THREADS"}

    def threads(code: str) -> int:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout.split()[-1])

    assert threads("import qarep_det, torch; print(torch.get_num_threads())") == threads(
        "import torch; print(torch.get_num_threads())"
    )
