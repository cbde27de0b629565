"""FP32 versus INT8 on a val split: the library behind ``tools/ptq_eval.py``.

For each checkpoint: load, re-parameterize (every branch and BN folded), evaluate the fused FP32 model, calibrate
on the train split, quantize with each requested backend, evaluate the INT8 model the same way, and emit one row
per (model, backend). Every model and backend is scored by the same streaming prediction and pycocotools code.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from qarep_det.checkpoint import load_detector
from qarep_det.eval.coco import load_ground_truth
from qarep_det.eval.predict import evaluate_runner
from qarep_det.eval.protocol import EvalProtocol
from qarep_det.eval.table import write_results
from qarep_det.quant.calibration import CalibrationSet, calibration_set
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.runner import Runner, torch_runner
from qarep_det.reparam import reparameterize_model

BACKENDS = ("torch", "openvino")


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

    def __post_init__(self) -> None:
        if unknown := [b for b in self.backends if b not in BACKENDS]:
            raise ValueError(f"unknown backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
        if self.imgsz < 32 or self.imgsz % 32:
            raise ValueError(f"imgsz must be a multiple of 32, got {self.imgsz}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if "openvino" in self.backends and self.device != "cpu":
            raise ValueError("the openvino backend runs on the CPU; use --device cpu with it")


def model_name(weights: Path) -> str:
    """A readable name for a checkpoint: the run folder for Ultralytics' ``RUN/weights/best.pt``, else the stem."""
    return weights.parent.parent.name if weights.parent.name == "weights" else weights.stem


def file_size_mb(*paths: Path) -> float:
    """Total size of files in MB (an OpenVINO IR is an .xml plus a .bin)."""
    return sum(p.stat().st_size for p in paths) / 1e6


def _torch_int8(fused: nn.Module, calib: CalibrationSet, settings: PTQSettings, stem: Path) -> tuple[Runner, dict]:
    """Simulated INT8 (ModelOpt fake quant) on the chosen device; optionally saved as QDQ ONNX for TensorRT."""
    from qarep_det.quant.simulated import quantize_torch

    qmodel = quantize_torch(fused, calib, settings.recipe, settings.device)
    extra: dict[str, Any] = {}
    if settings.save_int8:
        from qarep_det.quant.onnx_qdq import export_qdq_onnx

        path = stem.with_name(f"{stem.name}_int8_qdq.onnx")
        path = export_qdq_onnx(qmodel, path, settings.imgsz, overwrite=settings.overwrite)
        extra["int8_file"] = str(path)
    return torch_runner(qmodel, settings.device), extra


def _openvino_int8(fused: nn.Module, calib: CalibrationSet, settings: PTQSettings, stem: Path) -> tuple[Runner, dict]:
    """Real INT8 on the CPU: NNCF-quantized OpenVINO IR; FP32 IR latency and both file sizes measured beside it."""
    from qarep_det.quant.openvino import convert_openvino, openvino_runner, quantize_openvino, save_openvino

    fp32_model = convert_openvino(fused, settings.imgsz)
    qmodel = quantize_openvino(fused, calib, settings.imgsz, settings.recipe, fp32=fp32_model)
    extra: dict[str, Any] = {"fp32_runner": openvino_runner(fp32_model)}
    if settings.save_int8:
        fp32_xml = save_openvino(fp32_model, stem.with_name(f"{stem.name}_fp32.xml"), overwrite=settings.overwrite)
        int8_xml = save_openvino(qmodel, stem.with_name(f"{stem.name}_int8.xml"), overwrite=settings.overwrite)
        extra["fp32_mb"] = file_size_mb(fp32_xml, fp32_xml.with_suffix(".bin"))
        extra["int8_mb"] = file_size_mb(int8_xml, int8_xml.with_suffix(".bin"))
        extra["int8_file"] = str(int8_xml)
    return openvino_runner(qmodel), extra


QUANTIZERS = {"torch": _torch_int8, "openvino": _openvino_int8}


def evaluate_checkpoint(
    weights: Path, settings: PTQSettings, out_dir: Path, ground_truth, calib: CalibrationSet, progress: bool = True
) -> list[dict[str, Any]]:
    """Rows for one checkpoint: FP32 once, then INT8 for each backend."""
    name = model_name(weights)
    model = load_detector(weights)
    fused = reparameterize_model(model)
    protocol = EvalProtocol(imgsz=settings.imgsz)
    evaluate = dict(ground_truth=ground_truth, protocol=protocol, batch=settings.batch, progress=progress)
    fp32 = evaluate_runner(torch_runner(fused, settings.device), out_json=out_dir / f"{name}_fp32.json", **evaluate)
    rows = []
    for backend in settings.backends:
        start = time.perf_counter()
        int8_runner, extra = QUANTIZERS[backend](fused.cpu(), calib, settings, out_dir / name)
        quantize_s = time.perf_counter() - start  # calibration, quantization and writing the INT8 artefacts
        int8 = evaluate_runner(int8_runner, out_json=out_dir / f"{name}_int8_{backend}.json", **evaluate)
        fp32_ms = fp32["runner_ms"]
        if fp32_runner := extra.pop("fp32_runner", None):  # the backend's own FP32 model: like-for-like latency
            backend_fp32 = evaluate_runner(fp32_runner, out_json=out_dir / f"{name}_fp32_{backend}.json", **evaluate)
            fp32_ms = backend_fp32["runner_ms"]
            extra["fp32_backend_map50_95"] = backend_fp32["map50_95"]
        rows.append(
            {
                "model": name,
                "params": sum(p.numel() for p in fused.parameters()),
                "backend": backend,
                "calib_method": settings.recipe.calib_method,
                "calib_images": len(calib.paths) if calib.readable is None else calib.readable,
                "fp32_map50_95": fp32["map50_95"],
                "int8_map50_95": int8["map50_95"],
                "drop": fp32["map50_95"] - int8["map50_95"],
                "fp32_map50": fp32["map50"],
                "int8_map50": int8["map50"],
                "fp32_ms": fp32_ms,
                "int8_ms": int8["runner_ms"],
                "quantize_head": settings.recipe.quantize_head,
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
    images for calibration fail with one clear error. Returns the rows and the two result paths.
    """
    paths = [Path(w) for w in weights]
    if not paths:
        raise ValueError("no weights given")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"weights '{path}' not found")
    ground_truth = load_ground_truth(settings.data, instances_json=settings.instances_json)
    recipe = settings.recipe
    calib = calibration_set(settings.data, settings.imgsz, recipe.calib_images, recipe.seed, settings.batch, progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for path in paths for row in evaluate_checkpoint(path, settings, out, ground_truth, calib, progress)]
    json_path, md_path = write_results(rows, out, EvalProtocol(imgsz=settings.imgsz))
    return rows, json_path, md_path
