"""Ultralytics' own QAT (``qarep-det yolo train ... quantize=8``): our blocks fused first, so what it validates is
what it exports; QAT's fine-tuning recipe where the user set nothing else; the calibrated start kept unless an epoch
beats it; and the inputs it cannot fine-tune refused in one line, with nothing written."""

from __future__ import annotations

import copy
import csv
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import fresh_env, results_epochs
from ultralytics import YOLO
from ultralytics.cfg import get_cfg
from ultralytics.utils import DEFAULT_CFG_DICT
from ultralytics.utils.patches import torch_load

from qarep_det.cli.main import main as cli_main
from qarep_det.nn import Reparameterizable
from qarep_det.ultralytics.quantize8 import with_qat_defaults
from qarep_det.ultralytics.run_options import QAT_FINE_TUNING
from qarep_det.ultralytics.trainer import QARepTrainer

IMGSZ = 96


def yolo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``qarep-det yolo ARGS`` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "qarep_det_launcher", "yolo", *args], cwd=cwd, env=fresh_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def train_args(weights: Path, data: Path, project: Path, name: str) -> list[str]:
    """A run's arguments: no hyperparameter among them."""
    return [
        "train", f"model={weights}", f"data={data}", "quantize=8", "epochs=1", f"imgsz={IMGSZ}", "batch=8",
        "workers=0", "device=cpu", f"project={project}", f"name={name}", "plots=False",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def q8_run(known_answer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with no hyperparameter given; its output is in ``output.txt`` beside the run folder."""
    project = tmp_path_factory.mktemp("q8")
    result = yolo(*train_args(known_answer.unfused, known_answer.data, project, "run"), cwd=project)
    assert result.returncode == 0, result.stderr[-3000:]
    (project / "output.txt").write_text(result.stdout + result.stderr)
    assert "quantize=8: fused 41 Rep blocks first" in result.stdout + result.stderr
    return project / "run"


def qat_defaults_line(given: str) -> str:
    """The log line of :func:`with_qat_defaults` that lists ``given``."""
    return f"quantize=8: QAT defaults for the fused graph where not given: {given} (a value given wins)"


def test_quantize_8_without_hyperparameters_fine_tunes_with_qat_recipe_and_says_so(q8_run: Path) -> None:
    output = (q8_run.parent / "output.txt").read_text()
    listed = "optimizer=Adam lr0=1e-05 warmup_epochs=0.0 mosaic=0.0 close_mosaic=0 amp=False nbs=8"
    assert output.count("QAT defaults for the fused graph") == 1 and qat_defaults_line(listed) in output
    args = yaml.safe_load((q8_run / "args.yaml").read_text())
    assert {k: args[k] for k in (*QAT_FINE_TUNING, "nbs")} == {**QAT_FINE_TUNING, "nbs": 8}
    assert "Adam(lr=1e-05" in output  # what Ultralytics built from them
    assert "quantize=8: the start (calibrated INT8) is epoch 0" in output
    assert results_epochs(q8_run) == [0, 1]


@pytest.mark.parametrize(
    ("given", "filled"),
    [
        ({}, {**QAT_FINE_TUNING, "nbs": 16}),  # Ultralytics' default batch
        ({"batch": 8, "mosaic": 1.0, "amp": True}, {"optimizer": "Adam", "lr0": 1e-5, "warmup_epochs": 0.0,
                                                    "close_mosaic": 0, "nbs": 8}),
        ({"optimizer": "sgd", "nbs": 64}, {"lr0": 1e-4, "warmup_epochs": 0.0, "mosaic": 0.0, "close_mosaic": 0,
                                          "amp": False}),  # QAT's lr0 for the optimizer named, in any case
        ({"optimizer": "RMSprop", "batch": -1}, {"warmup_epochs": 0.0, "mosaic": 0.0, "close_mosaic": 0,
                                                "amp": False}),  # no QAT lr0 for it; no nbs for an automatic batch
        ({"lr0": 0.003, "warmup_epochs": 1.0}, {"optimizer": "Adam", "mosaic": 0.0, "close_mosaic": 0, "amp": False,
                                                "nbs": 16}),  # Adam, or optimizer=auto would ignore lr0
    ],
)  # fmt: skip
def test_quantize_8_fills_in_what_the_user_did_not_give_and_lists_it(
    given: dict[str, Any], filled: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="ultralytics"):
        args = with_qat_defaults(given)
    assert args == {**given, **filled}  # every value given, as given
    listed = " ".join(f"{k}={v}" for k, v in filled.items())
    assert [r.getMessage() for r in caplog.records] == [qat_defaults_line(listed)]


def test_the_trainer_keeps_every_value_given_in_overrides_or_in_a_cfg_of_its_own(known_answer, tmp_path: Path):
    """Overrides get QAT's recipe for what they leave out; a cfg of one's own (Ultralytics' needs every key) states
    every value, so nothing of it is replaced."""
    run = {"model": str(known_answer.unfused), "data": str(known_answer.data), "quantize": 8, "project": str(tmp_path),
           "device": "cpu", "batch": 4, "optimizer": "SGD", "mosaic": 0.5, "nbs": 64}  # fmt: skip
    from_overrides = vars(QARepTrainer(overrides=run).args)
    assert {k: from_overrides[k] for k in run} == run
    filled = {"lr0": 1e-4, "warmup_epochs": 0.0, "close_mosaic": 0, "amp": False}  # lr0: QAT's for SGD
    assert {k: from_overrides[k] for k in filled} == filled
    own, recipe = {**DEFAULT_CFG_DICT, **run}, [*QAT_FINE_TUNING, "nbs"]
    from_cfg = vars(QARepTrainer(cfg=own).args)
    assert {k: from_cfg[k] for k in recipe} == {k: own[k] for k in recipe}


def test_a_ddp_worker_s_arguments_are_complete_and_get_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """Ultralytics' DDP worker gets every argument of the run as overrides: nothing to fill in, nothing logged."""
    worker = vars(get_cfg(overrides={"quantize": 8}))
    with caplog.at_level("INFO", logger="ultralytics"):
        assert with_qat_defaults(worker) == worker
    assert not caplog.records


def test_a_quantize_8_run_that_only_hurts_keeps_its_calibrated_start(
    known_answer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An lr0 given (100x Ultralytics' AdamW) is used as given, breaks the model, and best.pt stays the start."""
    overrides = {"model": str(known_answer.unfused), "data": str(known_answer.data), "quantize": 8, "epochs": 1,
                 "imgsz": IMGSZ, "batch": 8, "workers": 0, "device": "cpu", "project": str(tmp_path), "name": "hurt",
                 "plots": False, "optimizer": "Adam", "lr0": 0.1}  # fmt: skip
    start: dict[str, torch.Tensor] = {}
    with caplog.at_level("INFO", logger="ultralytics"):
        trainer = QARepTrainer(overrides=overrides)
        trainer.add_callback("on_train_start", lambda t: start.update(copy.deepcopy(t.ema.ema.state_dict())))
        trainer.train()
    assert (trainer.args.optimizer, trainer.args.lr0) == ("Adam", 0.1)
    assert [g["initial_lr"] for g in trainer.optimizer.param_groups] == [0.1] * 3
    assert qat_defaults_line("warmup_epochs=0.0 mosaic=0.0 close_mosaic=0 amp=False nbs=8") in caplog.text
    with open(trainer.csv, newline="") as f:
        scores = [float(row["metrics/mAP50-95(B)"]) for row in csv.DictReader(f)]
    assert len(scores) == 2 and scores[0] > 0.1 and scores[1] < scores[0] / 2, scores  # the epoch broke the model
    best, last = (torch_load(path, map_location="cpu")["model"] for path in (trainer.best, trainer.last))
    assert all(torch.equal(v, start[k].to(v.dtype)) for k, v in best.state_dict().items())  # the start, as saved
    assert not all(torch.equal(v, start[k].to(v.dtype)) for k, v in last.state_dict().items())  # the epoch moved
    final = trainer.metrics["metrics/mAP50-95(B)"]  # Ultralytics' validation of best.pt
    assert abs(final - scores[0]) < abs(final - scores[1]), (final, scores)
    assert "quantize=8: no epoch beat the start (calibrated INT8" in caplog.text
    assert "try another optimizer= or lr0=" in caplog.text


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
