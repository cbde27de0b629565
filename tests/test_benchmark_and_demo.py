"""Benchmarks and the demo run end to end at toy sizes, so neither can rot.

Timings are read from a fake clock that advances with the work done (1 ms per module call, per million parameters an
optimizer steps, ...): each reported figure then has one right value, so a timer that measures the wrong call, a
model timed twice or two figures swapped fail the test, which no "> 0" could.
"""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import results_epochs
from torch.optim.optimizer import register_optimizer_step_post_hook
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils.patches import torch_load

from qarep_det.cli.benchmark import format_fusion_grid
from qarep_det.cli.demo import DemoSettings, run_demo
from qarep_det.data.synthetic import CLASS_NAMES, make_dataset
from qarep_det.pipelines import benchmark
from qarep_det.pipelines.benchmark import fusion_latency, interleaved_ms, median_ms, openvino_int8, train_throughput
from qarep_det.reparam import reparameterize_model

ROOT = Path(__file__).resolve().parents[1]
N_YAMLS = [str(ROOT / f"model_yamls/yolo_{family}_n.yaml") for family in ("qarep", "repvgg")]
TOOL = str(ROOT / "tools/benchmark.py")


class FakeClock:
    """Stands in for ``time.perf_counter`` in the benchmark module; only ``advance`` moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, ms: float) -> None:
        self.now += ms / 1e3


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=fake))
    return fake


@pytest.fixture
def ms_per_module_call(clock: FakeClock) -> Iterator[FakeClock]:
    """Every module's forward takes 1 ms on the fake clock: a model's latency is the number of modules it runs."""
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: clock.advance(1.0))
    yield clock
    handle.remove()


@torch.no_grad()
def module_calls(model: torch.nn.Module, imgsz: int) -> int:
    """Module forwards in one inference of ``model`` (hooks of its own, independent of the benchmark's clock)."""
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: calls.append(1))
    try:
        model.eval()(torch.rand(1, 3, imgsz, imgsz))
    finally:
        handle.remove()
    return len(calls)


def test_median_ms_is_the_median_of_the_timed_runs(clock: FakeClock) -> None:
    """Two warm-up calls of 300 ms (not timed), then runs of 10, 10 and 100 ms: the median is 10 ms, where a mean
    (40 ms), a maximum (100 ms) or a median with the warm-up (100 ms) would differ."""
    durations = iter([300, 300, 10, 10, 100])
    assert median_ms(lambda: clock.advance(next(durations)), runs=3, warmup=2) == pytest.approx(10)
    with pytest.raises(ValueError, match="runs must be >= 1"):
        median_ms(lambda: None, runs=0)


def test_interleaved_ms_alternates_and_waits_for_the_device(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    calls, syncs = [], []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: syncs.append(device))
    durations = {"a": iter([50, 1, 9, 2]), "b": iter([60, 4, 3, 8])}  # one warm-up each, then three timed runs

    def work(name: str) -> None:
        calls.append(name)
        clock.advance(next(durations[name]))

    times = interleaved_ms([lambda: work("a"), lambda: work("b")], runs=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"] and syncs == []
    assert times == pytest.approx([2, 4])  # each function's own median, warm-ups left out
    median_ms(lambda: None, runs=2, warmup=0, device="cuda:0")  # CUDA: the clock stops after the GPU is done
    assert syncs == [torch.device("cuda:0")] * 4


def test_fusion_latency_times_each_form(ms_per_module_call: FakeClock) -> None:
    unfused = DetectionModel(N_YAMLS[0], nc=80, verbose=False)
    expected = [module_calls(m, 64) for m in (unfused, reparameterize_model(unfused))]
    assert expected[0] > expected[1]  # fusion removes modules; else the check below could not tell the forms apart
    (timing,) = fusion_latency(N_YAMLS[0], imgsz=64, runs=1)
    assert (timing.batch, timing.precision, timing.device, timing.limit_ms) == (1, "fp32", "cpu", None)
    assert [timing.unfused_ms, timing.fused_ms] == pytest.approx(expected)
    assert timing.speedup == pytest.approx(expected[0] / expected[1])
    assert set(timing.unfused_ops) == set(timing.fused_ops) == {"convolution", "batch_norm", "add", "other"}
    assert timing.unfused_ops["batch_norm"] > 0 and timing.unfused_ops["add"] > 0
    assert timing.fused_ops["batch_norm"] == 0  # every BN folded; adds remain only in the head's decode


def test_fusion_grid_with_a_limit_model_as_on_cuda(ms_per_module_call: FakeClock) -> None:
    """The CUDA path's grid (precisions x batches) and limit model, run on the CPU at toy size. The limit is yolov8n,
    not the plain-conv yolov6n the tool uses: that one runs as many modules as the fused model, so a swap of the two
    would go unseen."""
    grid = (("fp32", 1), ("fp16", 2))
    unfused = DetectionModel(N_YAMLS[0], nc=80, verbose=False)
    limit = DetectionModel("yolov8n.yaml", nc=80, verbose=False).fuse(verbose=False)
    expected = [module_calls(m, 64) for m in (unfused, reparameterize_model(unfused), limit)]
    assert len(set(expected)) == 3
    timings = fusion_latency(N_YAMLS[0], imgsz=64, runs=1, grid=grid, limit_cfg="yolov8n.yaml")
    assert [(t.precision, t.batch) for t in timings] == list(grid)
    for t in timings:  # a module call costs the same at any batch on the fake clock: throughput scales with batch
        assert [t.unfused_ms, t.fused_ms, t.limit_ms] == pytest.approx(expected)
        assert t.fused_images_per_s == pytest.approx(t.batch * 1e3 / expected[1])
    rows = format_fusion_grid(timings, hardware="test CPU", runs=1, limit="yolov8n.yaml")
    assert "test CPU" in rows[0] and "fused/limit" in rows[1]
    assert [row.split()[:2] for row in rows[2:]] == [["fp32", "1"], ["fp16", "2"]]
    speedups = [float(row.split()[4].rstrip("x")) for row in rows[2:]]  # the speed-up column, as printed
    assert speedups == pytest.approx([expected[0] / expected[1]] * 2, abs=0.01)


def _params_m(cfg: str) -> float:
    return sum(p.numel() for p in DetectionModel(cfg, nc=80, verbose=False).parameters()) / 1e6


@pytest.fixture
def ms_per_optimizer_step(clock: FakeClock) -> Iterator[FakeClock]:
    """An optimizer step over n parameters takes n / 1e6 ms on the fake clock: a step time that is not a full
    training step of that model (forward, backward, optimizer) shows."""
    handle = register_optimizer_step_post_hook(
        lambda optimizer, *_: clock.advance(sum(p.numel() for g in optimizer.param_groups for p in g["params"]) / 1e6)
    )
    yield clock
    handle.remove()


def test_train_throughput_times_a_training_step_of_each_model(ms_per_optimizer_step: FakeClock) -> None:
    results = train_throughput(N_YAMLS, imgsz=64, batch=2, steps=1)
    params = [_params_m(cfg) for cfg in N_YAMLS]
    assert params[0] != params[1]  # QARep drops BN parameters RepVGG has: the models are told apart
    assert [r.cfg for r in results] == N_YAMLS and not any(r.amp for r in results)
    assert [r.step_ms for r in results] == pytest.approx(params)
    assert [r.images_per_s for r in results] == pytest.approx([2e3 / p for p in params])
    assert [(r.skipped, r.warmup_skipped) for r in results] == [(0, 0), (0, 0)]


class ScriptedScaler:
    """AMP's gradient scaler with its decisions scripted, so the test does not depend on whether this CPU's FP16
    kernels overflow: each ``step`` follows the next entry of its script ("skip": no optimizer step, but 1000 ms on
    the fake clock, so a skipped step that were timed would move the median; "take": the optimizer steps)."""

    scripts: list[list[str]] = []
    clock = FakeClock()

    def __init__(self, device: str, enabled: bool) -> None:
        assert enabled  # only the AMP path builds one here
        self.script = iter(self.scripts.pop(0))

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if next(self.script) == "take":
            optimizer.step()
        else:
            self.clock.advance(1000)

    def update(self) -> None:
        pass


def test_amp_train_throughput_times_only_the_steps_the_optimizer_took(
    ms_per_optimizer_step: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first model's scaler skips twice before it settles and twice more while timed, the second's once while
    timed: each median is that model's optimizer step alone, and the skips are counted where they happened."""
    monkeypatch.setattr(ScriptedScaler, "clock", ms_per_optimizer_step)
    monkeypatch.setattr(
        ScriptedScaler,
        "scripts",
        [["skip", "skip", "take", "take", "skip", "skip", "take", "take"], ["take", "skip", "take", "take", "take"]],
    )
    monkeypatch.setattr(torch.amp, "GradScaler", ScriptedScaler)
    results = train_throughput(N_YAMLS, imgsz=64, batch=2, steps=3, amp=True)
    assert [r.step_ms for r in results] == pytest.approx([_params_m(cfg) for cfg in N_YAMLS])
    assert [(r.amp, r.warmup_skipped, r.skipped) for r in results] == [(True, 2, 2), (True, 0, 1)]
    with pytest.raises(ValueError, match="steps must be >= 1"):
        train_throughput(N_YAMLS, imgsz=64, batch=2, steps=0)


def test_amp_train_throughput_refuses_a_scaler_that_never_settles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ScriptedScaler, "clock", FakeClock())
    monkeypatch.setattr(ScriptedScaler, "scripts", [["skip"] * (benchmark.MAX_SKIPPED_STEPS + 1)])
    monkeypatch.setattr(torch.amp, "GradScaler", ScriptedScaler)
    limit = benchmark.MAX_SKIPPED_STEPS + 1
    with pytest.raises(benchmark.ScalerNeverSettled, match=rf"skipped {limit} optimizer steps.*without AMP"):
        train_throughput(N_YAMLS[:1], imgsz=64, batch=2, steps=1, amp=True)


def test_openvino_int8_benchmark_reports_latency_size_and_calibration(
    clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the fake clock NNCF's quantization takes 7 s, an FP32 inference 5 ms and an INT8 one 3 ms (told apart by
    their kernels): each figure must come from its own step."""
    qov = pytest.importorskip("qarep_det.quant.backends.openvino")
    pytest.importorskip("openvino")
    quantize, runner = qov.quantize_openvino, qov.openvino_runner

    def timed_quantize(*args, **kwargs):
        clock.advance(7e3)
        return quantize(*args, **kwargs)

    def timed_runner(compiled):
        run, ms = runner(compiled), 3.0 if any(k[:3] in ("u8 ", "i8 ") for k in qov.conv_kernels(compiled)) else 5.0
        return lambda x: clock.advance(ms) or run(x)

    monkeypatch.setattr(qov, "quantize_openvino", timed_quantize)
    monkeypatch.setattr(qov, "openvino_runner", timed_runner)
    data = make_dataset(tmp_path / "data", n_train=4, n_val=1, imgsz=64, seed=0)
    r = openvino_int8(N_YAMLS[0], str(data), imgsz=64, calib_images=4, runs=1)
    assert r.calib_images == 4
    assert (r.calib_s, r.fp32_ms, r.int8_ms) == pytest.approx((7.0, 5.0, 3.0))
    assert r.int8_mb < 0.5 * r.fp32_mb  # int8 weights: about a quarter of the FP32 IR
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in reparameterize_model(DetectionModel(N_YAMLS[0])).modules())
    assert sum(r.int8_kernels.values()) == sum(r.fp32_kernels.values()) == convs
    assert any(kernel.startswith(("u8 ", "i8 ")) for kernel in r.int8_kernels)
    assert not any(kernel.startswith(("u8 ", "i8 ")) for kernel in r.fp32_kernels)


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
    """What the demo wrote: its dataset, one run per model with its own log, each checkpoint the model its YAML
    names, trained on that dataset with the settings given."""
    settings = DemoSettings(train_images=8, val_images=4, imgsz=64, epochs=1, batch=4)
    data, weights = run_demo(tmp_path, settings)
    assert data == tmp_path / "data" / "data.yaml" and data.is_file()
    assert len(list((tmp_path / "data" / "images" / "train").iterdir())) == settings.train_images
    assert [w.parent.parent.name for w in weights] == list(settings.models)
    for name, w, block in zip(settings.models, weights, ("QARepBlock", "RepVGGBlock"), strict=True):
        assert "Epoch" in (tmp_path / "train" / f"{name}.log").read_text()  # the run's console went to its log
        assert results_epochs(w.parent.parent) == [settings.epochs]
        checkpoint = torch_load(w, map_location="cpu")
        model, args = checkpoint["model"], checkpoint["train_args"]
        assert type(model.model[0]).__name__ == block and model.nc == len(CLASS_NAMES)
        assert (args["data"], args["imgsz"], args["batch"], args["optimizer"]) == (
            str(data),
            settings.imgsz,
            settings.batch,
            settings.optimizer,
        )
