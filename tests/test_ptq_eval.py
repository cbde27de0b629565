"""tools/ptq_eval.py and qarep_det.pipelines.ptq on a tiny detector and generated data: every backend, every key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from ultralytics import YOLO

from qarep_det.data.synthetic import make_dataset
from qarep_det.pipelines.ptq import PTQSettings, run_ptq_eval
from qarep_det.quant.backends.base import BACKENDS
from qarep_det.quant.calibration import calibration_set
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.reparam import reparameterize_model
from qarep_det.sensitivity.diagnostics import sqnr_db
from qarep_det.ultralytics.checkpoint import load_detector

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
    modules = {
        "torch": ("modelopt", "onnx"),
        "openvino": ("openvino", "nncf"),
        "onnxruntime": ("modelopt", "onnx", "onnxruntime"),
        "onnxruntime-int8": ("onnx", "onnxruntime"),
    }[backend]
    try:
        for module in modules:
            __import__(module)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_collapses_on_the_planted_outlier_and_nowhere_else(known_answer, tmp_path: Path, backend: str) -> None:
    """On data labelled by the model itself FP32 scores high; the planted twin computes the same FP32 but its INT8
    must collapse, while the clean model's INT8 stays close: a swapped or broken FP32/INT8 path fails here."""
    if not installed(backend):
        pytest.skip(f"{backend} backend packages not installed")
    recipe = QuantRecipe(calib_images=40)  # more than the 24 train images: all are used, with a warning
    settings = PTQSettings(known_answer.data, recipe=recipe, backends=(backend,), imgsz=known_answer.imgsz, batch=4)
    models = [known_answer.clean, known_answer.planted] if backend == "torch" else [known_answer.planted]
    with pytest.warns(UserWarning, match="only 24 are available"):
        rows, json_path, md_path = run_ptq_eval(models, settings, tmp_path, progress=False)
    assert [(r.model, r.backend) for r in rows] == [(m.stem, backend) for m in models]
    stored = {row["model"]: row for row in json.loads(json_path.read_text())}
    for row in stored.values():
        assert REQUIRED_KEYS <= row.keys() and row["calib_images"] == 24 and Path(row["int8_file"]).exists()
    planted = stored["planted"]
    assert planted["fp32_map50_95"] > 40  # measured 63: the labels are the model's own top detections
    assert planted["int8_map50_95"] < 0.2 * planted["fp32_map50_95"]  # measured 1 (torch)
    if backend == "torch":
        clean = stored["clean"]
        assert clean["fp32_map50_95"] == planted["fp32_map50_95"]  # the planting is FP32-exact
        assert clean["int8_map50_95"] > 0.8 * clean["fp32_map50_95"]  # the clean twin stays close
    assert "INT8 mAP50-95" in md_path.read_text()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools/ptq_eval.py"), *args], capture_output=True, text=True, timeout=600
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
        (["--weights", str(weights[0]), "--data", str(data), "--overflow-fix", "on"], "NNCF's, for the openvino"),
        (["--weights", str(weights[0]), "--data", str(data), "--overflow-fix", "maybe"], "invalid choice: 'maybe'"),
        (["--weights", str(weights[0]), "--data", str(data), "--openvino-activations", "asymmetric"], "NNCF's grid"),
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
    settings = PTQSettings(
        bad, recipe=QuantRecipe(calib_images=1), backends=("torch",), imgsz=64, batch=4, save_int8=False
    )
    with pytest.raises(ValueError, match="could be read"), pytest.warns(UserWarning, match="skipping"):
        run_ptq_eval(weights[:1], settings, tmp_path / "out", progress=False)


def test_settings_reject_bad_values(data: Path) -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        PTQSettings(data, backends=("tensorrt",))
    with pytest.raises(ValueError, match="multiple of the models. stride 32"):
        PTQSettings(data, imgsz=100)
    with pytest.raises(ValueError, match="is not a device"):
        PTQSettings(data, device="gpu")
    with pytest.raises(ValueError, match="'entropy' is not available with the onnxruntime-int8 backend"):
        PTQSettings(data, recipe=QuantRecipe(calib_method="entropy"), backends=("onnxruntime-int8",))


def test_settings_take_a_gpu_for_torch_beside_cpu_backends(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            PTQSettings(data, device="cuda:0")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    settings = PTQSettings(data, backends=BACKENDS, device="cuda:0")  # OpenVINO and onnxruntime run on the CPU
    assert settings.device == "cuda:0"


def test_onnxruntime_int8_row_runs_integer_convs_and_scores_near_the_simulation(known_answer, tmp_path: Path) -> None:
    """The onnxruntime-int8 row end to end on the self-labelled detector (ReLU blocks, so every ReLU folds into its
    conv's output quantizer): each quantized conv an integer conv in onnxruntime's optimized graph, its FP32 file
    scoring the torch FP32 mAP, a file about 4x smaller, and an INT8 mAP that neither collapses (the planted twin
    drops to about 1) nor strays far from the simulated INT8's (measured on 8 val images: 64.0 against 61.2, FP32
    63.3; its own scheme, so not equal)."""
    if not installed("onnxruntime-int8") or not installed("torch"):
        pytest.skip("onnxruntime or modelopt not installed")
    from qarep_det.quant.scope import quantized_conv_names
    from qarep_det.ultralytics.checkpoint import load_fused

    recipe = QuantRecipe(calib_images=8)
    settings = PTQSettings(
        known_answer.data, recipe=recipe, backends=("torch", "onnxruntime-int8"), imgsz=known_answer.imgsz, batch=4
    )
    torch_row, ort_row = run_ptq_eval([known_answer.clean], settings, tmp_path, progress=False)[0]
    assert ort_row.backend == "onnxruntime-int8"
    assert ort_row.integer_convs == len(quantized_conv_names(load_fused(known_answer.clean).fused, recipe))
    assert Path(ort_row.int8_file).is_file() and ort_row.int8_mb < 0.4 * ort_row.fp32_mb
    assert abs(ort_row.fp32_backend_map50_95 - torch_row.fp32_map50_95) <= 0.3
    assert ort_row.int8_map50_95 > 0.9 * torch_row.fp32_map50_95
    assert abs(ort_row.int8_map50_95 - torch_row.int8_map50_95) <= 5


def test_onnxruntime_scores_the_torch_backends_qdq_onnx_after_one_calibration(
    data: Path, weights: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not installed("onnxruntime"):
        pytest.skip("onnxruntime backend packages not installed")
    from helpers import check_qdq_onnx

    from qarep_det.quant.backends import simulated
    from qarep_det.quant.backends.onnx_qdq import onnx_runner
    from qarep_det.quant.runner import torch_runner

    quantized = []  # every simulated model made: the torch and onnxruntime backends must share one
    quantize = simulated.quantize_torch

    def counted(*args):
        quantized.append(quantize(*args))
        return quantized[-1]

    monkeypatch.setattr(simulated, "quantize_torch", counted)
    settings = PTQSettings(
        data, recipe=QuantRecipe(calib_images=8), backends=("torch", "onnxruntime"), imgsz=64, batch=4
    )
    torch_row, ort_row = run_ptq_eval(weights[:1], settings, tmp_path, progress=False)[0]
    assert len(quantized) == 1 and (torch_row.backend, ort_row.backend) == ("torch", "onnxruntime")
    assert Path(ort_row.int8_file).is_file()
    assert ort_row.int8_file == torch_row.int8_file  # the very file TensorRT would get
    assert abs(ort_row.int8_map50_95 - torch_row.int8_map50_95) <= 0.3
    assert abs(ort_row.fp32_backend_map50_95 - torch_row.fp32_map50_95) <= 0.3
    # random-init models score ~0 mAP, so compare what the runners compute on a few letterboxed images too: the
    # QDQ file must be closer to the simulation than the simulation is to FP32 (measured: 85 vs 76 dB), else it
    # could be running the float model; the FP32 file must match torch to float rounding (measured: 140 dB)
    images = next(iter(calibration_set(data, 64, n=4, seed=1, batch_size=4, progress=False)))
    fused = reparameterize_model(load_detector(weights[0]))
    quantization_noise_db = sqnr_db(torch_runner(fused)(images), torch_runner(quantized[0])(images))
    assert check_qdq_onnx(ort_row.int8_file, quantized[0], images).output_sqnr_db > quantization_noise_db + 3
    fp32_onnx = tmp_path / f"{ort_row.model}_fp32.onnx"
    assert sqnr_db(torch_runner(fused)(images), onnx_runner(fp32_onnx)(images)) > 100


def test_keep_float_keeps_the_most_sensitive_convs_float_in_the_int8_file(
    data: Path, weights: list[Path], tmp_path: Path
) -> None:
    if not installed("torch"):
        pytest.skip("torch backend packages not installed")
    from helpers import qdq_convs

    from qarep_det.evaluation.table import format_console
    from qarep_det.sensitivity.float_cost import conv_macs
    from qarep_det.sensitivity.rankings import rank_sensitivity

    recipe = QuantRecipe(calib_images=4)
    settings = PTQSettings(data, recipe=recipe, backends=("torch",), imgsz=64, batch=4, keep_float=2)
    (row,), json_path, _ = run_ptq_eval(weights[:1], settings, tmp_path, progress=False)
    calib = calibration_set(data, 64, n=4, seed=0, batch_size=4, progress=False)  # the draw ptq_eval made
    fused = reparameterize_model(load_detector(weights[0]))
    sensitivity = rank_sensitivity(fused, calib, recipe, progress=False, rank_by=settings.rank_by)
    ranking = sensitivity.by_cost(conv_macs(fused, 64, sensitivity.ranking)).ranking  # --float-cost latency
    assert row.rank.rank_by == settings.rank_by and row.rank.float_cost == settings.float_cost == "latency"
    assert list(row.float_layers) == ranking[:2] == json.loads(json_path.read_text())[0]["float_layers"]
    convs = qdq_convs(row.int8_file)
    assert all(convs[name] == (None, None) for name in ranking[:2])  # no Q/DQ around a kept conv
    assert all(q is not None for q in convs[ranking[2]])
    assert "float convs" in format_console([row]).splitlines()[0]


def test_partial_quantization_bad_input_fails_with_one_line(data: Path, weights: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    base = ["--weights", str(weights[0]), "--data", str(data), "--imgsz", "64", "--calib-images", "4"]
    cases = [
        (["--keep-float", "-1"], "keep_float must be >= 0"),
        (["--keep-float", "60"], "the model has 59 quantized convs"),
        (["--keep-float-layers", "model.8.1.conv", "model.8.1"], "'model.8.1' (closest: model.8.1.conv"),
        (["--keep-float", "1", "--keep-float-layers", "model.8.1.conv"], "not allowed with"),
    ]
    for args, message in cases:
        result = run_cli(*base, *args, "--out", str(out))
        assert result.returncode != 0, args
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], (args, result.stderr[-500:])
        assert "Traceback" not in result.stderr
    assert not out.exists()


def test_named_float_convs_stay_float_and_repair_the_planted_model(known_answer, tmp_path: Path) -> None:
    """--keep-float-layers NAME: the name reaches the row and the INT8 file (a regression once dropped it)."""
    from helpers import qdq_convs

    recipe = QuantRecipe(calib_images=8, float_layers=(known_answer.consumer,))
    settings = PTQSettings(known_answer.data, recipe=recipe, backends=("torch",), imgsz=known_answer.imgsz, batch=4)
    rows, _, _ = run_ptq_eval([known_answer.planted], settings, tmp_path, progress=False)
    (row,) = rows
    assert row.float_layers == (known_answer.consumer,)
    convs = qdq_convs(row.int8_file)
    assert convs[known_answer.consumer] == (None, None) and all(q is not None for q in convs["model.2.0.conv"])
    assert row.int8_map50_95 > 0.7 * row.fp32_map50_95  # the planted collapse repaired
