"""Measured-in-one-run benchmarks: medians and ratios, never single timings (these machines are noisy)."""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel

from qarep_det.reparam import reparameterize_model


def median_ms(fn: Callable[[], object], runs: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``runs`` calls, after ``warmup`` untimed calls."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: torch's profiler backend (Kineto) logs start/stop lines from C++
    straight to it, which no Python logging setting reaches. Only wraps the few profiled forwards."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


OP_GROUPS = ("convolution", "batch_norm", "add")  # what fusion can remove; everything else is "other"


@torch.no_grad()
def op_breakdown(model: torch.nn.Module, x: torch.Tensor, runs: int = 3) -> dict[str, float]:
    """CPU milliseconds per forward spent in convolutions, BatchNorm, adds and everything else (torch profiler).

    Explains a fusion speed-up: fusion removes BN and adds outright but keeps every 3x3 conv, so when convs
    dominate, the speed-up is bounded by the conv work the 1x1 branches add.
    """
    model(x)  # warm-up outside the profile
    with _native_stderr_silenced(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            model(x)
    totals = dict.fromkeys((*OP_GROUPS, "other"), 0.0)
    for event in prof.key_averages():
        group = next((g for g in OP_GROUPS if g in event.key), "other")
        totals[group] += event.self_cpu_time_total / 1e3 / runs
    return totals


@dataclass(frozen=True)
class FusionTiming:
    """Median latency of one detector before and after re-parameterization, measured in the same run."""

    cfg: str
    imgsz: int
    unfused_ms: float
    fused_ms: float
    unfused_ops: dict[str, float]  # op_breakdown of each form, profiled after the timing
    fused_ops: dict[str, float]

    @property
    def speedup(self) -> float:
        return self.unfused_ms / self.fused_ms


@torch.no_grad()
def fusion_latency(cfg: str, imgsz: int = 640, runs: int = 20, nc: int = 80) -> FusionTiming:
    """CPU latency at batch 1 of the model built from ``cfg``, unfused vs fused, interleaved run by run.

    Interleaving (unfused, fused, unfused, ...) spreads any slow-down of the machine over both sides.
    """
    model = DetectionModel(cfg, nc=nc, verbose=False).eval()
    fused = reparameterize_model(model)
    x = torch.rand(1, 3, imgsz, imgsz)
    for m in (model, fused):
        m(x)  # warm-up
    unfused_times, fused_times = [], []
    for _ in range(runs):
        unfused_times.append(median_ms(lambda: model(x), 1, warmup=0))
        fused_times.append(median_ms(lambda: fused(x), 1, warmup=0))
    return FusionTiming(
        cfg,
        imgsz,
        statistics.median(unfused_times),
        statistics.median(fused_times),
        op_breakdown(model, x),
        op_breakdown(fused, x),
    )


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
    """Median training step time (forward, loss, backward, SGD step) of one model; images per second."""

    cfg: str
    step_ms: float
    batch: int

    @property
    def images_per_s(self) -> float:
        return self.batch * 1e3 / self.step_ms


def train_throughput(
    cfgs: list[str], imgsz: int = 320, batch: int = 8, steps: int = 10, nc: int = 80
) -> list[TrainThroughput]:
    """Training throughput of each model on the same fixed batch, steps interleaved model by model.

    Data loading is left out on purpose: it is the same for every model, and on 2 cores it would blur the
    difference the models themselves make.
    """
    models, optimizers = [], []
    for cfg in cfgs:
        model = DetectionModel(cfg, nc=nc, verbose=False).train()
        model.args = get_cfg()  # loss gains (box, cls, dfl) as the trainer sets them
        models.append(model)
        optimizers.append(torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9))
    data = _training_batch(batch, imgsz, nc)

    def step(i: int) -> None:
        loss, _ = models[i].loss(data)
        optimizers[i].zero_grad()
        loss.sum().backward()
        optimizers[i].step()

    for i in range(len(models)):
        step(i)  # warm-up (and builds the loss criterion)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(steps):
        for i in range(len(models)):
            times[i].append(median_ms(lambda i=i: step(i), 1, warmup=0))
    return [TrainThroughput(cfg, statistics.median(t), batch) for cfg, t in zip(cfgs, times, strict=True)]


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
    from qarep_det.eval.ptq import file_size_mb
    from qarep_det.quant import openvino as qov
    from qarep_det.quant.calibration import calibration_set
    from qarep_det.quant.recipe import QuantRecipe

    fused = reparameterize_model(DetectionModel(cfg, verbose=False))
    recipe = QuantRecipe(calib_images=calib_images)
    calib = calibration_set(data, imgsz, calib_images, recipe.seed, batch_size=8)
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
    for run in runners:
        median_ms(lambda run=run: run(x), 1, warmup=2)
    times: list[list[float]] = [[], []]
    for _ in range(runs):
        for i, run in enumerate(runners):
            times[i].append(median_ms(lambda run=run: run(x), 1, warmup=0))
    return OpenVINOInt8(
        cfg,
        imgsz,
        len(calib.paths),
        calib_s,
        statistics.median(times[0]),
        statistics.median(times[1]),
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

    from qarep_det.checkpoint import load_detector
    from qarep_det.eval.coco import load_ground_truth
    from qarep_det.eval.predict import evaluate_runner
    from qarep_det.eval.protocol import EvalProtocol
    from qarep_det.quant.runner import torch_runner

    val = YOLO(weights).val(data=data, imgsz=imgsz, batch=batch, plots=False, verbose=False, device="cpu")
    model = load_detector(weights)
    ground_truth = load_ground_truth(data)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, candidate in enumerate((reparameterize_model(model), model)):
            out = Path(tmp) / f"{i}.json"
            metrics = evaluate_runner(torch_runner(candidate), ground_truth, out, EvalProtocol(imgsz=imgsz), batch)
            results.append(metrics["map50_95"])
    return Consistency(100.0 * float(val.box.map), *results)
