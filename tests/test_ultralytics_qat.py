"""Ultralytics' own QAT (``qarep-det yolo train ... quantize=8``): our blocks fused first, so what it validates is
what it exports; and the inputs it cannot fine-tune refused in one line, with nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fresh_env
from ultralytics import YOLO

from qarep_det.cli.main import main as cli_main
from qarep_det.nn import Reparameterizable

IMGSZ = 96


def yolo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``qarep-det yolo ARGS`` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "qarep_det_launcher", "yolo", *args], cwd=cwd, env=fresh_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def train_args(weights: Path, data: Path, project: Path, name: str) -> list[str]:
    return [
        "train", f"model={weights}", f"data={data}", "quantize=8", "epochs=1", f"imgsz={IMGSZ}", "batch=8",
        "workers=0", "device=cpu", f"project={project}", f"name={name}", "plots=False", "lr0=1e-5", "optimizer=Adam",
        "warmup_epochs=0", "mosaic=0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def q8_run(known_answer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("q8")
    result = yolo(*train_args(known_answer.unfused, known_answer.data, project, "run"), cwd=project)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "quantize=8: fused 41 Rep blocks first" in result.stdout + result.stderr
    return project / "run"


def test_quantize_8_trains_and_saves_the_fused_blocks_with_their_quantizers(q8_run: Path) -> None:
    model = YOLO(q8_run / "weights" / "best.pt").model
    blocks = [m for m in model.modules() if isinstance(m, Reparameterizable)]
    assert len(blocks) == 41 and all(b.fused for b in blocks)
    assert all(type(b.conv).__name__ == "QuantConv2d" and b.conv.weight_quantizer.is_enabled for b in blocks)


def test_the_exported_qdq_onnx_computes_what_fake_quant_validates(q8_run: Path, known_answer) -> None:
    """Ultralytics' export of the run's best.pt quantizes exactly the convs its validation fake-quantizes (every fused
    block included) and computes the same outputs up to float summation order, which flips an INT8 rounding now and
    then (docs/qat.md: a score gap of 0.1-0.3 mAP50-95 on 64 images, 3 points on these 8 self-labelled ones)."""
    import onnx
    import onnxruntime as ort

    best = q8_run / "weights" / "best.pt"
    model = YOLO(best).model.float().eval()
    model.fuse(verbose=False)
    quantized = sum(type(m).__name__ == "QuantConv2d" and m.weight_quantizer.is_enabled for m in model.modules())
    exported = YOLO(best).export(format="onnx", imgsz=IMGSZ)
    graph = onnx.load(exported).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    with_qdq_weights = [n for n in graph.node if n.op_type == "Conv" and producer.get(n.input[1]) == "DequantizeLinear"]
    assert len(with_qdq_weights) == quantized > 41  # the 41 fused blocks and the Conv layers Ultralytics quantizes

    session = ort.InferenceSession(exported)
    images = sorted((known_answer.data.parent / "images" / "val").iterdir())
    x = torch.stack([letterboxed(path) for path in images])
    with torch.no_grad():
        expected = model(x)[0]
    name = session.get_inputs()[0].name  # a batch-1 graph, as Ultralytics exports by default
    got = torch.cat([torch.from_numpy(session.run(None, {name: image[None].numpy()})[0]) for image in x])
    scores, boxes = (got - expected)[:, 4:].abs().max(), (got - expected)[:, :4].abs().max()
    assert scores < 0.01 and boxes < 0.05 * IMGSZ / 96, (float(scores), float(boxes))
    assert expected[:, 4:].max() > 0.3  # it detects: the comparison means something


def letterboxed(path: Path) -> torch.Tensor:
    """An image as Ultralytics' val feeds it (letterboxed to IMGSZ, RGB, 0-1)."""
    import cv2
    from ultralytics.data.augment import LetterBox

    image = LetterBox((IMGSZ, IMGSZ), auto=False)(image=cv2.imread(str(path)))
    return torch.from_numpy(image[..., ::-1].copy()).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("case", ["yaml", "fused", "qat", "task"])
def test_quantize_8_refuses_in_one_line_and_writes_nothing(case: str, known_answer, q8_run: Path, tmp_path: Path):
    data = known_answer.data
    weights = {"yaml": "yolo_qarep_n.yaml", "fused": known_answer.clean, "qat": q8_run / "weights" / "best.pt",
               "task": known_answer.unfused}[case]  # fmt: skip
    extra = ["task=segment"] if case == "task" else []
    result = yolo(*train_args(weights, data, tmp_path, "refused"), *extra, cwd=tmp_path)
    expected = {
        "yaml": "QAT fine-tunes a trained detector; train the YAML first",
        "fused": "the checkpoint holds fused blocks",
        "qat": "the checkpoint is quantization-aware already; fine-tune it further with qarep-det qat",
        "task": "qarep_det fuses its blocks for QAT in detection only, not task=segment",
    }[case]
    assert result.returncode != 0 and expected in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "refused").exists()


def test_other_quantize_values_go_to_ultralytics_as_they_are(known_answer, tmp_path: Path) -> None:
    args = train_args(known_answer.unfused, known_answer.data, tmp_path, "fp16")
    args[args.index("quantize=8")] = "quantize=16"
    result = yolo(*args, "val=False", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    model = torch.load(tmp_path / "fp16" / "weights" / "last.pt", weights_only=False)["model"]
    assert not any(isinstance(m, Reparameterizable) and m.fused for m in model.modules())  # trained unfused


def test_ptq_eval_scores_a_quantize_8_checkpoint_with_or_without_its_fp32_model(q8_run: Path, known_answer, tmp_path):
    """No FP32 model of its own: FP32 is the one given with --fp32-weights, else unknown and left empty."""
    import json

    from qarep_det.cli import ptq_eval

    common = ["--weights", q8_run / "weights" / "best.pt", "--data", known_answer.data, "--imgsz", str(IMGSZ),
              "--batch", "4", "--backend", "torch", "onnxruntime"]  # fmt: skip
    given = [*common, "--fp32-weights", known_answer.unfused, "--out", tmp_path / "given"]
    for argv in ([*common, "--out", tmp_path / "unknown"], given):
        assert ptq_eval.main([str(a) for a in argv]) == 0
    unknown, known = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("unknown", "given"))
    for row in unknown + known:
        assert (row["method"], row["ranges"], row["calib_images"]) == ("qat (ultralytics)", "frozen", None)
    assert all(row["fp32_map50_95"] is None and row["drop"] is None and row["fp32_ms"] is None for row in unknown)
    for a, b in zip(unknown, known, strict=True):
        assert a["int8_map50_95"] == b["int8_map50_95"] > 10  # the same student either way, and it detects
        drop = b["fp32_map50_95"] - b["int8_map50_95"]
        assert b["fp32_map50_95"] > 10 and b["drop"] == pytest.approx(drop, abs=0.015)  # each rounded to 2 decimals


def test_ptq_eval_refuses_a_missing_fp32_weights_in_one_line(q8_run: Path, known_answer, tmp_path: Path, capsys):
    argv = ["--weights", q8_run / "weights" / "best.pt", "--data", known_answer.data, "--imgsz", str(IMGSZ),
            "--fp32-weights", tmp_path / "nope.pt", "--out", tmp_path / "out"]  # fmt: skip
    assert cli_main(["ptq-eval", *[str(a) for a in argv]]) == 2
    assert capsys.readouterr().err.strip() == f"error: weights '{tmp_path / 'nope.pt'}' not found"
    assert not (tmp_path / "out").exists()
