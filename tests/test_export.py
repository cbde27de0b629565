"""tools/export.py and qarep_det.ultralytics.export: fused check on real images, ONNX/OpenVINO export, failure paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ultralytics import YOLO

import qarep_det.ultralytics.export as export_module
from qarep_det import reparameterize_model
from qarep_det.data.images import load_letterboxed
from qarep_det.quant.runner import first_output
from qarep_det.ultralytics.checkpoint import load_detector
from qarep_det.ultralytics.export import FusionMismatchError, check_images, export

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "qarep_n.pt"
    YOLO(str(ROOT / "model_yamls/yolo_qarep_n.yaml")).save(path)
    return path


ROUND_TRIP_TOLERANCE = 1e-4  # max |exported - fused torch| over max |fused torch|, per output (float32 rounding)


def run_exported(path: Path, fmt: str, images: torch.Tensor) -> torch.Tensor:
    """The exported file on its own runtime, one image at a time (the export has a static batch of 1)."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = lambda x: session.run(None, {session.get_inputs()[0].name: x})[0]  # noqa: E731
    else:
        import openvino as ov

        compiled = ov.Core().compile_model(str(next(path.glob("*.xml"))), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        run = lambda x: compiled(x)[compiled.output(0)]  # noqa: E731
    return torch.cat([torch.from_numpy(run(image[None].numpy())) for image in images])


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_export_writes_checked_fused_model_and_never_overwrites(weights: Path, fmt: str) -> None:
    pytest.importorskip(fmt)
    path, diff = export(weights, fmt, imgsz=64)
    assert path.exists() and diff.max_rel < 1e-4
    # the round trip: the exported file computes what the fused torch model computes, on real letterboxed images
    images = torch.from_numpy(np.stack([load_letterboxed(f, 64)[0] for f in check_images(None)]))
    with torch.no_grad():
        expected = first_output(reparameterize_model(load_detector(weights))(images))
    exported = run_exported(path, fmt, images)
    assert exported.shape == expected.shape
    assert float((exported - expected).abs().max() / expected.abs().max()) < ROUND_TRIP_TOLERANCE
    stamp = path.stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(weights, fmt, imgsz=64)
    assert path.stat().st_mtime_ns == stamp
    path2, _ = export(weights, fmt, imgsz=64, overwrite=True)
    assert path2 == path


def test_export_refuses_a_fused_model_that_differs(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = export_module.reparameterize_model

    def broken(model: torch.nn.Module) -> torch.nn.Module:
        fused = real(model)
        with torch.no_grad():
            next(m for m in fused.modules() if isinstance(m, torch.nn.Conv2d)).bias.add_(1.0)
        return fused

    monkeypatch.setattr(export_module, "reparameterize_model", broken)
    with pytest.raises(FusionMismatchError, match="differs"):
        export(weights, "onnx", imgsz=64, overwrite=True)


def test_bad_weights_get_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_detector(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights"):
        load_detector(corrupt)
    classifier = tmp_path / "cls.pt"
    YOLO("yolov8n-cls.yaml").save(classifier)
    with pytest.raises(ValueError, match="not an Ultralytics Detect detector"):
        load_detector(classifier)


def test_cli_reports_errors_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools/export.py"), "--weights", str(tmp_path / "none.pt")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: weights") and "Traceback" not in result.stderr


def test_a_missing_split_never_runs_the_data_yaml_download(weights: Path, tmp_path: Path) -> None:
    marker = tmp_path / "downloaded"
    data = tmp_path / "data.yaml"
    data.write_text(
        f"path: {tmp_path / 'absent'}\ntrain: images/train\nval: images/val\nnames: {{0: a}}\n"
        f"download: \"open({str(marker)!r}, 'w').close()\"\n"
    )
    with pytest.raises(FileNotFoundError, match="images not found") as err:
        export(weights, "onnx", 64, str(data), overwrite=True)  # an earlier test may have exported already
    assert "\n" not in str(err.value) and not marker.exists()  # one line; the download script did not run
