"""tools/ptq_eval.py and qarep_det.eval.ptq on a tiny detector and generated data: every backend, every key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ultralytics import YOLO

from qarep_det.data.synthetic import make_dataset
from qarep_det.eval.ptq import BACKENDS, PTQSettings, run_ptq_eval
from qarep_det.quant.recipe import QuantRecipe

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = {
    "model", "weights", "backend", "calib_method", "calib_images", "fp32_map50_95", "int8_map50_95", "fp32_map50",
    "int8_map50", "drop", "params", "fp32_ms", "int8_ms",
}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=12, n_val=6, imgsz=64, seed=3)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("weights")
    paths = []
    for family in ("qarep", "repvgg"):
        model = YOLO(str(ROOT / f"model_yamls/yolo_{family}_n.yaml"))
        path = root / family / "weights" / "best.pt"
        path.parent.mkdir(parents=True)
        model.save(path)
        paths.append(path)
    return paths


def installed(backend: str) -> bool:
    modules = {"torch": ("modelopt", "onnx"), "openvino": ("openvino", "nncf")}[backend]
    try:
        for module in modules:
            __import__(module)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("backend", BACKENDS)
def test_ptq_eval_writes_one_row_per_model_and_backend(
    data: Path, weights: list[Path], tmp_path: Path, backend: str
) -> None:
    if not installed(backend):
        pytest.skip(f"{backend} backend packages not installed")
    recipe = QuantRecipe(calib_images=20)  # more than the 12 train images: all are used, with a warning
    settings = PTQSettings(data, recipe, (backend,), imgsz=64, batch=4)
    models = weights if backend == "torch" else weights[:1]  # two models once is enough; OpenVINO is the slow one
    with pytest.warns(UserWarning, match="only 12 are available"):
        rows, json_path, md_path = run_ptq_eval(models, settings, tmp_path, progress=False)
    assert [(r["model"], r["backend"]) for r in rows] == [("qarep", backend), ("repvgg", backend)][: len(models)]
    stored = json.loads(json_path.read_text())
    assert len(stored) == len(models)
    for row in stored:
        assert REQUIRED_KEYS <= row.keys()
        assert row["calib_images"] == 12
        assert 0.0 <= row["int8_map50_95"] <= 100.0 and 0.0 <= row["fp32_map50_95"] <= 100.0
        assert Path(row["int8_file"]).exists()
    assert "INT8 mAP50-95" in md_path.read_text()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools/ptq_eval.py"), *args], capture_output=True, text=True, timeout=300
    )


def test_cli_bad_inputs_fail_with_one_line(data: Path, weights: list[Path], tmp_path: Path) -> None:
    no_val = tmp_path / "no_val.yaml"
    no_val.write_text(yaml.safe_dump({**yaml.safe_load(data.read_text()), "val": None}))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"garbage")
    out = ["--out", str(tmp_path / "out"), "--imgsz", "64", "--calib-images", "4"]
    cases = [
        (["--weights", str(tmp_path / "missing.pt"), "--data", str(data)], "not found"),
        (["--weights", str(corrupt), "--data", str(data)], "cannot read weights"),
        (["--weights", str(weights[0]), "--data", str(no_val)], "val"),
        (["--weights", str(weights[0])], "give both --weights and --data"),
    ]
    for args, message in cases:
        result = run_cli(*args, *out)
        assert result.returncode != 0, args
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, (args, result.stderr[-500:])
        assert "Traceback" not in result.stderr


def test_no_readable_calibration_image_is_an_error(data: Path, weights: list[Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    (broken / "images").mkdir(parents=True)
    (broken / "images" / "bad.jpg").write_bytes(b"not an image")
    spec = yaml.safe_load(data.read_text())
    spec["train"] = str(broken / "images")
    bad = tmp_path / "bad_train.yaml"
    bad.write_text(yaml.safe_dump(spec))
    settings = PTQSettings(bad, QuantRecipe(calib_images=1), ("torch",), imgsz=64, batch=4, save_int8=False)
    with pytest.raises(ValueError, match="could be read"), pytest.warns(UserWarning, match="skipping"):
        run_ptq_eval(weights[:1], settings, tmp_path / "out", progress=False)


def test_settings_reject_bad_values(data: Path) -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        PTQSettings(data, backends=("tensorrt",))
    with pytest.raises(ValueError, match="multiple of 32"):
        PTQSettings(data, imgsz=100)
    with pytest.raises(ValueError, match="runs on the CPU"):
        PTQSettings(data, backends=("openvino",), device="cuda:0")
