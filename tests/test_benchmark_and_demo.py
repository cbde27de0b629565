"""Benchmarks and the demo run end to end at toy sizes, so neither can rot."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qarep_det.cli.benchmark import _print_grid_fusion
from qarep_det.cli.demo import DemoSettings, run_demo
from qarep_det.data.synthetic import make_dataset
from qarep_det.eval.benchmark import fusion_latency, interleaved_ms, median_ms, openvino_int8, train_throughput

ROOT = Path(__file__).resolve().parents[1]
N_YAMLS = [str(ROOT / f"model_yamls/yolo_{family}_n.yaml") for family in ("qarep", "repvgg")]
TOOL = str(ROOT / "tools/benchmark.py")


def test_median_ms_is_the_median_of_the_timed_runs() -> None:
    """Two warm-up calls of 300 ms (not timed), then runs of 10, 10 and 100 ms: the median is 10 ms, where a mean
    (40 ms), a maximum or a sum would be far off."""
    durations = iter([0.3, 0.3, 0.01, 0.01, 0.1])
    assert 9.5 <= median_ms(lambda: time.sleep(next(durations)), runs=3, warmup=2) < 35


def test_interleaved_ms_alternates_and_waits_for_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, syncs = [], []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: syncs.append(device))
    times = interleaved_ms([lambda: calls.append("a"), lambda: calls.append("b")], runs=2, warmup=1)
    assert len(times) == 2 and calls == ["a", "b", "a", "b", "a", "b"] and syncs == []
    median_ms(lambda: None, runs=2, warmup=0, device="cuda:0")  # CUDA: the clock stops after the GPU is done
    assert syncs == [torch.device("cuda:0")] * 4


def test_fusion_latency_measures_both_models() -> None:
    (timing,) = fusion_latency(N_YAMLS[0], imgsz=64, runs=1)
    assert (timing.batch, timing.precision, timing.device, timing.limit_ms) == (1, "fp32", "cpu", None)
    assert timing.unfused_ms > 0 and timing.fused_ms > 0 and timing.speedup > 0
    assert set(timing.unfused_ops) == set(timing.fused_ops) == {"convolution", "batch_norm", "add", "other"}
    assert timing.unfused_ops["batch_norm"] > 0 and timing.unfused_ops["add"] > 0
    assert timing.fused_ops["batch_norm"] == 0  # every BN folded; adds remain only in the head's decode


def test_fusion_grid_with_plain_conv_limit_as_on_cuda(capsys: pytest.CaptureFixture) -> None:
    """The CUDA path's grid (precisions x batches) and limit model, run on the CPU at toy size."""
    grid = (("fp32", 1), ("fp16", 2))
    timings = fusion_latency(N_YAMLS[0], imgsz=64, runs=1, grid=grid, limit_cfg="yolov6n.yaml")
    assert [(t.precision, t.batch) for t in timings] == list(grid)
    assert all(t.limit_ms > 0 and t.fused_images_per_s > 0 for t in timings)
    _print_grid_fusion(timings, "test CPU", 1, "yolov6n.yaml")
    rows = capsys.readouterr().out.splitlines()
    assert "test CPU" in rows[0] and "fused/limit" in rows[1]
    assert [row.split()[:2] for row in rows[2:]] == [["fp32", "1"], ["fp16", "2"]]


def test_train_throughput_reports_each_model() -> None:
    results = train_throughput(N_YAMLS, imgsz=64, batch=2, steps=1)
    assert [r.cfg for r in results] == N_YAMLS
    assert all(r.images_per_s > 0 and not r.amp for r in results)
    (amp,) = train_throughput(N_YAMLS[:1], imgsz=64, batch=2, steps=1, amp=True)  # the CUDA step, on the CPU
    assert amp.amp and amp.images_per_s > 0


def test_openvino_int8_benchmark_reports_latency_size_and_calibration(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    data = make_dataset(tmp_path / "data", n_train=4, n_val=1, imgsz=64, seed=0)
    r = openvino_int8(N_YAMLS[0], str(data), imgsz=64, calib_images=4, runs=1)
    assert r.calib_images == 4 and r.calib_s > 0 and r.fp32_ms > 0 and r.int8_ms > 0
    assert r.int8_mb < 0.5 * r.fp32_mb  # int8 weights: about a quarter of the FP32 IR
    assert sum(r.int8_kernels.values()) == sum(r.fp32_kernels.values()) > 0
    assert any(kernel.startswith(("u8 ", "i8 ")) for kernel in r.int8_kernels)


def test_benchmark_cli_help_and_bad_input() -> None:
    assert "fusion" in subprocess.run([sys.executable, TOOL, "--help"], capture_output=True, text=True).stdout
    for command in ("fusion", "train"):
        usage = subprocess.run([sys.executable, TOOL, command, "--help"], capture_output=True, text=True).stdout
        assert "--device" in usage and "(default: cpu)" in usage
    cases = [(["fusion", "--cfg", "missing.yaml"], "missing.yaml"), (["fusion", "--device", "gpu"], "is not a device")]
    if not torch.cuda.is_available():
        cases += [(["fusion", "--device", "0"], "CUDA is not available"), (["train", "--device", "0"], "CUDA")]
    for args, message in cases:
        result = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_demo_trains_both_families(tmp_path: Path) -> None:
    settings = DemoSettings(train_images=8, val_images=4, imgsz=64, epochs=1, batch=4)
    data, weights = run_demo(tmp_path, settings)
    assert data.is_file()
    assert [w.parent.parent.name for w in weights] == list(settings.models)
    assert all(w.is_file() for w in weights)
