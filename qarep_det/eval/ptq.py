"""FP32 versus INT8 on a val split: the library behind ``tools/ptq_eval.py``.

For each checkpoint: load, re-parameterize (every branch and BN folded), evaluate the fused FP32 model, calibrate
on the train split, quantize with each requested backend, evaluate the INT8 model the same way, and emit one row
per (model, backend). Every model and backend is scored by the same streaming prediction and pycocotools code.
Partial quantization keeps convs float in every backend: the recipe's ``float_layers``, the ``keep_float`` most
sensitive ones by :mod:`qarep_det.integrations.analysis` (the ranking diagnose reports, on the first ``rank_images``
of the same calibration draw), or, with ``max_drop``, the fewest of that ranking whose drop on a tuning set stays
within it, per backend (:mod:`qarep_det.eval.max_drop`). The torch model is calibrated once per checkpoint: the
ranking, every candidate and the row's model switch quantizers off in it rather than calibrating again.

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
from qarep_det.eval.max_drop import search_backend
from qarep_det.eval.plots import plot_max_drop
from qarep_det.eval.predict import evaluate_runner
from qarep_det.eval.protocol import EvalProtocol
from qarep_det.eval.table import write_results
from qarep_det.eval.tuning import TuningSet, tuning_set
from qarep_det.integrations.analysis import isolated_noise, rank_by_noise
from qarep_det.integrations.checkpoint import checkpoint_paths, load_detector
from qarep_det.quant.calibration import CalibrationSet, calibration_set, first_images
from qarep_det.quant.qat import qat_student
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.runner import Runner, torch_runner
from qarep_det.quant.scope import check_partial
from qarep_det.reparam import reparameterize_model

BACKENDS = ("torch", "openvino", "onnxruntime")
RANK_IMAGES = 32  # ranking images by default (fewer if fewer are calibrated): README, "Ranking on fewer images"
TUNE_IMAGES = 256


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
    max_drop: float | None = None  # keep the fewest of the ranking float for a tuning drop <= this (mAP50-95 points)
    tune_images: int = TUNE_IMAGES  # the tuning set of max_drop (see eval/tuning.py)
    tune_split: str = "train"
    rank_images: int | None = None  # images of the calibration draw the ranking runs on (None: RANK_IMAGES or all)

    def __post_init__(self) -> None:
        if self.keep_float < 0:
            raise ValueError(f"keep_float must be >= 0, got {self.keep_float}")
        if sum(map(bool, (self.keep_float, self.recipe.float_layers, self.max_drop is not None))) > 1:
            raise ValueError("keep K convs float, name them, or give a largest drop: one of the three")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise ValueError(f"max_drop must be >= 0 mAP50-95 points, got {self.max_drop}")
        check_count("tune_images", self.tune_images)
        if self.rank_images is not None and check_count("rank_images", self.rank_images) > self.recipe.calib_images:
            raise ValueError(
                f"rank_images ({self.rank_images}) cannot exceed calib_images ({self.recipe.calib_images}): the "
                "ranked images are the first of the calibration draw"
            )
        if unknown := [b for b in self.backends if b not in BACKENDS]:
            raise ValueError(f"unknown backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
        check_imgsz(self.imgsz)
        check_count("batch", self.batch)
        torch_device(self.device)  # fails now, in one line, rather than at the first .to(device)

    @property
    def ranked_images(self) -> int:
        return self.rank_images or min(RANK_IMAGES, self.recipe.calib_images)

    @property
    def ranks(self) -> bool:
        """Whether this evaluation needs the sensitivity ranking."""
        return bool(self.keep_float) or self.max_drop is not None


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
    calibrated: nn.Module | None = None  # the simulated model calibrated once with the recipe the ranking used
    shared: dict[Any, Any] = field(default_factory=dict)  # what the jobs of one checkpoint share (see below)

    def with_float(self, names: Sequence[str], stem: Path | None = None) -> _Job:
        """This job with ``names`` kept float too, sharing its calibration, FP32 IR and OpenVINO models."""
        recipe = replace(self.settings.recipe, float_layers=self.settings.recipe.float_layers + tuple(names))
        return replace(self, settings=replace(self.settings, recipe=recipe), stem=stem or self.stem)

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
        from qarep_det.quant.simulated import quantize_torch, with_float_layers

        if self.calibrated is not None:
            return with_float_layers(self.calibrated, self.settings.recipe)
        return quantize_torch(self.fused, self.calib, self.settings.recipe, self.settings.device)

    @cached_property
    def qdq_onnx(self) -> Path:
        return self.onnx(self.simulated, "int8_qdq.onnx")

    @property
    def fp32_ir(self):
        """The fused model as an FP32 OpenVINO IR, converted once per checkpoint."""
        from qarep_det.quant.openvino import convert_openvino

        if "fp32_ir" not in self.shared:
            self.shared["fp32_ir"] = convert_openvino(self.fused, self.settings.imgsz)
        return self.shared["fp32_ir"]

    @property
    def openvino_int8(self):
        """The NNCF INT8 IR for this job's float convs, made once per float set: a search's candidate is the row's
        model when it is chosen. A QAT student's QDQ ONNX converted, its learned scales kept."""
        from qarep_det.quant.openvino import convert_qdq_onnx, quantize_openvino

        if self.student is not None:
            return convert_qdq_onnx(self.qdq_onnx)
        recipe = self.settings.recipe
        key = ("openvino", recipe.float_layers)
        if key not in self.shared:
            self.shared[key] = quantize_openvino(self.fused, self.calib, self.settings.imgsz, recipe, fp32=self.fp32_ir)
        return self.shared[key]

    def candidate(self, backend: str, scratch: Path) -> Runner:
        """This job's INT8 model on ``backend`` for a search step: nothing saved, the QDQ file in ``scratch``."""
        if backend == "openvino":
            from qarep_det.quant.openvino import openvino_runner

            return openvino_runner(self.openvino_int8)
        if backend == "onnxruntime":
            from qarep_det.quant.onnx_qdq import export_qdq_onnx, onnx_runner

            return onnx_runner(export_qdq_onnx(self.simulated, scratch / "candidate_qdq.onnx", self.settings.imgsz,
                                               overwrite=True))  # fmt: skip
        return torch_runner(self.simulated, self.settings.device)


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
    from qarep_det.quant.openvino import openvino_runner, save_openvino

    settings, stem = job.settings, job.stem
    fp32_model, qmodel = job.fp32_ir, job.openvino_int8
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
    weights: Path,
    settings: PTQSettings,
    out_dir: Path,
    ground_truth,
    calib: CalibrationSet,
    progress: bool = True,
    tuning: TuningSet | None = None,
) -> list[dict[str, Any]]:
    """Rows for one checkpoint: FP32 once, then INT8 for each backend (on the CPU but for the torch backend)."""
    name = model_name(weights)
    model = load_detector(weights)
    student = qat_student(model)
    fused = reparameterize_model(model if student is None else student.fp32_reference)
    protocol = EvalProtocol(imgsz=settings.imgsz)
    evaluate = dict(ground_truth=ground_truth, protocol=protocol, batch=settings.batch, progress=progress)
    fp32 = evaluate_runner(torch_runner(fused, settings.device), out_json=out_dir / f"{name}_fp32.json", **evaluate)
    calibrated, ranking, ranked, max_drop = None, [], {}, settings.max_drop
    if student is None:
        if settings.ranks:  # the simulated model calibrated once on every calibration image, ranked on the first M
            from qarep_det.quant.simulated import quantize_torch

            start = time.perf_counter()
            calibrated = quantize_torch(fused, calib, settings.recipe, settings.device)
            ranked["calibrate_s"] = time.perf_counter() - start
            images = first_images(calib, settings.ranked_images)
            noise = isolated_noise(fused, calibrated, images, settings.recipe, settings.device, progress)
            ranking = rank_by_noise(noise)
            ranked |= {
                "rank_images": settings.ranked_images,
                "rank_s": time.perf_counter() - start - ranked["calibrate_s"],
            }
        keep = tuple(ranking[: settings.keep_float])  # the recipe from here on names its float convs itself
        settings = replace(settings, keep_float=0, max_drop=None, recipe=replace(settings.recipe, float_layers=keep))
        calib_images = None  # the images the calibration could read, known once it ran
    else:
        settings = replace(settings, recipe=QuantRecipe(**student.qat_recipe))
        calib_images = settings.recipe.calib_images  # those of the QAT run's calibration
    rows = []
    with tempfile.TemporaryDirectory(prefix="qarep_ptq_") as scratch:  # runtimes have loaded their files by its end
        stem = (out_dir if settings.save_int8 else Path(scratch)) / name
        job = _Job(fused.cpu(), calib, settings, stem, student, calibrated)
        if tuning is not None:
            start = time.perf_counter()
            tune_runner = torch_runner(fused, settings.device)
            fp32_tune = evaluate_runner(tune_runner, tuning.ground_truth, Path(scratch) / "fp32.json", protocol,
                                        settings.batch, progress)["map50_95"]  # fmt: skip
            fp32_tune_s = time.perf_counter() - start
        for backend in settings.backends:
            start = time.perf_counter()
            backend_job, extra = job, {}
            if tuning is not None:
                search, extra = search_backend(
                    lambda k, b=backend: job.with_float(ranking[:k]).candidate(b, Path(scratch)),
                    len(ranking), tuning, fp32_tune, max_drop, Path(scratch), f"{name} on {backend}",
                    protocol, settings.batch, progress,
                )  # fmt: skip
                backend_job = job.with_float(ranking[: search.chosen.k], stem.with_name(f"{name}_{backend}"))
                extra["search_s"] = time.perf_counter() - start + fp32_tune_s  # with the FP32 evaluation, shared
            extra |= ranked
            start = time.perf_counter()
            int8_runner, quantized = QUANTIZERS[backend](backend_job)
            extra |= quantized
            quantize_s = time.perf_counter() - start  # calibration (unless ranked), quantizing, files
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
                    "float_layers": list(backend_job.settings.recipe.float_layers),
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
    """Evaluate every checkpoint at FP32 and INT8; writes ``results.json`` and ``results.md`` into ``out_dir``, and
    with ``max_drop`` the trade-off plot ``max_drop.png``.

    Inputs are checked before any model runs: missing weights, a data YAML without a val split or without train
    images for calibration (or tuning), unknown float layers or too large a ``keep_float`` fail with one clear
    error. Returns the rows and the two result paths.
    """
    paths = checkpoint_paths(weights)
    if settings.ranks or settings.recipe.float_layers:
        for path in paths:
            model = load_detector(path)
            if qat_student(model) is not None:
                raise ValueError(f"'{path}' is a QAT checkpoint: its float convs were fixed when it was trained")
            check_partial(reparameterize_model(model), settings.recipe, settings.keep_float)
    ground_truth = load_ground_truth(settings.data, instances_json=settings.instances_json)
    recipe = settings.recipe
    calib = calibration_set(settings.data, settings.imgsz, recipe.calib_images, recipe.seed, settings.batch, progress)
    tuning = None
    if settings.max_drop is not None:
        tuning = tuning_set(settings.data, settings.tune_images, recipe.seed, calib.paths, ground_truth.image_files,
                            settings.tune_split)  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        row for path in paths for row in evaluate_checkpoint(path, settings, out, ground_truth, calib, progress, tuning)
    ]
    json_path, md_path = write_results(rows, out, EvalProtocol(imgsz=settings.imgsz))
    if tuning is not None:
        plot_max_drop(rows, out / "max_drop.png")
    return rows, json_path, md_path
