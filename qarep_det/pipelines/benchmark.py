"""The benchmarks of ``benchmark``, measured in one run as medians and ratios, never single timings.

One code path serves the CPU and CUDA: timings wait for the GPU before the clock stops, and FP16 means autocast
(AMP). What differs by device is what is worth measuring: on the CPU batch 1 FP32 plus where the time goes
(:mod:`qarep_det.pipelines.op_profile`), on a GPU a grid of precisions and batches.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel

from qarep_det.errors import InputError
from qarep_det.pipelines.op_profile import op_breakdown
from qarep_det.reparam import reparameterize_model

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


@dataclass(frozen=True)
class OpenVINOInt8:
    """OpenVINO FP32 vs NNCF INT8 of one detector: latency at batch 1, IR sizes, calibration time."""

    cfg: str
    imgsz: int
    calib_images: int
    calib_s: float
    fp32_ms: float
    int8_ms: float
    fp32_mb: float
    int8_mb: float
    fp32_kernels: dict[str, int]  # convolutions per "<precision> <kernel>" in OpenVINO's execution graph
    int8_kernels: dict[str, int]
    vnni: bool  # whether the CPU has an int8 dot-product instruction (INT8 speed depends on it)


def openvino_int8(cfg: str, data: str, imgsz: int = 640, calib_images: int = 512, runs: int = 20) -> OpenVINOInt8:
    """Quantize the fused model built from ``cfg`` with the reference recipe and time both IRs on the CPU.

    Weights are the YAML's initialisation: latency, size and calibration time do not depend on training.
    """
    from qarep_det.quant.backends import openvino as qov
    from qarep_det.quant.backends.base import file_size_mb
    from qarep_det.quant.calibration import calibration_set
    from qarep_det.quant.recipe import QuantRecipe

    fused = reparameterize_model(DetectionModel(cfg, verbose=False))
    recipe = QuantRecipe(calib_images=calib_images)
    calib = calibration_set(data, imgsz, n=calib_images, seed=recipe.seed, batch_size=8)
    fp32 = qov.convert_openvino(fused, imgsz)
    start = time.perf_counter()
    int8 = qov.quantize_openvino(fused, calib, imgsz, recipe, fp32=fp32)
    calib_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        sizes = []
        for name, model in (("fp32", fp32), ("int8", int8)):
            xml = qov.save_openvino(model, Path(tmp) / f"{name}.xml")
            sizes.append(file_size_mb(xml, xml.with_suffix(".bin")))
    compiled = [qov.compile_cpu(model) for model in (fp32, int8)]
    kernels = [dict(qov.conv_kernels(c)) for c in compiled]
    runners = [qov.openvino_runner(c) for c in compiled]
    x = torch.rand(1, 3, imgsz, imgsz)
    times = interleaved_ms([lambda run=run: run(x) for run in runners], runs, warmup=3)
    return OpenVINOInt8(
        cfg,
        imgsz,
        len(calib.paths),
        calib_s,
        *times,
        *sizes,
        *kernels,
        qov.cpu_has_vnni(),
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

    from qarep_det.evaluation.coco import load_ground_truth
    from qarep_det.evaluation.predict import evaluate_runner
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
