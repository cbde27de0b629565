"""The benchmarks of ``benchmark``, measured in one run as medians and ratios, never single timings.

One code path serves the CPU and CUDA: timings wait for the GPU before the clock stops, and FP16 means autocast
(AMP). What differs by device is what is worth measuring: on the CPU batch 1 FP32 plus where the time goes
(:mod:`qarep_det.pipelines.op_profile`), on a GPU a grid of precisions and batches.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel

from qarep_det.checks import check_count
from qarep_det.device import CpuInfo, cpu_info
from qarep_det.errors import InputError
from qarep_det.evaluation.coco import load_ground_truth
from qarep_det.evaluation.predict import evaluate_runner
from qarep_det.pipelines.op_profile import op_breakdown
from qarep_det.pipelines.ptq import (
    PTQSettings,
    backend_jobs,
    calibration_and_tuning,
    evaluate_checkpoint,
    load_checked,
)
from qarep_det.quant.backends.base import BACKENDS
from qarep_det.quant.backends.openvino import OPENVINO_ACTIVATIONS, onednn_isa_cap, overflow_fix_on
from qarep_det.quant.calibration import CalibrationSet
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.runner import Runner
from qarep_det.reparam import reparameterize_model
from qarep_det.ultralytics.checkpoint import FusedCheckpoint, checkpoint_paths
from qarep_det.ultralytics.registration import find_model_yaml

Precision = Literal["fp32", "fp16"]
CUDA_GRID: tuple[tuple[Precision, int], ...] = (("fp32", 1), ("fp32", 32), ("fp16", 1), ("fp16", 32))
PLAIN_CONV_LIMIT = "yolov6s.yaml"  # Ultralytics' YOLOv6-S from plain Conv: what a fused QARep-S can at best reach


def _synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work: kernels launch asynchronously, so an unsynchronized clock measures the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], runs: int, warmup: int = 2, device: str | torch.device = "cpu") -> float:
    """Median wall time of ``fn()`` in milliseconds over ``runs`` calls, after ``warmup`` untimed calls."""
    if runs < 1:
        raise InputError(f"runs must be >= 1, got {runs}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def interleaved_ms(
    fns: Sequence[Callable[[], object]], runs: int, warmup: int = 2, device: str | torch.device = "cpu"
) -> list[float]:
    """Median ms of each of ``fns``, called in turn run by run (a, b, a, b, ...), so a slow-down of the machine
    spreads over all of them instead of biasing their ratio."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, ms in zip(fns, times, strict=True):
            ms.append(median_ms(fn, 1, warmup=0, device=device))
    return [statistics.median(ms) for ms in times]


def autocast(device: torch.device, precision: Precision) -> torch.autocast:
    """FP16 as AMP (autocast: convs in half, reductions in float), or plain FP32."""
    if precision not in ("fp32", "fp16"):
        raise InputError(f"precision must be fp32 or fp16, got {precision!r}")
    return torch.autocast(device.type, dtype=torch.float16, enabled=precision == "fp16")


@contextlib.contextmanager
def _cudnn_autotuned(device: torch.device) -> Iterator[None]:
    """Let cuDNN pick its fastest conv algorithms for these fixed shapes (during warm-up), as deployments do."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda" or saved
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


@dataclass(frozen=True)
class FusionTiming:
    """Median latency of one detector before and after re-parameterization at one precision and batch, measured
    in the same run (and, if asked, of the plain-conv limit model beside them)."""

    cfg: str
    imgsz: int
    batch: int
    precision: Precision
    device: str
    unfused_ms: float  # per batch
    fused_ms: float
    limit_ms: float | None = None  # the fused plain-conv model (PLAIN_CONV_LIMIT), when timed
    unfused_ops: dict[str, float] = field(default_factory=dict)  # op_breakdown of each form (CPU only)
    fused_ops: dict[str, float] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.unfused_ms / self.fused_ms

    @property
    def fused_images_per_s(self) -> float:
        return self.batch * 1e3 / self.fused_ms


@torch.no_grad()
def fusion_latency(
    cfg: str,
    imgsz: int = 640,
    runs: int = 20,
    nc: int = 80,
    device: str | torch.device = "cpu",
    grid: Sequence[tuple[Precision, int]] = (("fp32", 1),),
    limit_cfg: str | None = None,
) -> list[FusionTiming]:
    """Latency of the model built from ``cfg``, unfused vs fused, for each (precision, batch) of ``grid``.

    The forms run interleaved (unfused, fused, unfused, ...). ``limit_cfg`` adds a model timed the same way after
    Ultralytics' own ``fuse()`` (e.g. ``yolov6s.yaml``: the same topology from plain convs, the speed a fused
    detector can at best reach). On the CPU each form is also profiled (``op_breakdown``), after the timing.
    """
    device = torch.device(device)
    model = DetectionModel(cfg, nc=nc, verbose=False).eval()
    models = [model, reparameterize_model(model)]
    if limit_cfg:
        models.append(DetectionModel(limit_cfg, nc=nc, verbose=False).fuse(verbose=False).eval())
    models = [m.to(device) for m in models]
    timings = []
    with _cudnn_autotuned(device):
        for precision, batch in grid:
            x = torch.rand(batch, 3, imgsz, imgsz, device=device)
            with autocast(device, precision):
                ms = interleaved_ms([lambda m=m, x=x: m(x) for m in models], runs, warmup=3, device=device)
                ops = [op_breakdown(m, x) for m in models[:2]] if device.type == "cpu" else [{}, {}]
            limit_ms = ms[2] if limit_cfg else None
            timings.append(FusionTiming(cfg, imgsz, batch, precision, str(device), ms[0], ms[1], limit_ms, *ops))
    return timings


def _training_batch(batch: int, imgsz: int, nc: int, boxes_per_image: int = 4) -> dict[str, torch.Tensor]:
    """A fixed random batch in the layout Ultralytics' detection loss expects (normalized xywh boxes)."""
    g = torch.Generator().manual_seed(0)
    n = batch * boxes_per_image
    centre = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    return {
        "img": torch.rand(batch, 3, imgsz, imgsz, generator=g),
        "batch_idx": torch.arange(batch).repeat_interleave(boxes_per_image).float(),
        "cls": torch.randint(0, nc, (n, 1), generator=g).float(),
        "bboxes": torch.cat((centre, size), 1),
    }


@dataclass(frozen=True)
class TrainThroughput:
    """Median training step time (forward, loss, backward, SGD step) of one model; images per second.

    With AMP the gradient scaler skips the optimizer step whenever the scaled FP16 gradients overflow; such a step
    did no training, so it is never timed as one: ``warmup_skipped`` counts the skips before the scaler settled,
    ``skipped`` those during the timed steps (each left out of the median).
    """

    cfg: str
    step_ms: float
    batch: int
    amp: bool = False  # FP16 autocast with a gradient scaler, as Ultralytics trains on CUDA
    skipped: int = 0
    warmup_skipped: int = 0

    @property
    def images_per_s(self) -> float:
        return self.batch * 1e3 / self.step_ms


MAX_SKIPPED_STEPS = 30  # each skip halves GradScaler's scale: 30 take its default 2**16 below 2**-13


class ScalerNeverSettled(RuntimeError):
    """AMP's gradient scaler kept skipping optimizer steps: FP16 gradients overflow on this device at any scale."""


def _skipped_step_guard(skipped: int, cfg: str) -> None:
    if skipped > MAX_SKIPPED_STEPS:
        raise ScalerNeverSettled(
            f"{cfg}: the AMP gradient scaler skipped {skipped} optimizer steps (FP16 gradients overflow on this "
            "device); time it without AMP"
        )


def _timed_taken_steps(
    steps: Sequence[Callable[[], bool]], cfgs: Sequence[str], runs: int, device: torch.device
) -> list[tuple[list[float], int, int]]:
    """Per model: the wall times of ``runs`` optimizer steps taken, the steps skipped before the scaler settled, and
    those skipped while timing. Each ``step()`` returns whether its optimizer stepped.

    Warm-up repeats a step until one is taken (the scaler has found a scale at which the gradients fit); timed
    steps then run interleaved model by model (as in :func:`interleaved_ms`) until each model has ``runs`` taken
    steps, a skipped one being counted apart and never timed as a training step.
    """
    warmup_skipped = []
    for step, cfg in zip(steps, cfgs, strict=True):
        skipped = 0
        while not step():
            skipped += 1
            _skipped_step_guard(skipped, cfg)
        warmup_skipped.append(skipped)
    times: list[list[float]] = [[] for _ in steps]
    skipped = [0 for _ in steps]
    while any(len(ms) < runs for ms in times):
        for i, (step, cfg) in enumerate(zip(steps, cfgs, strict=True)):
            if len(times[i]) >= runs:
                continue
            _synchronize(device)
            start = time.perf_counter()
            taken = step()
            _synchronize(device)
            if taken:
                times[i].append((time.perf_counter() - start) * 1e3)
            else:
                skipped[i] += 1
                _skipped_step_guard(skipped[i], cfg)
    return list(zip(times, warmup_skipped, skipped, strict=True))


def train_throughput(
    cfgs: list[str],
    imgsz: int = 320,
    batch: int = 8,
    steps: int = 10,
    nc: int = 80,
    device: str | torch.device = "cpu",
    amp: bool | None = None,
) -> list[TrainThroughput]:
    """Training throughput of each model on the same fixed batch, steps interleaved model by model.

    ``amp`` (default: on for CUDA, off for the CPU, as Ultralytics trains) makes the step Ultralytics' AMP step:
    FP16 autocast forward and loss, scaled backward. Whether the scaler skips a step depends on the device's FP16
    kernels (on a GPU the first steps after start-up often are), so the timing counts only steps the optimizer took
    and reports the skipped ones (:class:`TrainThroughput`). Data loading is left out on purpose: it is the same for
    every model, and on 2 cores it would blur the difference the models themselves make.
    """
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    device = torch.device(device)
    amp = device.type == "cuda" if amp is None else amp
    models, optimizers, scalers = [], [], []
    stepped = [False for _ in cfgs]
    for i, cfg in enumerate(cfgs):
        model = DetectionModel(cfg, nc=nc, verbose=False).to(device).train()
        model.args = get_cfg()  # loss gains (box, cls, dfl) as the trainer sets them
        models.append(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        optimizer.register_step_post_hook(lambda *_, i=i: stepped.__setitem__(i, True))  # not when the scaler skips
        optimizers.append(optimizer)
        scalers.append(torch.amp.GradScaler(device.type, enabled=amp))
    data = {k: v.to(device) for k, v in _training_batch(batch, imgsz, nc).items()}

    def step(i: int) -> bool:
        stepped[i] = False
        with autocast(device, "fp16" if amp else "fp32"):
            loss, _ = models[i].loss(data)
        optimizers[i].zero_grad()
        scalers[i].scale(loss.sum()).backward()
        scalers[i].step(optimizers[i])
        scalers[i].update()
        return stepped[i]

    with _cudnn_autotuned(device):  # warm-up builds each loss criterion
        measured = _timed_taken_steps([lambda i=i: step(i) for i in range(len(models))], cfgs, steps, device)
    return [
        TrainThroughput(cfg, statistics.median(ms), batch, amp, skipped, warmup_skipped)
        for cfg, (ms, warmup_skipped, skipped) in zip(cfgs, measured, strict=True)
    ]


INT8_BATCHES = (1, 8)
ANCHORS = ("quantize_static", "nncf", "ultralytics")
"""What a user would quantize with instead, timed and scored beside our files: onnxruntime's ``quantize_static``
(:func:`~qarep_det.quant.backends.onnx_int8.quantize_static_default`), NNCF's default ``nncf.quantize``
(:func:`~qarep_det.quant.backends.openvino.nncf_default`) and Ultralytics' ``export format=openvino int8=True``."""
_RUNTIMES = {"openvino": "OpenVINO CPU", "onnxruntime-int8": "onnxruntime CPU", "onnxruntime": "TensorRT"}
_TENSORRT = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


@dataclass(frozen=True)
class TimedModel:
    """One model file of ``benchmark int8``: where it runs, its median ms per batch size, its mAP50-95 on the val
    split when a trained checkpoint was scored, and how many of its convs run on integer kernels."""

    label: str  # "FP32", "INT8 ours (<backend>)" or "INT8 <anchor>"
    runtime: str  # the ratios compare models of one runtime: each INT8 model with the FP32 model there
    path: Path
    int8: bool
    map50_95: float | None = None
    integer_convs: int | None = None
    ms: dict[int, float] = field(default_factory=dict)  # batch size -> median ms per batch


@dataclass(frozen=True)
class Int8Benchmark:
    """Every INT8 artefact against its FP32 twin on one machine, timed interleaved in one run."""

    model: str
    imgsz: int
    threads: int
    runs: int
    calib_images: int
    cpu: CpuInfo
    models: list[TimedModel]
    skipped: dict[str, str]  # an artefact not timed here, and why
    val_images: int | None  # the images every mAP was scored on (None: not scored, random weights)
    overflow_fix: bool = False  # whether our OpenVINO and onnxruntime-int8 files have 7-bit weights (NNCF's fix)
    onednn_cap: str | None = None  # ONEDNN_MAX_CPU_ISA: OpenVINO's kernels held to that ISA (onnxruntime's are not)

    def fp32(self, runtime: str) -> TimedModel:
        return next(m for m in self.models if m.runtime == runtime and not m.int8)


def tensorrt_missing() -> str | None:
    """Why the TensorRT QDQ ONNX cannot be timed here (None: it can, through onnxruntime's TensorRT provider)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    from qarep_det.quant.backends.onnx_qdq import require_onnx

    _, ort = require_onnx()
    if _TENSORRT[0] not in ort.get_available_providers():
        return "onnxruntime has no TensorRT execution provider here (onnxruntime-gpu built with TensorRT)"
    return None


def _runner(model: TimedModel, imgsz: int, threads: int, batch: int | None = None) -> Runner:
    """A runner for ``model`` on its runtime with ``threads`` CPU threads, for ``batch`` images a call (None: any
    number, to score a val split). An OpenVINO IR is reshaped to that static batch: a dynamic one slows its
    FP32 convs more than its INT8 ones (82 against 48 ms at batch 1 on the 2-core VNNI Xeon of docs/int8.md, where
    INT8 took 16.5 against 15.6), which would flatter every INT8 ratio. onnxruntime's threads do not spin-wait after
    a run (``session.intra_op.allow_spinning`` 0): interleaved, a session's spinning threads take the cores from the
    next model's run (on that Xeon they made the FP32 ONNX 87.5 ms and the INT8 file 48.5, against 54.2 and 22.0
    without spinning), so every model but the first would be timed against them."""
    from qarep_det.quant.backends import openvino as qov
    from qarep_det.quant.backends.onnx_qdq import onnx_runner, require_onnx

    if model.runtime == _RUNTIMES["openvino"]:
        ov_model = qov.read_openvino(model.path)
        ov_model.reshape({ov_model.input(0): [batch or -1, 3, imgsz, imgsz]})
        return qov.openvino_runner(ov_model, threads)
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if model.runtime == _RUNTIMES["onnxruntime"]:  # TensorRT builds an INT8 engine from the Q/DQ pairs
        tensorrt = (_TENSORRT[0], {"trt_int8_enable": model.int8})
        return onnx_runner(model.path, options, providers=(tensorrt, _TENSORRT[1]))
    return onnx_runner(model.path, options)


def _integer_convs(model: TimedModel) -> int | None:
    """The convs the runtime runs on integer kernels: OpenVINO's execution graph, onnxruntime's optimized graph."""
    from qarep_det.quant.backends import openvino as qov
    from qarep_det.quant.backends.onnx_int8 import integer_convs

    if model.runtime == _RUNTIMES["openvino"]:
        kernels = qov.conv_kernels(qov.compile_cpu(model.path))
        return sum(n for kernel, n in kernels.items() if kernel.startswith(("u8 ", "i8 ")))
    return integer_convs(model.path) if model.runtime == _RUNTIMES["onnxruntime-int8"] else None


def _ultralytics_openvino_int8(weights: Path, data: Path, imgsz: int, out: Path) -> Path:
    """Ultralytics' own ``export format=openvino int8=True`` of a copy of ``weights`` in ``out`` (its folder
    beside the checkpoint would be ``export --int8``'s). ``split=train``: calibrated on the train split as ours is;
    Ultralytics' default, the val split, would calibrate on the images both are scored on."""
    from ultralytics import YOLO

    copy = out / f"{weights.stem}_ultralytics.pt"
    shutil.copyfile(weights, copy)
    folder = YOLO(str(copy)).export(
        format="openvino", int8=True, data=str(data), imgsz=imgsz, split="train", device="cpu"
    )
    return next(Path(folder).glob("*.xml"))


def _anchor(
    anchor: str,
    *,
    fp32: dict[str, Path],
    job_stem: Path,
    calib: CalibrationSet,
    weights: Path | None,
    data: Path,
    imgsz: int,
) -> TimedModel:
    """The anchor's file, made from the same FP32 model (or checkpoint) and calibration images as ours."""
    from qarep_det.quant.backends import openvino as qov
    from qarep_det.quant.backends.onnx_int8 import quantize_static_default

    path = job_stem.with_name(f"{job_stem.name}_int8_{anchor}")
    if anchor == "quantize_static":
        onnx = quantize_static_default(fp32["onnxruntime-int8"], calib, path.with_suffix(".onnx"))
        return TimedModel("INT8 onnxruntime quantize_static", _RUNTIMES["onnxruntime-int8"], onnx, True)
    if anchor == "nncf":
        int8 = qov.nncf_default(qov.read_openvino(fp32["openvino"]), calib, len(calib.paths))
        xml = qov.save_openvino(int8, path.with_suffix(".xml"), overwrite=True)
        return TimedModel("INT8 NNCF nncf.quantize defaults", _RUNTIMES["openvino"], xml, True)
    xml = _ultralytics_openvino_int8(weights, data, imgsz, job_stem.parent)
    return TimedModel("INT8 Ultralytics export int8=True", _RUNTIMES["openvino"], xml, True)


def int8_benchmark(
    data: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    cfg: str = "yolo_qarep_s.yaml",
    imgsz: int = 640,
    calib_images: int = 512,
    batches: Sequence[int] = INT8_BATCHES,
    runs: int = 20,
    threads: int | None = None,
    anchors: Sequence[str] = (),
    openvino_activations: Sequence[str] = ("signed",),
    overflow_fix: bool | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Int8Benchmark:
    """Every INT8 artefact of ptq-eval's backends against its FP32 twin, timed interleaved at each batch size.

    The models are ptq-eval's own (:func:`qarep_det.pipelines.ptq.backend_jobs` and each backend's quantize step,
    recipe defaults): the openvino backend's NNCF IR beside the FP32 IR on OpenVINO, the onnxruntime-int8 file
    beside the FP32 ONNX on onnxruntime, and, where a CUDA device and onnxruntime's TensorRT provider exist, the QDQ
    ONNX for TensorRT beside the FP32 ONNX there (else :attr:`Int8Benchmark.skipped` says why). ``anchors``
    (:data:`ANCHORS`) adds what a user would use instead, from the same FP32 model and calibration images.
    ``openvino_activations``: the openvino backend's IR on each of these activation grids (ptq-eval's
    ``--openvino-activations``: ``signed``, ``asymmetric``), calibrated alike. ``overflow_fix``: ptq-eval's, for our
    OpenVINO and onnxruntime-int8 files (None: as this CPU, or ``ONEDNN_MAX_CPU_ISA``, needs).

    ``weights``: a trained checkpoint, whose models are all scored by ptq-eval's pipeline (its rows; the anchors by
    the same prediction and pycocotools code) on ``data``'s val split; without it ``cfg``'s random weights are
    timed only (latency does not depend on training). Every model runs with ``threads`` CPU threads (default:
    torch's), all of them interleaved run by run (:func:`interleaved_ms`) at each of ``batches``. Files go to
    ``out_dir`` (default: a temporary folder).
    """
    if unknown := [a for a in anchors if a not in ANCHORS]:
        raise InputError(f"unknown anchor {unknown[0]!r}; choose from {', '.join(ANCHORS)}", field="anchors")
    if unknown := [a for a in openvino_activations if a not in OPENVINO_ACTIVATIONS] or not openvino_activations:
        raise InputError(
            f"openvino activations must be among {', '.join(OPENVINO_ACTIVATIONS)}, got {unknown or 'none'}",
            field="openvino_activations",
        )
    if "ultralytics" in anchors and weights is None:
        raise InputError("the ultralytics anchor exports a checkpoint: give weights", field="anchors")
    for name, value in (("runs", runs), ("threads", threads or 1), *(("batches", b) for b in batches)):
        check_count(name, value)
    threads = threads or torch.get_num_threads()
    skipped = {}
    if reason := tensorrt_missing():
        skipped["INT8 QDQ ONNX for TensorRT"] = reason
    backends = ("openvino",) * ("signed" in openvino_activations) + ("onnxruntime-int8",)
    backends += () if skipped else ("onnxruntime",)
    settings = PTQSettings(
        Path(data),
        recipe=QuantRecipe(calib_images=calib_images),
        backends=backends,
        imgsz=imgsz,
        save_int8=True,
        overwrite=True,
        overflow_fix=overflow_fix,
    )
    if weights is not None:
        checkpoint = load_checked(checkpoint_paths([weights])[0], settings)
        ground_truth = load_ground_truth(settings.data)
    else:
        find_model_yaml(cfg)
        checkpoint = FusedCheckpoint(Path(cfg), reparameterize_model(DetectionModel(cfg, verbose=False)), None)
    calib, _ = calibration_and_tuning(settings, (), progress)
    with contextlib.ExitStack() as stack:
        out = Path(out_dir) if out_dir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qarep_")))
        out.mkdir(parents=True, exist_ok=True)
        stem = out / checkpoint.name
        runs_of = [(settings, out, "")]
        if "asymmetric" in openvino_activations:  # its own folder: its files are named as the signed run's
            asymmetric = replace(settings, backends=("openvino",), asymmetric_activations=True)
            runs_of.append((asymmetric, out / "asymmetric", ", asymmetric"))
        files = []
        for run_settings, run_out, grid in runs_of:
            run_out.mkdir(exist_ok=True)
            if weights is not None:  # ptq-eval's rows: the files and their scores
                rows = evaluate_checkpoint(
                    checkpoint, run_settings, out_dir=run_out, ground_truth=ground_truth, calib=calib, progress=progress
                )
                files += [(r.backend, grid, r.fp32_file, r.int8_file, r.fp32_backend_map50_95, r.int8_map50_95)
                          for r in rows]  # fmt: skip
            else:  # random weights: the files only
                run_stem = run_out / checkpoint.name
                jobs = backend_jobs(checkpoint, run_settings, calib, stem=run_stem, scratch=run_out, progress=progress)
                quantized = [(backend, BACKENDS[backend].quantize(job)) for backend, job, _ in jobs]
                files += [(backend, grid, q.fp32_file, q.int8_file, None, None) for backend, q in quantized]
        models, fp32 = [], {}
        for backend, grid, fp32_file, int8_file, fp32_map, int8_map in files:
            runtime = _RUNTIMES[backend]
            if backend not in fp32:  # one FP32 twin per runtime
                fp32[backend] = Path(fp32_file)
                models.append(TimedModel("FP32", runtime, fp32[backend], False, fp32_map))
            models.append(TimedModel(f"INT8 ours ({backend}{grid})", runtime, Path(int8_file), True, int8_map))
        for anchor in anchors:
            model = _anchor(
                anchor,
                fp32=fp32,
                job_stem=stem,
                calib=calib,
                weights=weights and Path(weights),
                data=settings.data,
                imgsz=imgsz,
            )
            if weights is not None:
                scored = evaluate_runner(
                    _runner(model, imgsz, threads),
                    ground_truth,
                    out / f"{model.path.stem}.json",
                    protocol=settings.protocol,
                    batch=settings.batch,
                    progress=progress,
                )
                model = replace(model, map50_95=scored["map50_95"])
            models.append(model)
        models = [replace(m, integer_convs=_integer_convs(m)) for m in models]
        models.sort(key=lambda m: (list(_RUNTIMES.values()).index(m.runtime), m.int8))
        for batch in batches:
            runners = [_runner(m, imgsz, threads, batch) for m in models]
            x = torch.rand(batch, 3, imgsz, imgsz)
            for model, ms in zip(models, interleaved_ms([lambda r=r, x=x: r(x) for r in runners], runs), strict=True):
                model.ms[batch] = ms
    return Int8Benchmark(
        model=checkpoint.name,
        imgsz=imgsz,
        threads=threads,
        runs=runs,
        calib_images=len(calib.paths),
        cpu=cpu_info(),
        models=models,
        skipped=skipped,
        val_images=None if weights is None else len(ground_truth.image_files),
        overflow_fix=overflow_fix_on(overflow_fix),
        onednn_cap=onednn_isa_cap(),
    )


@dataclass(frozen=True)
class Consistency:
    """mAP50-95 (percent) of one checkpoint by three routes that must agree."""

    ultralytics_val: float  # Ultralytics' own val (its in-house mAP, 101-point interpolation)
    fused: float  # ptq_eval's FP32 route: fused model, pycocotools
    unfused: float  # same route on the trained (unfused) model


def fp32_consistency(weights: str, data: str, imgsz: int, batch: int = 8) -> Consistency:
    """Evaluate one checkpoint with Ultralytics' val and with our pycocotools route, fused and unfused."""
    from ultralytics import YOLO

    from qarep_det.evaluation.protocol import EvalProtocol
    from qarep_det.quant.runner import torch_runner
    from qarep_det.ultralytics.checkpoint import load_detector

    model = load_detector(weights)  # a missing or bad file fails here, before Ultralytics could try to fetch it
    ground_truth = load_ground_truth(data)
    results = []
    with tempfile.TemporaryDirectory() as tmp:  # Ultralytics' val writes a run folder: keep it out of the user's
        val = YOLO(weights).val(
            data=data, imgsz=imgsz, batch=batch, plots=False, verbose=False, device="cpu", project=tmp, name="val"
        )
        for i, candidate in enumerate((reparameterize_model(model), model)):
            out = Path(tmp) / f"{i}.json"
            metrics = evaluate_runner(
                torch_runner(candidate), ground_truth, out, protocol=EvalProtocol(imgsz=imgsz), batch=batch
            )
            results.append(metrics["map50_95"])
    return Consistency(100.0 * float(val.box.map), *results)
