"""Where a forward's CPU time goes, by op group (torch profiler): what explains a fusion speed-up."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


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
