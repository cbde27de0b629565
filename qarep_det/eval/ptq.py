"""FP32 versus INT8 on a val split: the library behind ``tools/ptq_eval.py``.

For each checkpoint: load, re-parameterize (every branch and BN folded), evaluate the fused FP32 model, calibrate
on the train split, quantize with each requested backend, evaluate the INT8 model the same way, and emit one row
per (model, backend). Every model and backend is scored by the same streaming prediction and pycocotools code.
Partial quantization keeps convs float in every backend: the recipe's ``float_layers``, or the ``keep_float`` most
sensitive ones by :mod:`qarep_det.integrations.analysis` on the same calibration images (the ranking diagnose reports).

A QAT checkpoint (``tools/qat.py``) is recognised and scored differently (``method: qat``): its FP32 model is the one
the fine-tuning started from, its INT8 model is the fine-tuned student with its learned weights and frozen ranges,
and nothing is calibrated; the QDQ ONNX, onnxruntime and OpenVINO all run that student (OpenVINO from the QDQ ONNX,
since NNCF would calibrate anew).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import nn

from qarep_det.checks import check_count, check_imgsz
from qarep_det.device import torch_device
from qarep_det.eval.coco import load_ground_truth
from qarep_det.eval.predict import evaluate_runner
from qarep_det.eval.protocol import EvalProtocol
from qarep_det.eval.table import write_results
from qarep_det.integrations.analysis import keep_most_sensitive
from qarep_det.integrations.checkpoint import checkpoint_paths, load_detector
from qarep_det.quant.calibration import CalibrationSet, calibration_set
from qarep_det.quant.qat import qat_student
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.runner import Runner, torch_runner
from qarep_det.quant.scope import check_partial
from qarep_det.reparam import reparameterize_model

BACKENDS = ("torch", "openvino", "onnxruntime")


@dataclass(frozen=True)
class PTQSettings:
    """Everything a PTQ evaluation depends on besides the checkpoints; stored with the results."""

    data: Path
    recipe: QuantRecipe = field(default_factory=QuantRecipe)
    backends: tuple[str, ...] = ("torch",)
    imgsz: int = 640
    batch: int = 8
    device: str = "cpu"
    instances_json: Path | None = None
    save_int8: bool = True  # write the INT8 artefacts (QDQ ONNX, OpenVINO IR) into the output folder
    overwrite: bool = False  # replace artefacts left in the output folder by an earlier run
    keep_float: int = 0  # keep the K most sensitive convs float (analysis ranking); exclusive with float_layers

    def __post_init__(self) -> None:
        if self.keep_float < 0:
            raise ValueError(f"keep_float must be >= 0, got {self.keep_float}")
        if self.keep_float and self.recipe.float_layers:
            raise ValueError("keep the K most sensitive convs float or name them, not both")
        if unknown := [b for b in self.backends if b not in BACKENDS]:
            raise ValueError(f"unknown backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
        check_imgsz(self.imgsz)
        check_count("batch", self.batch)
        torch_device(self.device)  # fails now, in one line, rather than at the first .to(device)


def model_name(weights: Path) -> str:
    """A readable name for a checkpoint: the run folder for Ultralytics' ``RUN/weights/best.pt``, else the stem."""
    return weights.parent.parent.name if weights.parent.name == "weights" else weights.stem


def file_size_mb(*paths: Path) -> float:
    """Total size of files in MB (an OpenVINO IR is an .xml plus a .bin)."""
    return sum(p.stat().st_size for p in paths) / 1e6


@dataclass
class _Job:
    """What every backend quantizes, for one checkpoint. The simulated INT8 model and its QDQ ONNX are made on first
    use, so the torch and onnxruntime backends share one calibration and one file."""

    fused: nn.Module  # on the CPU
    calib: CalibrationSet
    settings: PTQSettings
    stem: Path  # artefacts are written as <stem>_<suffix>: the output folder, or a scratch one without save_int8
    student: nn.Module | None = None  # a QAT checkpoint's INT8 model: the simulated model, nothing is calibrated

    def path(self, suffix: str) -> Path:
        return self.stem.with_name(f"{self.stem.name}_{suffix}")

    def onnx(self, model: nn.Module, suffix: str) -> Path:
        """``model`` exported the way TensorRT gets it (QDQ for a fake-quantized model, plain for a float one)."""
        from qarep_det.quant.onnx_qdq import export_qdq_onnx

        return export_qdq_onnx(model, self.path(suffix), self.settings.imgsz, overwrite=self.settings.overwrite)

    @cached_property
    def simulated(self) -> nn.Module:
        if self.student is not None:
            return self.student.to(self.settings.device).eval()
        from qarep_det.quant.simulated import quantize_torch

        return quantize_torch(self.fused, self.calib, self.settings.recipe, self.settings.device)

    @cached_property
    def qdq_onnx(self) -> Path:
        return self.onnx(self.simulated, "int8_qdq.onnx")


def _torch_int8(job: _Job) -> tuple[Runner, dict]:
    """Simulated INT8 (ModelOpt fake quant) on the chosen device; optionally saved as QDQ ONNX for TensorRT."""
    extra: dict[str, Any] = {"int8_file": str(job.qdq_onnx)} if job.settings.save_int8 else {}
    return torch_runner(job.simulated, job.settings.device), extra


def _onnxruntime_int8(job: _Job) -> tuple[Runner, dict]:
    """The torch backend's QDQ ONNX (the TensorRT hand-off) on onnxruntime's CPU provider, beside the fused FP32
    model exported the same way: proves the file computes what the simulation computed.

    onnxruntime fuses Q/DQ into integer kernels only around a conv whose output is quantized too; TensorRT's scheme
    quantizes conv inputs alone, so here every conv runs in float on dequantized INT8 values (exactly the simulated
    arithmetic), and the INT8 latency is not an integer-kernel latency.
    """
    from qarep_det.quant.onnx_qdq import onnx_runner

    fp32_onnx = job.onnx(job.fused, "fp32.onnx")
    extra: dict[str, Any] = {"fp32_runner": onnx_runner(fp32_onnx)}
    if job.settings.save_int8:
        extra["int8_file"] = str(job.qdq_onnx)
    return onnx_runner(job.qdq_onnx), extra


def _openvino_int8(job: _Job) -> tuple[Runner, dict]:
    """Real INT8 on the CPU: NNCF-quantized OpenVINO IR (a QAT student: its QDQ ONNX converted, learned scales
    kept); FP32 IR latency and both file sizes measured beside it."""
    from qarep_det.quant.openvino import (
        convert_openvino,
        convert_qdq_onnx,
        openvino_runner,
        quantize_openvino,
        save_openvino,
    )

    fused, calib, settings, stem = job.fused, job.calib, job.settings, job.stem
    fp32_model = convert_openvino(fused, settings.imgsz)
    if job.student is not None:
        qmodel = convert_qdq_onnx(job.qdq_onnx)
    else:
        qmodel = quantize_openvino(fused, calib, settings.imgsz, settings.recipe, fp32=fp32_model)
    extra: dict[str, Any] = {"fp32_runner": openvino_runner(fp32_model)}
    if settings.save_int8:
        fp32_xml = save_openvino(fp32_model, stem.with_name(f"{stem.name}_fp32.xml"), overwrite=settings.overwrite)
        int8_xml = save_openvino(qmodel, stem.with_name(f"{stem.name}_int8.xml"), overwrite=settings.overwrite)
        extra["fp32_mb"] = file_size_mb(fp32_xml, fp32_xml.with_suffix(".bin"))
        extra["int8_mb"] = file_size_mb(int8_xml, int8_xml.with_suffix(".bin"))
        extra["int8_file"] = str(int8_xml)
    return openvino_runner(qmodel), extra


QUANTIZERS = {"torch": _torch_int8, "openvino": _openvino_int8, "onnxruntime": _onnxruntime_int8}


def evaluate_checkpoint(
    weights: Path, settings: PTQSettings, out_dir: Path, ground_truth, calib: CalibrationSet, progress: bool = True
) -> list[dict[str, Any]]:
    """Rows for one checkpoint: FP32 once, then INT8 for each backend (on the CPU but for the torch backend)."""
    name = model_name(weights)
    model = load_detector(weights)
    student = qat_student(model)
    fused = reparameterize_model(model if student is None else student.fp32_reference)
    protocol = EvalProtocol(imgsz=settings.imgsz)
    evaluate = dict(ground_truth=ground_truth, protocol=protocol, batch=settings.batch, progress=progress)
    fp32 = evaluate_runner(torch_runner(fused, settings.device), out_json=out_dir / f"{name}_fp32.json", **evaluate)
    if student is None:
        recipe = keep_most_sensitive(fused, calib, settings.recipe, settings.keep_float, settings.device, progress)
        settings = replace(settings, keep_float=0, recipe=recipe)
        calib_images = None  # the images the calibration could read, known once it ran
    else:
        settings = replace(settings, recipe=QuantRecipe(**student.qat_recipe))
        calib_images = settings.recipe.calib_images  # those of the QAT run's calibration
    rows = []
    with tempfile.TemporaryDirectory(prefix="qarep_ptq_") as scratch:  # runtimes have loaded their files by its end
        stem = (out_dir if settings.save_int8 else Path(scratch)) / name
        job = _Job(fused.cpu(), calib, settings, stem, student)
        for backend in settings.backends:
            start = time.perf_counter()
            int8_runner, extra = QUANTIZERS[backend](job)
            quantize_s = time.perf_counter() - start  # calibration (shared by torch, onnxruntime), quantizing, files
            int8 = evaluate_runner(int8_runner, out_json=out_dir / f"{name}_int8_{backend}.json", **evaluate)
            fp32_ms = fp32["runner_ms"]
            if fp32_runner := extra.pop("fp32_runner", None):  # the backend's own FP32 model: like-for-like latency
                fp32_json = out_dir / f"{name}_fp32_{backend}.json"
                backend_fp32 = evaluate_runner(fp32_runner, out_json=fp32_json, **evaluate)
                fp32_ms = backend_fp32["runner_ms"]
                extra["fp32_backend_map50_95"] = backend_fp32["map50_95"]
            rows.append(
                {
                    "model": name,
                    "params": sum(p.numel() for p in fused.parameters()),
                    "backend": backend,
                    "calib_method": settings.recipe.calib_method,
                    "method": "ptq" if student is None else "qat",
                    "ranges": "calibrated" if student is None else student.qat_ranges,  # qat: frozen or learned
                    "calib_images": calib_images or (len(calib.paths) if calib.readable is None else calib.readable),
                    "fp32_map50_95": fp32["map50_95"],
                    "int8_map50_95": int8["map50_95"],
                    "drop": fp32["map50_95"] - int8["map50_95"],
                    "fp32_map50": fp32["map50"],
                    "int8_map50": int8["map50"],
                    "fp32_ms": fp32_ms,
                    "int8_ms": int8["runner_ms"],
                    "quantize_head": settings.recipe.quantize_head,
                    "float_layers": list(settings.recipe.float_layers),
                    "quantize_s": quantize_s,
                    "weights": str(weights),
                    "protocol": fp32["protocol"],
                    **extra,
                }
            )
    return rows


def run_ptq_eval(
    weights: Sequence[str | os.PathLike], settings: PTQSettings, out_dir: str | os.PathLike, progress: bool = True
) -> tuple[list[dict[str, Any]], Path, Path]:
    """Evaluate every checkpoint at FP32 and INT8; writes ``results.json`` and ``results.md`` into ``out_dir``.

    Inputs are checked before any model runs: missing weights, a data YAML without a val split or without train
    images for calibration, unknown float layers or too large a ``keep_float`` fail with one clear error. Returns
    the rows and the two result paths.
    """
    paths = checkpoint_paths(weights)
    if settings.keep_float or settings.recipe.float_layers:
        for path in paths:
            model = load_detector(path)
            if qat_student(model) is not None:
                raise ValueError(f"'{path}' is a QAT checkpoint: its float convs were fixed when it was trained")
            check_partial(reparameterize_model(model), settings.recipe, settings.keep_float)
    ground_truth = load_ground_truth(settings.data, instances_json=settings.instances_json)
    recipe = settings.recipe
    calib = calibration_set(settings.data, settings.imgsz, recipe.calib_images, recipe.seed, settings.batch, progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for path in paths for row in evaluate_checkpoint(path, settings, out, ground_truth, calib, progress)]
    json_path, md_path = write_results(rows, out, EvalProtocol(imgsz=settings.imgsz))
    return rows, json_path, md_path
