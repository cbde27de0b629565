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
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import results_epochs
from torch.optim.optimizer import register_optimizer_step_post_hook
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils.patches import torch_load

from qarep_det.cli import benchmark as cli_benchmark
from qarep_det.cli.benchmark import format_fusion_grid
from qarep_det.cli.demo import DemoSettings, run_demo
from qarep_det.cli.main import main as qarep_det_main
from qarep_det.data.synthetic import CLASS_NAMES, make_dataset
from qarep_det.device import cpu_info
from qarep_det.errors import InputError
from qarep_det.pipelines import benchmark
from qarep_det.pipelines.benchmark import (
    ANCHORS,
    Int8Benchmark,
    TimedModel,
    fusion_latency,
    int8_benchmark,
    interleaved_ms,
    median_ms,
    train_throughput,
)
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.scope import float_conv_names
from qarep_det.reparam import reparameterize_model
from qarep_det.ultralytics.checkpoint import load_fused

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


@pytest.fixture(scope="module")
def int8_bench(known_answer, tmp_path_factory: pytest.TempPathFactory) -> Int8Benchmark:
    """``benchmark int8`` on the self-labelled detector with every anchor, one batch size, one run, on a fake clock on
    which each model takes its own time (:func:`fake_ms`)."""
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("modelopt")
    out = tmp_path_factory.mktemp("int8_bench")
    weights = out / "clean.pt"
    weights.write_bytes(known_answer.clean.read_bytes())
    runner, clock = benchmark._runner, FakeClock()

    def timed_runner(model: TimedModel, imgsz: int, threads: int, batch: int | None = None):
        run = runner(model, imgsz, threads, batch)
        return lambda x: clock.advance(fake_ms(model)) or run(x)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=clock))
        patch.setattr(benchmark, "_runner", timed_runner)
        return int8_benchmark(
            known_answer.data,
            weights=weights,
            imgsz=known_answer.imgsz,
            calib_images=8,
            batches=(2,),
            runs=1,
            threads=1,
            anchors=ANCHORS,
            openvino_activations=("signed", "asymmetric"),
            out_dir=out,
            progress=False,
        )


def fake_ms(model: TimedModel) -> float:
    """A time of each model's own on the fake clock: its label's length, plus 100 ms on onnxruntime."""
    return len(model.label) + 100.0 * (model.runtime == "onnxruntime CPU")


def test_int8_benchmark_times_each_int8_file_beside_its_fp32_twin(int8_bench: Int8Benchmark, known_answer) -> None:
    r = int8_bench
    assert [(m.runtime, m.label) for m in r.models] == [
        ("OpenVINO CPU", "FP32"),
        ("OpenVINO CPU", "INT8 ours (openvino)"),
        ("OpenVINO CPU", "INT8 ours (openvino, asymmetric)"),
        ("OpenVINO CPU", "INT8 NNCF nncf.quantize defaults"),
        ("OpenVINO CPU", "INT8 Ultralytics export int8=True"),
        ("onnxruntime CPU", "FP32"),
        ("onnxruntime CPU", "INT8 ours (onnxruntime-int8)"),
        ("onnxruntime CPU", "INT8 onnxruntime quantize_static"),
    ]
    # the twins are ptq-eval's own files, named as its rows name them; every file is there
    assert [m.path.name for m in r.models if not m.int8] == ["clean_fp32.xml", "clean_fp32.onnx"]
    assert r.models[1].path.name == "clean_int8.xml" and r.models[6].path.name == "clean_int8_ort.onnx"
    assert r.models[2].path.name == "clean_int8.xml" and r.models[2].path.parent.name == "asymmetric"
    assert all(m.path.is_file() for m in r.models)
    assert all(m.ms == {2: pytest.approx(fake_ms(m))} for m in r.models)  # each median is its own model's
    assert r.fp32("onnxruntime CPU") is r.models[5] and (r.threads, r.runs, r.calib_images) == (1, 1, 8)
    # every file scored on the val split by one pipeline: the two FP32 runtimes agree, no INT8 file is broken
    assert r.val_images == 8
    fp32 = [m.map50_95 for m in r.models if not m.int8]
    assert fp32[0] > 30 and fp32[0] == pytest.approx(fp32[1], abs=0.1)
    scores = {m.label: m.map50_95 for m in r.models if m.int8}
    assert all(
        fp32[0] - 15 < scores[f"INT8 ours ({b})"] < fp32[0] + 5
        for b in ("openvino", "openvino, asymmetric", "onnxruntime-int8")
    ), scores
    assert all(0 < score < fp32[0] + 5 for score in scores.values()), scores
    # ours run every conv the recipe quantizes on integer kernels; the FP32 twins none
    fused = load_fused(known_answer.clean).fused
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in fused.modules())
    quantized = convs - len(float_conv_names(fused, QuantRecipe()))
    assert [m.integer_convs for m in r.models[:3] + r.models[5:7]] == [0, quantized, quantized, 0, quantized]
    assert r.models[7].integer_convs == convs  # quantize_static's U8S8: every conv, the DFL's too (no scope)
    assert r.cpu == cpu_info()
    if not torch.cuda.is_available():
        assert r.skipped == {"INT8 QDQ ONNX for TensorRT": "no CUDA device"}


@pytest.mark.parametrize("cap", [None, "AVX2"])
def test_int8_benchmark_prints_the_isa_every_pair_and_what_it_skipped(
    int8_bench: Int8Benchmark,
    known_answer,
    cap: str | None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench = replace(int8_bench, onednn_cap=cap, overflow_fix=cap is not None)
    monkeypatch.setattr(cli_benchmark, "int8_benchmark", lambda *args, **kwargs: bench)
    assert cli_benchmark.main(["int8", "--data", str(known_answer.data), "--imgsz", "96"]) == 0
    lines = capsys.readouterr().out.splitlines()
    isa = ", ".join(cpu_info().int8_isa)
    assert lines[0].startswith(f"CPU: {cpu_info().name}; ISA: {isa}")
    if cap:  # an ISA cap on OpenVINO's kernels is said, with what it does not reach
        assert lines.pop(1) == "OpenVINO's kernels held to AVX2 by ONEDNN_MAX_CPU_ISA (onnxruntime's are not)"
    assert lines[1].endswith("7-bit (overflow fix on)" if cap else "8-bit")
    assert "1 CPU threads" in lines[2] and "medians of 1 runs" in lines[2] and "on 8 val images" in lines[2]
    assert lines[3].split()[-4:] == ["b2", "ms/img", "vs", "FP32"]
    rows = lines[4 : 4 + len(bench.models)]
    for m, line in zip(bench.models, rows, strict=True):
        assert line.split()[:2] == m.runtime.split() and m.label in line and f"{m.map50_95:.2f}" in line
        assert f"{m.ms[2] / 2:.2f}" in line
        fp32 = bench.fp32(m.runtime)
        assert line.endswith(f"{fp32.ms[2] / m.ms[2]:.2f}x") == m.int8  # the ratio to its own runtime's FP32
    assert lines[4 + len(bench.models) :] == [f"  {what}: skipped, {why}" for what, why in bench.skipped.items()]


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


def test_cpu_info_reads_the_model_name_and_the_int8_isa(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2 avx512f avx512_vnni amx_tile amx_int8\n\n"
        "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n"
    )
    info = cpu_info(cpuinfo)
    assert info.name == "Some Xeon" and info.vnni
    assert info.int8_isa == ["AVX2", "AVX-512F", "AVX512-VNNI", "AMX-INT8"]
    assert not cpu_info(tmp_path / "missing").vnni and cpu_info(tmp_path / "missing").int8_isa == []


def test_int8_benchmark_bad_input_in_one_line_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = str(make_dataset(tmp_path / "data", n_train=2, n_val=1, imgsz=64, seed=0))
    cases = [
        (["--anchors", "ultralytics"], "the ultralytics anchor exports a checkpoint"),
        (["--anchors", "tensorrt"], "invalid choice: 'tensorrt'"),
        (["--openvino-activations", "u8"], "invalid choice: 'u8'"),
        (["--overflow-fix", "maybe"], "invalid choice: 'maybe'"),
        (["--batches", "1", "0"], "--batches must be an integer >= 1"),
        (["--weights", str(tmp_path / "missing.pt")], "missing.pt"),
    ]
    for args, message in cases:
        try:
            status = qarep_det_main(["benchmark", "int8", "--data", data, "--imgsz", "64", *args])
        except SystemExit as e:  # argparse's own errors (an unknown choice)
            status = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], (args, err)
    for grids in ((), ("u8",)):  # the library's own check (the CLI's choices catch these first)
        with pytest.raises(InputError, match="openvino activations must be among signed, asymmetric"):
            int8_benchmark(data, imgsz=64, openvino_activations=grids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing written
