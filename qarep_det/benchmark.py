"""Measured-in-one-run benchmarks: medians and ratios, never single timings (these machines are noisy)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
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


@dataclass(frozen=True)
class FusionTiming:
    """Median latency of one detector before and after re-parameterization, measured in the same run."""

    cfg: str
    imgsz: int
    unfused_ms: float
    fused_ms: float

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
    return FusionTiming(cfg, imgsz, statistics.median(unfused_times), statistics.median(fused_times))
