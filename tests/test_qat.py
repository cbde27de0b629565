"""tools/qat.py and qarep_det.qat.trainer: a tiny CPU QAT run, its checkpoint, resume, DDP pickling, bad input."""

from __future__ import annotations

import copy
import csv
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import openvino as ov
import pytest
import torch
from conftest import fresh_env, randomize_bn, results_epochs
from helpers import qdq_convs
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel, load_checkpoint
from ultralytics.utils.dist import ddp_cleanup, generate_ddp_file
from ultralytics.utils.patches import torch_load
from ultralytics.utils.torch_utils import unwrap_model

from qarep_det import reparameterize_model
from qarep_det.cli import qat as qat_cli
from qarep_det.cli.main import main as cli_main
from qarep_det.data.synthetic import make_dataset
from qarep_det.errors import InputError
from qarep_det.pipelines.diagnose import DiagnoseSettings, run_diagnose
from qarep_det.pipelines.ptq import PTQSettings, run_ptq_eval
from qarep_det.qat.trainer import QATOptions, QATTrainer, make_qat_trainer
from qarep_det.qat.training_form import (
    ema_fused,
    fused_student,
    has_training_form,
    to_training_form,
    training_form_blocks,
    unfused_blocks,
)
from qarep_det.quant.calibration import calibration_set
from qarep_det.quant.lsq import learn_ranges, range_parameters
from qarep_det.quant.qat import (
    FeatureDistillationLoss,
    QATDetectionModel,
    is_qat_model,
    make_student,
    pin_ranges,
    quantizer_ranges,
)
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.ultralytics.checkpoint import load_detector

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "qat.py"
QAREP_N = REPO / "model_yamls" / "yolo_qarep_n.yaml"
RECIPE = QuantRecipe(calib_images=8)
TINY = ["--imgsz", "64", "--batch", "8", "--device", "cpu", "--workers", "0"]

main = qat_cli.main


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=16, n_val=8, imgsz=64, seed=0)


@pytest.fixture(scope="module")
def fp32_weights(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Path:
    """An Ultralytics checkpoint of a QARep detector with trained-looking BatchNorm statistics."""
    model = randomize_bn(DetectionModel(str(QAREP_N), nc=6, verbose=False))
    path = tmp_path_factory.mktemp("fp32") / "fp32.pt"
    torch.save({"model": model, "train_args": {}}, path)
    return path


def cli_run(project: Path, fp32_weights: Path, dataset: Path, ranges: str) -> Path:
    """One QAT epoch through the CLI in a fresh process (as a user runs it)."""
    argv = ["--weights", fp32_weights, "--data", dataset, "--epochs", "1", *TINY, "--calib-images", "8",
            "--ranges", ranges, "--project", project, "--name", "run"]  # fmt: skip
    result = subprocess.run([sys.executable, str(TOOL), *map(str, argv)], env=fresh_env(), cwd=project,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"done: {project / 'run'}" in result.stdout
    return project / "run"


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory: pytest.TempPathFactory, dataset: Path, fp32_weights: Path) -> Path:
    return cli_run(tmp_path_factory.mktemp("qat"), fp32_weights, dataset, "frozen")


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory: pytest.TempPathFactory, dataset: Path, fp32_weights: Path) -> Path:
    """Its two optimizer steps (one per batch, QAT's nominal batch) move the ranges."""
    return cli_run(tmp_path_factory.mktemp("qat_learned"), fp32_weights, dataset, "learned")


def tiny_options(weights: Path, data: Path, project: Path, **changes: Any) -> QATOptions:
    """One epoch at 64 px, batch 8, on the CPU, with ``changes``."""
    options = QATOptions(weights=weights, data=data, epochs=1, imgsz=64, batch=8, device="cpu", workers=0,
                         project=project, recipe=RECIPE)  # fmt: skip
    return replace(options, **changes)


def calibrated_ranges(fp32_weights: Path, dataset: Path) -> dict[str, torch.Tensor]:
    """The ranges ptq_eval's recipe gives this checkpoint: what a QAT run must start from and keep."""
    fused = reparameterize_model(load_checkpoint(fp32_weights)[0])
    return quantizer_ranges(make_student(fused, calibration_set(dataset, 64, n=8, seed=0, progress=False), RECIPE))


def test_one_cpu_epoch_keeps_the_calibrated_ranges_and_float32_weights(
    qat_run: Path, fp32_weights: Path, dataset: Path
) -> None:
    assert results_epochs(qat_run) == [0, 1]  # the start (epoch 0), then the epoch trained
    ckpt = torch_load(qat_run / "weights" / "best.pt", map_location="cpu")
    assert ckpt["modelopt"]["ranges"] and all(v.dtype == torch.float32 for v in ckpt["modelopt"]["ranges"].values())
    student = ckpt["model"]
    assert type(student) is QATDetectionModel and all(p.dtype == torch.float32 for p in student.parameters())
    reference = reparameterize_model(load_checkpoint(fp32_weights)[0])
    assert torch.equal(student.fp32_reference.model[0].conv.weight, reference.model[0].conv.weight)
    assert not torch.equal(student.model[0].conv.weight, reference.model[0].conv.weight)  # it did train
    expected = calibrated_ranges(fp32_weights, dataset)
    assert expected.keys() == ckpt["modelopt"]["ranges"].keys()
    for key, value in expected.items():  # ptq_eval's calibration, kept through training, EMA and saving; another
        # process may sum a conv in another order (thread count), which moves a max by an ulp, hence the tolerance
        torch.testing.assert_close(ckpt["modelopt"]["ranges"][key], value, rtol=1e-6, atol=0, msg=key)


def test_learned_ranges_train_and_are_saved_in_float32(learned_run: Path, fp32_weights: Path, dataset: Path) -> None:
    assert results_epochs(learned_run) == [0, 1]
    saved = torch_load(learned_run / "weights" / "last.pt", map_location="cpu")["modelopt"]["ranges"]
    expected = calibrated_ranges(fp32_weights, dataset)
    assert saved.keys() == expected.keys() and all(v.dtype == torch.float32 for v in saved.values())
    moved = [k for k, v in expected.items() if not torch.allclose(saved[k], v, rtol=1e-5, atol=0)]
    assert len(moved) > len(expected) // 2, len(moved)
    best = torch_load(learned_run / "weights" / "best.pt", map_location="cpu")["modelopt"]["ranges"]
    with open(learned_run / "ranges.csv", newline="") as f:  # the report: best.pt's ranges against calibration
        report = {(row["conv"], row["quantizer"]): row for row in csv.DictReader(f)}
    assert len(report) == len(expected) and (learned_run / "ranges.png").stat().st_size > 10_000
    for key, value in expected.items():
        conv, quantizer = key.removesuffix("_quantizer._amax").rsplit(".", 1)
        ratio = (best[key] / value).flatten()
        assert float(report[conv, quantizer]["ratio"]) == pytest.approx(float(ratio.median()), rel=1e-5)


@pytest.mark.parametrize("run", ["qat_run", "learned_run"])
def test_checkpoint_reloads_as_int8_in_a_fresh_process_without_importing_qarep_det(
    run: str, request: pytest.FixtureRequest
) -> None:
    weights = request.getfixturevalue(run) / "weights" / "best.pt"
    code = (
        "import sys, torch\n"
        "from ultralytics import YOLO\n"
        "model = YOLO(sys.argv[1])\n"
        "assert 'qarep_det' in sys.modules  # imported by unpickling the checkpoint\n"
        "assert 'qarep_det.quant.lsq' not in sys.modules  # learned ranges are saved as plain ModelOpt ones\n"
        "on = [q for q in model.model.modules() if type(q).__name__ == 'TensorQuantizer' and q.is_enabled]\n"
        "assert {q.backend for q in on} == {None} and not any(isinstance(q._amax, torch.nn.Parameter) for q in on)\n"
        "model.predict(torch.rand(1, 3, 64, 64), verbose=False)\n"
        "ranges = {k: v for k, v in model.model.state_dict().items() if k.endswith('_amax')}\n"
        "torch.save(ranges, sys.argv[2])\n"
        "print(type(model.model).__name__, len(on))\n"
    )
    loaded = weights.parent / "loaded_ranges.pt"
    result = subprocess.run([sys.executable, "-c", code, str(weights), str(loaded)], env=fresh_env(),
                            cwd=weights.parent, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    name, quantizers = result.stdout.split()[-2:]
    fused = reparameterize_model(DetectionModel(str(QAREP_N), nc=6, verbose=False))
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in fused.modules())
    assert name == "QATDetectionModel" and int(quantizers) == 2 * (convs - 1)  # weight + input of every conv but DFL
    saved = torch_load(weights, map_location="cpu")["modelopt"]["ranges"]
    assert all(torch.equal(v, saved[k]) for k, v in torch.load(loaded).items())  # exactly, float32


@pytest.mark.parametrize("ranges", ["frozen", "learned"])
def test_resume_finishes_an_interrupted_run(ranges: str, dataset: Path, fp32_weights: Path, tmp_path: Path) -> None:
    class Interrupted(Exception):
        pass

    def interrupt(trainer: QATTrainer) -> None:
        if trainer.epoch == 0:
            raise Interrupted

    options = tiny_options(fp32_weights, dataset, tmp_path, epochs=2, name="resume", ranges=ranges)
    trainer = make_qat_trainer(options)
    trainer.add_callback("on_model_save", interrupt)
    with pytest.raises(Interrupted):
        trainer.train()
    run = tmp_path / "resume"
    assert results_epochs(run) == [0, 1]
    saved = torch_load(run / "weights" / "last.pt", map_location="cpu")
    first = saved["modelopt"]["ranges"]
    groups = [g.get("param_group") for g in saved["optimizer"]["param_groups"]]
    assert ("ranges" in groups) == (ranges == "learned")

    resumed: dict[str, Any] = {}

    def record(trainer: QATTrainer) -> None:  # what the resumed run trains from
        resumed["ranges"] = quantizer_ranges(unwrap_model(trainer.model))
        resumed["learned"] = len(range_parameters(unwrap_model(trainer.model)))

    trainer = make_qat_trainer(QATOptions(resume=run / "weights" / "last.pt", workers=0))
    trainer.add_callback("on_pretrain_routine_end", record)
    trainer.train()
    assert results_epochs(run) == [0, 1, 2]
    assert all(torch.equal(resumed["ranges"][k], v) for k, v in first.items())  # the saved ranges, exactly
    assert resumed["learned"] == (len(first) if ranges == "learned" else 0)
    last = torch_load(run / "weights" / "last.pt", map_location="cpu")["modelopt"]["ranges"]
    unchanged = all(torch.equal(last[k], v) for k, v in first.items())
    assert unchanged == (ranges == "frozen")  # learned ranges kept learning after the resume


def test_qat_checkpoint_as_weights_continues_with_its_own_ranges(qat_run: Path, dataset: Path, tmp_path: Path) -> None:
    weights = qat_run / "weights" / "best.pt"
    options = QATOptions(weights=weights, data=dataset, epochs=1, imgsz=64, batch=8, device="cpu", workers=0,
                         project=tmp_path, distill=True)  # fmt: skip
    trainer = make_qat_trainer(options)
    packed = trainer.model
    assert not is_qat_model(packed) and packed.distill  # plain convs: picklable for DDP workers
    saved = torch_load(weights, map_location="cpu")["modelopt"]["ranges"]
    ranges = packed.__dict__["qat_state"]["ranges"]
    assert all(torch.equal(ranges[k], v) for k, v in saved.items())


def test_distillation_adds_a_feature_loss_that_vanishes_for_the_teacher(fp32_weights: Path, dataset: Path) -> None:
    fused = reparameterize_model(load_checkpoint(fp32_weights)[0])
    student = make_student(fused, calibration_set(dataset, 64, n=8, seed=0, progress=False), RECIPE, distill=True)
    student.args = get_cfg()  # the loss gains, as the trainer sets them
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    batch = {"img": images, "batch_idx": torch.zeros(1), "cls": torch.zeros(1, 1), "bboxes": torch.tensor([[0.5] * 4])}
    student.train()
    losses = {}
    for name, teacher in (("fp32", student.fp32_reference), ("itself", copy.deepcopy(student))):
        loss, items = FeatureDistillationLoss(student.init_criterion(), student, teacher)(student(images), batch)
        assert loss.shape == (4,) and set(items) == {"box_loss", "cls_loss", "dfl_loss", "distill_loss"}
        losses[name] = loss
        assert (items["distill_loss"] > 0) == (name == "fp32"), (name, items)
    losses["fp32"][3].backward()  # the distillation term reaches the student's weights
    assert student.model[0].conv.weight.grad.abs().sum() > 0


def test_ranges_are_pinned_and_half_keeps_float32(fp32_weights: Path, dataset: Path) -> None:
    fused = reparameterize_model(load_checkpoint(fp32_weights)[0])
    student = make_student(fused, calibration_set(dataset, 64, n=8, seed=0, progress=False), RECIPE)
    ranges = quantizer_ranges(student)
    drifted = make_student(fused, [torch.rand(2, 3, 64, 64) * 2], RECIPE)
    assert not all(torch.equal(quantizer_ranges(drifted)[k], v) for k, v in ranges.items())
    pin_ranges(drifted, student)
    assert all(torch.equal(quantizer_ranges(drifted)[k], v) for k, v in ranges.items())
    assert student.half() is student and next(student.parameters()).dtype == torch.float32
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():  # a caller that halved the model and feeds float16 gets the float32 result
        assert torch.equal(student.eval()(x.half())[0], student(x.half().float())[0])


@pytest.mark.parametrize("form", ["fused", "training"])
def test_ddp_worker_script_trains_the_packed_student(
    form: str, dataset: Path, fp32_weights: Path, tmp_path: Path
) -> None:
    """Ultralytics' generated DDP worker script, run as is: outside torchrun it trains in one process. The training
    form's blocks travel with the pickled student."""
    trainer = make_qat_trainer(tiny_options(fp32_weights, dataset, tmp_path, name="ddp", ranges="learned", form=form))
    start = trainer.model.__dict__["qat_state"]["ranges"]
    script = generate_ddp_file(trainer)
    try:
        result = subprocess.run([sys.executable, script], env=fresh_env(), cwd=tmp_path, capture_output=True,
                                text=True, timeout=600)  # fmt: skip
    finally:
        ddp_cleanup(trainer, script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "learning 118 quantizer ranges" in result.stderr + result.stdout
    assert ("41 blocks train in their training form" in result.stderr + result.stdout) == (form == "training")
    assert is_qat_model(load_checkpoint(trainer.save_dir / "weights" / "best.pt")[0])
    last = torch_load(trainer.save_dir / "weights" / "last.pt", map_location="cpu")["modelopt"]["ranges"]
    assert not all(torch.equal(last[k], v) for k, v in start.items())


@pytest.mark.parametrize(
    "case",
    [
        "not a detector",
        "no epochs",
        "qat weights with recipe flags",
        "distill without teacher",
        "missing weights",
        "range lr without learned ranges",
        "negative range lr",
    ],
)
def test_bad_input_fails_with_one_line_and_writes_nothing(
    case: str, qat_run: Path, dataset: Path, fp32_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    weights, extra, message = fp32_weights, [], ""
    if case == "not a detector":
        weights = tmp_path / "not_a_detector.pt"
        torch.save({"model": torch.nn.Linear(2, 2)}, weights)
        message = "not an Ultralytics Detect detector"
    elif case == "no epochs":
        extra, message = ["--epochs", "0"], "--epochs must be an integer >= 1"
    elif case == "qat weights with recipe flags":
        weights, extra, message = qat_run / "weights" / "best.pt", ["--calib-images", "16"], "drop --calib-images"
    elif case == "distill without teacher":
        ckpt = torch_load(qat_run / "weights" / "best.pt", map_location="cpu")
        ckpt["model"].__dict__["fp32_reference"] = None
        weights = tmp_path / "no_teacher.pt"
        torch.save(ckpt, weights)
        extra, message = ["--distill"], "holds no FP32 teacher"
    elif case == "range lr without learned ranges":
        extra, message = ["--ranges", "frozen", "--lr-ranges", "0.01"], "--lr-ranges applies to --ranges learned only"
    elif case == "negative range lr":
        extra, message = ["--ranges", "learned", "--lr-ranges", "-1"], "--lr-ranges must be > 0, got -1.0"
    else:
        weights, message = tmp_path / "missing.pt", "not found"
    project = tmp_path / "runs"
    argv = ["--weights", weights, "--data", dataset, *TINY, *extra, "--project", project]
    assert cli_main(["qat", *[str(a) for a in argv]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not project.exists()


def test_ptq_eval_scores_the_student_with_its_learned_scales_in_every_artefact(
    learned_run: Path, dataset: Path, tmp_path: Path
) -> None:
    backends = ("torch", "onnxruntime", "openvino")
    settings = PTQSettings(dataset, recipe=QuantRecipe(calib_images=1), backends=backends, imgsz=64, batch=4)
    weights = learned_run / "weights" / "last.pt"  # its ranges were trained (test_learned_ranges_train_...)
    rows, _, _ = run_ptq_eval([weights], settings, tmp_path, progress=False)
    assert [(r.backend, r.method, r.ranges, r.calib_images) for r in rows] == [
        (b, "qat", "learned", 8) for b in backends
    ]
    student = load_detector(weights)
    quantized = {n: m for n, m in student.named_modules() if getattr(m, "input_quantizer", None) is not None}
    quantized = {n: m for n, m in quantized.items() if m.input_quantizer.is_enabled}

    convs = qdq_convs(rows[0].int8_file)  # the QDQ ONNX for TensorRT: one Q/DQ pair per quantizer, its scale
    assert {n for n, (i, w) in convs.items() if i and w} == set(quantized)
    for name, conv in quantized.items():
        (inputs, weights) = convs[name]
        torch.testing.assert_close(
            torch.tensor(inputs.scale), conv.input_quantizer.amax.float() / 127, rtol=1e-7, atol=0
        )
        torch.testing.assert_close(
            torch.tensor(weights.scale), conv.weight_quantizer.amax.flatten() / 127, rtol=1e-7, atol=0
        )

    ir = ov.Core().read_model(rows[2].int8_file)  # the OpenVINO IR: FakeQuantize at the learned input ranges
    highs = {f"{op.input_value(2).get_node().get_data().max():.6g}" for op in ir.get_ordered_ops()
             if op.get_type_name() == "FakeQuantize"}  # fmt: skip
    assert highs == {f"{float(c.input_quantizer.amax):.6g}" for c in quantized.values()}


def test_ptq_eval_and_diagnose_refuse_what_does_not_apply_to_a_qat_checkpoint(qat_run: Path, dataset: Path) -> None:
    weights = [qat_run / "weights" / "best.pt"]
    settings = PTQSettings(dataset, recipe=QuantRecipe(calib_images=1), keep_float=1, imgsz=64)
    fix = replace(settings, keep_float=0, backends=("openvino",), overflow_fix=True)  # its weights are learned
    own_ranges = replace(settings, keep_float=0, backends=("onnxruntime-int8",))  # it calibrates an FP32 model
    asymmetric = replace(settings, keep_float=0, backends=("openvino",), asymmetric_activations=True)  # learned
    for refused in (settings, replace(settings, keep_float=0, max_drop=0.3), fix, own_ranges, asymmetric):
        with pytest.raises(ValueError, match="is a QAT checkpoint"):
            run_ptq_eval(weights, refused, "unused", progress=False)
    with pytest.raises(ValueError, match="is a QAT checkpoint"):
        run_diagnose(weights, DiagnoseSettings(dataset, imgsz=64), "unused", progress=False)


def test_keep_float_keeps_the_most_sensitive_conv_float_in_the_student_and_out_of_learning(
    dataset: Path, fp32_weights: Path, tmp_path: Path
) -> None:
    options = tiny_options(fp32_weights, dataset, tmp_path, keep_float=1, ranges="learned")
    trainer = make_qat_trainer(options)
    packed = trainer.model
    (kept,) = packed.qat_recipe["float_layers"]
    ranges = packed.__dict__["qat_state"]["ranges"]
    assert f"{kept}.weight_quantizer._amax" not in ranges and f"{kept}.input_quantizer._amax" not in ranges
    assert sum(k.endswith("weight_quantizer._amax") for k in ranges) > 50  # the others stay quantized

    stepped: dict[str, Any] = {}

    def record(trainer: QATTrainer) -> None:  # after the run's steps
        student = unwrap_model(trainer.model)
        stepped["state"] = student.state_dict()
        stepped["group"] = next(g["params"] for g in trainer.optimizer.param_groups if g["param_group"] == "ranges")
        stepped["ranges"] = range_parameters(student)

    trainer.add_callback("on_train_end", record)
    trainer.train()
    assert not any(k.startswith(f"{kept}.") and k.endswith("_amax") for k in stepped["state"])
    assert stepped["group"] == stepped["ranges"] and len(stepped["ranges"]) == len(ranges)  # the kept conv's: none
    moved = [k for k, v in ranges.items() if not torch.equal(stepped["state"][k], v)]
    assert len(moved) > len(ranges) // 2
    with pytest.raises(InputError, match="cannot keep 999 convs float"):
        make_qat_trainer(replace(options, keep_float=999))


def test_the_ema_averages_learned_ranges_like_the_weights(dataset: Path, fp32_weights: Path, tmp_path: Path) -> None:
    trainer = make_qat_trainer(tiny_options(fp32_weights, dataset, tmp_path, epochs=2, ranges="learned"))
    expected: dict[str, torch.Tensor] = {}
    seen = {"updates": 0}

    def start(trainer: QATTrainer) -> None:
        expected.update(quantizer_ranges(trainer.ema.ema))

    def follow(trainer: QATTrainer) -> None:  # after each step: the EMA's rule applied to the model's ranges
        if trainer.ema.updates == seen["updates"]:
            return
        seen["updates"] = trainer.ema.updates
        weight = 1 - trainer.ema.decay(trainer.ema.updates)
        for key, value in quantizer_ranges(unwrap_model(trainer.model)).items():
            expected[key] = torch.lerp(expected[key], value, weight)

    def check(trainer: QATTrainer) -> None:
        ema, model = quantizer_ranges(trainer.ema.ema), quantizer_ranges(unwrap_model(trainer.model))
        for key, value in expected.items():
            torch.testing.assert_close(ema[key], value, rtol=1e-6, atol=0, msg=key)
        assert not all(torch.equal(ema[k], model[k]) for k in ema)  # averaged, not copied from the model

    trainer.add_callback("on_train_start", start)
    trainer.add_callback("on_train_batch_end", follow)
    trainer.add_callback("on_train_end", check)
    trainer.train()
    assert seen["updates"] == 4  # 16 images, batch 8, 2 epochs


def test_a_run_that_only_hurts_keeps_its_start_as_best(
    known_answer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    options = QATOptions(weights=known_answer.clean, data=known_answer.data, epochs=1, imgsz=known_answer.imgsz,
                         batch=8, device="cpu", workers=0, project=tmp_path, recipe=RECIPE, optimizer="Adam",
                         lr0=0.05)  # fmt: skip
    trainer = make_qat_trainer(options)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with caplog.at_level("WARNING", logger="ultralytics"):
        trainer.train()
    with open(trainer.csv, newline="") as f:
        scores = [float(row["metrics/mAP50-95(B)"]) for row in csv.DictReader(f)]
    assert len(scores) == 2 and scores[0] > 0.05 and scores[1] < scores[0] / 2  # the epoch broke the model
    best = torch_load(trainer.best, map_location="cpu")["model"]
    assert all(torch.equal(v.float(), start[k]) for k, v in best.state_dict().items())  # best.pt is the start
    assert trainer.metrics["metrics/mAP50-95(B)"] == pytest.approx(scores[0], abs=1e-4)  # and is what final_eval saw
    assert "no epoch beat the start" in caplog.text


def test_an_unknown_ranges_value_fails_with_one_line(dataset: Path, fp32_weights: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--weights", str(fp32_weights), "--data", str(dataset), "--ranges", "adaptive"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "--ranges" in err[0], err
    with pytest.raises(InputError, match="--ranges must be one of frozen, learned, got 'adaptive'"):
        make_qat_trainer(tiny_options(fp32_weights, dataset, Path("unused"), ranges="adaptive"))


def test_qat_steps_after_every_batch(fp32_weights: Path, dataset: Path, tmp_path: Path) -> None:
    """QAT's few epochs need their steps: its nominal batch is the batch, so nothing is accumulated."""
    trainer = make_qat_trainer(tiny_options(fp32_weights, dataset, tmp_path, batch=4))
    assert trainer.args.nbs == trainer.args.batch == 4


def test_the_training_form_computes_the_fused_students_arithmetic_and_trains_the_branches(
    fp32_weights: Path, dataset: Path
) -> None:
    """Before any step it is the fused student (outputs, and its own conversion back); gradients reach every block's
    branch kernels, BN affine parameters and learned ranges; BN statistics stay frozen in train mode."""
    model = load_checkpoint(fp32_weights)[0]
    images = next(iter(calibration_set(dataset, 64, n=8, seed=0, progress=False)))
    student = make_student(reparameterize_model(model), [images], RECIPE).eval()
    training = copy.deepcopy(student)
    blocks = copy.deepcopy(unfused_blocks(model))
    assert to_training_form(training, blocks) == len(blocks) > 0 and has_training_form(training)
    assert training_form_blocks(model, "fp32.pt").keys() == blocks.keys()
    with torch.no_grad():
        expected = student(images)[0]
        torch.testing.assert_close(training(images)[0], expected, rtol=1e-5, atol=1e-5)
        back = fused_student(training)
        assert not has_training_form(back) and back.state_dict().keys() == student.state_dict().keys()
        torch.testing.assert_close(back(images)[0], expected, rtol=1e-5, atol=1e-5)

    ranges = learn_ranges(training)
    statistics = {k: v.clone() for k, v in training.state_dict().items() if "running_" in k}
    training.train()(images)  # a training forward: no BN runs as a module, so none updates its statistics
    assert all(torch.equal(training.state_dict()[k], v) for k, v in statistics.items())
    training.eval()(images)[0].square().mean().backward()
    for block in blocks.values():
        bns = block.branch_bns().values()
        trained = [block.geometry().weight, *(bn.weight for bn in bns), *(bn.bias for bn in bns)]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained), block
    assert all(r.grad is not None for r in ranges)

    with torch.no_grad():  # a step later, the checkpoint's fused conv is the block's equivalent kernel
        for block in blocks.values():
            block.geometry().weight.mul_(1.1)
        back = fused_student(training)
        torch.testing.assert_close(back(images)[0], training(images)[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(back(images)[0], expected, rtol=1e-3, atol=1e-3)


def test_a_training_form_checkpoint_is_finite_after_a_nan_in_its_ema(fp32_weights: Path, dataset: Path) -> None:
    """Ultralytics' save repairs a non-finite EMA tensor from the live model by key, which the fused copy no longer
    shares: ema_fused repairs it before fusing (a branch BN from the live model), and zeroes in the fused copy what is
    non-finite in both, so the checkpoint is the live model's fused student and finite; the EMA object is kept."""
    model = load_checkpoint(fp32_weights)[0]
    images = next(iter(calibration_set(dataset, 64, n=8, seed=0, progress=False)))
    live = make_student(reparameterize_model(model), [images], RECIPE).eval()
    to_training_form(live, copy.deepcopy(unfused_blocks(model)))
    ema = types.SimpleNamespace(ema=copy.deepcopy(live))
    state, fused_keys = ema.ema.state_dict(), fused_student(live).state_dict().keys()
    branch = next(k for k, v in state.items() if k not in fused_keys and k.endswith("bn.weight"))
    shared = next(k for k in fused_keys if k in state and state[k].dim() == 4)  # a conv outside our blocks (the head)
    with torch.no_grad():
        state[branch].fill_(float("nan"))
        state[shared].view(-1)[0] = float("inf")
        live.state_dict()[shared].view(-1)[0] = float("nan")  # non-finite in both: zeroed in the checkpoint only
    original = ema.ema
    with ema_fused(ema, live):
        saved = ema.ema.state_dict()
        assert all(v.isfinite().all() for v in saved.values() if v.is_floating_point())
        assert saved[shared].view(-1)[0] == 0
        with torch.no_grad():
            expected = fused_student(live)
            expected.state_dict()[shared].view(-1)[0] = 0
            torch.testing.assert_close(ema.ema(images)[0], expected(images)[0])
    assert ema.ema is original and torch.equal(original.state_dict()[branch], live.state_dict()[branch])


@pytest.fixture(scope="module")
def training_form_run(tmp_path_factory: pytest.TempPathFactory, dataset: Path, fp32_weights: Path) -> Path:
    """One epoch of ``qarep-det qat --form training`` (learned ranges, the default)."""
    project = tmp_path_factory.mktemp("qat_training_form")
    argv = ["--weights", fp32_weights, "--data", dataset, "--epochs", "1", *TINY, "--calib-images", "8",
            "--form", "training", "--project", project, "--name", "run"]  # fmt: skip
    assert cli_main(["qat", *map(str, argv)]) == 0
    return project / "run"


def test_a_training_form_run_writes_fused_qat_checkpoints_that_ptq_eval_scores(
    training_form_run: Path, fp32_weights: Path, dataset: Path, tmp_path: Path
) -> None:
    assert results_epochs(training_form_run) == [0, 1]
    start = calibrated_ranges(fp32_weights, dataset)
    fused = reparameterize_model(load_checkpoint(fp32_weights)[0])
    for name in ("best.pt", "last.pt"):
        ckpt = torch_load(training_form_run / "weights" / name, map_location="cpu")
        student = ckpt["model"]
        assert type(student) is QATDetectionModel and student.qat_form == "training"
        assert not has_training_form(student) and ckpt["modelopt"]["ranges"].keys() == start.keys()
    # the trained blocks' kernels reached last.pt (model.1 is a QARepBlock, now one conv)
    assert not torch.equal(student.model[1].conv.weight, fused.model[1].conv.weight)
    settings = PTQSettings(dataset, recipe=QuantRecipe(calib_images=1), backends=("torch",), imgsz=64, batch=4)
    rows, _, _ = run_ptq_eval([training_form_run / "weights" / "best.pt"], settings, tmp_path, progress=False)
    assert [(r.backend, r.method) for r in rows] == [("torch", "qat")]


@pytest.mark.parametrize("case", ["no rep blocks", "qat weights", "resume"])
def test_the_training_form_refuses_what_it_cannot_train_in_one_line(
    case: str, training_form_run: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    project = tmp_path / "runs"
    if case == "resume":  # its last.pt as if interrupted after the first of two epochs (the optimizer is not read)
        ckpt = torch_load(training_form_run / "weights" / "last.pt", map_location="cpu")
        ckpt["epoch"], ckpt["train_args"]["epochs"], ckpt["optimizer"] = 0, 2, {"param_groups": []}
        weights = project / "interrupted" / "weights" / "last.pt"
        weights.parent.mkdir(parents=True)
        torch.save(ckpt, weights)
        argv, message = ["--resume", weights], "a --form training run does not resume"
    else:
        weights, message = training_form_run / "weights" / "best.pt", "is a QAT checkpoint"
        if case == "no rep blocks":
            weights, message = tmp_path / "yolov8n.pt", "has no unfused rep blocks"
            torch.save({"model": DetectionModel("yolov8n.yaml", nc=6, verbose=False), "train_args": {}}, weights)
        argv = ["--weights", weights, "--data", dataset, *TINY, "--form", "training", "--project", project]
    assert cli_main(["qat", *[str(a) for a in argv]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and message in err[-1], err
    if case != "resume":
        assert len(err) == 1 and not project.exists()
