"""qarep-det export --int8: ptq_eval's INT8 model written as Ultralytics' exporter writes its format, loaded and
scored by Ultralytics' own val and predict; bad input in one line with nothing written."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from ultralytics import YOLO

from qarep_det.cli.main import main as qarep_det_main
from qarep_det.data.images import load_letterboxed
from qarep_det.errors import InputError
from qarep_det.evaluation.coco import GroundTruth, evaluate_coco, load_ground_truth
from qarep_det.evaluation.results import PTQRow
from qarep_det.pipelines.export_int8 import Int8Export, export_int8
from qarep_det.pipelines.ptq import PTQSettings, run_ptq_eval
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.ultralytics.int8_export import INT8_WRITERS, int8_writer

pytest.importorskip("openvino")
pytest.importorskip("nncf")
pytest.importorskip("onnxruntime")
pytest.importorskip("modelopt")

SAME_MODEL = 0.1  # mAP50-95 points: Ultralytics' val of the artefact against ptq_eval's figure (measured 0.00)
FLOAT_LAYERS = ("model.0.conv", "model.24.cv3.0.2")  # kept float by name: the stem and a class-score conv


@dataclass(frozen=True)
class Exported:
    settings: PTQSettings
    rows: dict[str, PTQRow]  # ptq_eval's row per backend
    artefacts: dict[str, Int8Export]  # the export per format
    ground_truth: GroundTruth


@pytest.fixture(scope="module")
def exported(known_answer, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """ptq_eval on the self-labelled detector (openvino and the QDQ ONNX on onnxruntime, two convs kept float), and
    both INT8 exports of the same checkpoint with the same settings, beside a copy of it. The convs are named rather
    than ranked (``keep_float``): the ranking would add half a minute, and both tools choose them in one function."""
    root = tmp_path_factory.mktemp("export_int8")
    weights = root / "clean.pt"
    weights.write_bytes(known_answer.clean.read_bytes())
    recipe = QuantRecipe(calib_images=8, float_layers=FLOAT_LAYERS)
    settings = PTQSettings(
        known_answer.data, recipe=recipe, backends=("openvino", "onnxruntime"), imgsz=known_answer.imgsz, batch=1
    )
    rows, _, _ = run_ptq_eval([weights], settings, root / "ptq", progress=False)
    artefacts = {fmt: export_int8(weights, fmt, settings, progress=False) for fmt in ("openvino", "onnx")}
    return Exported(settings, {r.backend: r for r in rows}, artefacts, load_ground_truth(known_answer.data))


def val_images(exported: Exported) -> torch.Tensor:
    return torch.from_numpy(np.stack([load_letterboxed(p, exported.settings.imgsz)[0]
                                      for p in exported.ground_truth.image_files]))  # fmt: skip


def test_openvino_export_is_ultralytics_layout_of_ptq_evals_model(exported: Exported) -> None:
    from qarep_det.quant.backends.openvino import compile_cpu, openvino_runner

    result, row = exported.artefacts["openvino"], exported.rows["openvino"]
    assert result.path.name == "clean_int8_openvino_model" and result.backend == "openvino"
    assert sorted(p.name for p in result.path.iterdir()) == ["clean.bin", "clean.xml", "metadata.yaml"]
    assert not [p for p in result.path.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    metadata = yaml.safe_load((result.path / "metadata.yaml").read_text())
    assert metadata["task"] == "detect" and metadata["imgsz"] == [96, 96] and metadata["batch"] == 1
    assert metadata["names"] == {i: str(i) for i in range(6)} and metadata["stride"] == 32
    assert metadata["args"]["quantize"] == 8 and metadata["args"]["dynamic"] is False
    # ptq_eval's model exactly: the same weights and quantizer ranges (only the batch is fixed to 1)
    assert result.float_layers == row.float_layers == FLOAT_LAYERS
    assert (result.path / "clean.bin").read_bytes() == Path(row.int8_file).with_suffix(".bin").read_bytes()
    compiled = compile_cpu(result.path / "clean.xml")
    assert list(compiled.input(0).shape) == [1, 3, 96, 96] and list(compiled.output(0).shape) == [1, 10, 189]
    ours, ptq_evals = openvino_runner(compiled), openvino_runner(row.int8_file)
    for image in val_images(exported):
        expected = ptq_evals(image[None])
        assert torch.allclose(ours(image[None]), expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_qdq_onnx_export_carries_ultralytics_metadata_and_static_shapes(exported: Exported) -> None:
    import onnx

    result, row = exported.artefacts["onnx"], exported.rows["onnxruntime"]
    assert result.path.name == "clean_int8_qdq.onnx" and result.backend == "onnxruntime"
    model = onnx.load(str(result.path))
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata["task"] == "detect" and metadata["imgsz"] == "[96, 96]" and "'quantize': 8" in metadata["args"]
    declared = [[d.dim_value for d in v.type.tensor_type.shape.dim] for v in (model.graph.input[0],
                                                                              model.graph.output[0])]  # fmt: skip
    assert declared == [[1, 3, 96, 96], [1, 10, 189]]
    # ptq_eval's file but for the declared shapes and the metadata: the same nodes, weights and scales
    ptq_evals = onnx.load(row.int8_file)
    assert model.graph.node == ptq_evals.graph.node and model.graph.initializer == ptq_evals.graph.initializer
    assert sum(node.op_type == "QuantizeLinear" for node in model.graph.node) > 0
    assert result.float_layers == row.float_layers == FLOAT_LAYERS


def _activation_ranges(xml: Path) -> list[tuple[float, float]]:
    """(low, high) of each activation FakeQuantize of an IR, by high (low 0 on NNCF's unsigned grid)."""
    import openvino

    return sorted(((float(np.min(op.input_value(1).get_node().get_data())),
                    float(np.max(op.input_value(2).get_node().get_data())))
                   for op in openvino.Core().read_model(str(xml)).get_ordered_ops()
                   if op.get_type_name() == "FakeQuantize" and op.get_attributes()["levels"] == 256
                   and op.input_value(0).get_node().get_type_name() != "Constant"), key=lambda r: r[1])  # fmt: skip


def test_asymmetric_openvino_activations_are_nncfs_mixed_grid(exported: Exported, tmp_path: Path) -> None:
    """--openvino-activations asymmetric: NNCF's preset MIXED, [0, max] after each ReLU (a step of max/255) and
    [min, max] elsewhere, where the default is TensorRT's signed grid (max/127) on every activation; either way no
    quantizer is left below a Concat. The calibration is the same: the ranges after the ReLUs end where the signed
    ones do."""
    from qarep_det.quant.backends.hoist import quantizers_below_commuting_ops
    from qarep_det.quant.backends.openvino import read_openvino

    weights = tmp_path / "clean.pt"
    weights.write_bytes(exported.artefacts["openvino"].path.with_name("clean.pt").read_bytes())
    settings = replace(exported.settings, asymmetric_activations=True)
    asymmetric = export_int8(weights, "openvino", settings, progress=False)
    signed = _activation_ranges(exported.artefacts["openvino"].path / "clean.xml")
    ranges = _activation_ranges(asymmetric.path / "clean.xml")
    assert all(low == pytest.approx(-high * 128 / 127) for low, high in signed)
    after_relu = [high for low, high in ranges if low == 0]
    assert len(after_relu) > len(ranges) / 2  # the yolo_qarep_n's ReLU outputs: most of them
    highs = np.array([high for _, high in signed])
    assert all(np.isclose(highs, high, rtol=1e-6, atol=0).any() for high in after_relu)
    assert all(low <= 0 < high and low != pytest.approx(-high * 128 / 127) for low, high in ranges)
    assert quantizers_below_commuting_ops(read_openvino(asymmetric.path / "clean.xml")) == 0


@pytest.fixture
def f32_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenVINO in float32, as ptq_eval runs it: Ultralytics compiles with the CPU's default precision, which is
    bf16 on CPUs with AVX512_BF16 or AMX (the decode, DFL and float convs then round to 8 mantissa bits)."""
    import openvino

    class F32Core(openvino.Core):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.set_property("CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    monkeypatch.setattr(openvino, "Core", F32Core)


@pytest.mark.usefixtures("f32_openvino")
@pytest.mark.parametrize("fmt", ["openvino", "onnx"])
def test_ultralytics_val_scores_what_ptq_eval_scores(exported: Exported, tmp_path: Path, fmt: str) -> None:
    """Ultralytics' val of the artefact (batch 1 and its square letterbox, which at this size resizes nothing;
    ptq_eval's NMS settings) writes its detections; scored by ptq_eval's pycocotools they must give ptq_eval's
    figure (measured: equal). Ultralytics' own mAP is another metric (its matching and 101-point interpolation): on 8
    images it differed from pycocotools by 0.3 to 1.5 points between runs, so it is only checked to see a detector."""
    result = exported.artefacts[fmt]
    row = exported.rows[result.backend]
    metrics = YOLO(str(result.path), task="detect").val(
        data=str(exported.settings.data), imgsz=exported.settings.imgsz, batch=1, conf=0.001, iou=0.7, max_det=300,
        save_json=True, plots=False, device="cpu", project=str(tmp_path), name="val", verbose=False,
    )  # fmt: skip
    detections = json.loads((Path(metrics.save_dir) / "predictions.json").read_text())
    ids = {path.name: exported.ground_truth.image_id(path) for path in exported.ground_truth.image_files}
    for detection in detections:  # Ultralytics names images by file stem, ptq_eval by position
        detection["image_id"] = ids[detection["file_name"]]
    remapped = tmp_path / "detections.json"
    remapped.write_text(json.dumps(detections))
    scored = evaluate_coco(exported.ground_truth, remapped)["map50_95"]
    in_house = 100.0 * float(metrics.box.map)
    assert row.int8_map50_95 > 30  # measured 61: a model that detects, so agreement means something
    assert abs(scored - row.int8_map50_95) < SAME_MODEL, (scored, row.int8_map50_95)
    assert in_house > 30, in_house  # Ultralytics' own pipeline (its loader, its metric) sees the same detector


@pytest.mark.parametrize("fmt", ["openvino", "onnx"])
def test_ultralytics_predicts_with_the_export(exported: Exported, tmp_path: Path, fmt: str) -> None:
    results = YOLO(str(exported.artefacts[fmt].path), task="detect").predict(
        [str(p) for p in exported.ground_truth.image_files], imgsz=exported.settings.imgsz, conf=0.25, verbose=False
    )
    assert len(results) == len(exported.ground_truth.image_files)
    assert all(len(r.boxes) > 0 for r in results) and results[0].names == {i: str(i) for i in range(6)}


def test_writers_and_formats_are_checked_in_one_line() -> None:
    assert int8_writer("openvino") == ("openvino", INT8_WRITERS["openvino"])
    assert int8_writer("onnx") == ("onnxruntime", INT8_WRITERS["onnxruntime"])
    with pytest.raises(InputError, match="no INT8 export as 'torchscript'"):
        int8_writer("torchscript")
    with pytest.raises(InputError, match="backend 'openvino' is exported as openvino, not onnx"):
        int8_writer("onnx", "openvino")
    with pytest.raises(InputError, match="no INT8 export for backend 'torch'"):
        int8_writer("onnx", "torch")


def test_an_existing_export_is_kept_and_a_failed_one_leaves_nothing(
    exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = exported.artefacts["openvino"].path
    stamp = (target / "clean.xml").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_int8(target.parent / "clean.pt", "openvino", exported.settings, progress=False)
    assert (target / "clean.xml").stat().st_mtime_ns == stamp

    def half_written(job, contract, out: Path) -> None:
        out.mkdir()
        (out / "clean.xml").write_text("<net/>")
        raise RuntimeError("interrupted")

    weights = tmp_path / "clean.pt"
    weights.write_bytes((target.parent / "clean.pt").read_bytes())
    monkeypatch.setitem(INT8_WRITERS, "openvino", replace(INT8_WRITERS["openvino"], write=half_written))
    with pytest.raises(RuntimeError, match="interrupted"):
        export_int8(weights, "openvino", exported.settings, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.pt"]


def test_cli_bad_input_is_one_line_and_writes_nothing(
    exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    weights = tmp_path / "clean.pt"
    weights.write_bytes(exported.artefacts["openvino"].path.with_name("clean.pt").read_bytes())
    data = exported.settings.data
    no_train = tmp_path / "no_train.yaml"
    no_train.write_text(yaml.safe_dump({**yaml.safe_load(data.read_text()), "train": str(tmp_path / "empty")}))
    (tmp_path / "empty").mkdir()
    base = ["export", "--weights", str(weights), "--imgsz", "96"]
    cases = [
        (["--format", "openvino", "--int8"], "--int8 needs --data"),
        (["--format", "openvino", "--calib-images", "8"], "--calib-images: only with --int8"),
        (["--format", "tflite", "--int8", "--data", str(data)], "invalid choice: 'tflite'"),
        (["--format", "onnx", "--int8", "--data", str(data), "--backend", "openvino"], "exported as openvino"),
        (["--format", "openvino", "--int8", "--data", str(tmp_path / "none.yaml")], "does not exist"),
        (["--format", "openvino", "--int8", "--data", str(no_train)], "no images found in the train split"),
        (["--format", "openvino", "--int8", "--data", str(data), "--keep-float-layers", "model.99.conv"], "model.99"),
        (["--format", "onnx", "--int8", "--data", str(data), "--openvino-activations", "asymmetric"], "NNCF's grid"),
        (["--format", "openvino", "--int8", "--data", str(data), "--openvino-activations", "u8"], "invalid choice"),
    ]
    for args, message in cases:
        try:
            status = qarep_det_main([*base, *args])
        except SystemExit as e:  # argparse's own errors (an unknown choice)
            status = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.pt", "empty", "no_train.yaml"]
