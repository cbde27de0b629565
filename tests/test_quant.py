"""qarep_det.quant: calibration data, the INT8 recipe, the torch / OpenVINO / QDQ-ONNX backends, diagnostics.

Offline and small: a yolov8n-topology DetectionModel (nc=2) at 64 px, calibrated on a handful of generated images.
Its BatchNorms take their statistics from those images before fusion, so activations keep unit scale through the
depth instead of vanishing as they do at random init (where the head biases alone would decide the output).
"""

from __future__ import annotations

import math
import random
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import check_qdq_onnx, int8_summary, qdq_convs
from torch import nn

import qarep_det  # noqa: F401  (offline settings before ultralytics)
from qarep_det.data.images import load_letterboxed
from qarep_det.quant.backends.simulated import conv_quant_states, quantize_torch
from qarep_det.quant.calibration import CalibrationSet, calibration_set, draw_calibration_images
from qarep_det.quant.calibrators import AbsHistogram, entropy_amax, mse_amax, percentile_amax
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.runner import torch_runner
from qarep_det.quant.scope import check_float_layers, detect_heads, quantized_conv_names
from qarep_det.sensitivity.diagnostics import fake_quant_per_channel, max_to_median, sqnr_db, weight_sqnr_db

IMGSZ = 64
NC = 2
# kept float in the partial-quantization tests: a conv inside a C2f (its input comes from a split) and a head conv
# whose input also feeds a quantized conv (model.22.cv3.0.0.conv), where a shared quantizer could sneak in
KEEP = ("model.2.m.0.cv1.conv", "model.22.cv2.0.0.conv")
SHARES_INPUT = "model.22.cv3.0.0.conv"


def _write_image(path: Path, rng: random.Random) -> None:
    """A noisy background with a few filled shapes, at a random size (so letterboxing pads)."""
    h, w = rng.randint(48, 96), rng.randint(48, 96)
    image = np.full((h, w, 3), rng.randint(40, 200), np.uint8)
    image = cv2.add(image, np.random.default_rng(rng.randint(0, 1000)).integers(0, 40, (h, w, 3), dtype=np.uint8))
    for _ in range(3):
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        x, y = rng.randint(0, w - 10), rng.randint(0, h - 10)
        if rng.random() < 0.5:
            cv2.rectangle(image, (x, y), (x + rng.randint(5, 30), y + rng.randint(5, 30)), colour, -1)
        else:
            cv2.circle(image, (x, y), rng.randint(3, 15), colour, -1)
    assert cv2.imwrite(str(path), image)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A YOLO-style dataset: 8 train and 2 val images, data.yaml with an absolute ``path:``."""
    root = tmp_path_factory.mktemp("shapes")
    rng = random.Random(0)
    for split, n in (("train", 8), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        for i in range(n):
            _write_image(root / "images" / split / f"{split}_{i}.jpg", rng)
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: a\n  1: b\n")
    return root / "data.yaml"


@pytest.fixture(scope="module")
def calib(dataset) -> CalibrationSet:
    return calibration_set(dataset, IMGSZ, n=8, seed=0, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def images(calib) -> torch.Tensor:
    return torch.cat(list(calib))


@pytest.fixture(scope="module")
def model(images) -> nn.Module:
    """Fused yolov8n-topology detector whose BatchNorms were fitted to the images (see module docstring)."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    m = DetectionModel("yolov8n.yaml", nc=NC, verbose=False)
    for bn in (b for b in m.modules() if isinstance(b, nn.BatchNorm2d)):
        bn.momentum = 1.0
    for seq in (*m.model[-1].cv2, *m.model[-1].cv3):
        nn.init.zeros_(seq[-1].bias)
    with torch.no_grad():
        m.train()(images)
    return m.eval().fuse()


@pytest.fixture(scope="module")
def qmodel(model, calib) -> nn.Module:
    return quantize_torch(model, calib, QuantRecipe(calib_images=8))


def _conv_inputs(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Max |input| of every Conv2d over ``images``: what the max calibrator must find."""
    seen: dict[str, float] = {}

    def hook(name):
        return lambda _, args: seen.__setitem__(name, max(seen.get(name, 0.0), float(args[0].abs().max())))

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    return seen


def _input_amax(qmodel: nn.Module) -> dict[str, float]:
    """Calibrated input range of every quantized conv."""
    return {
        n: float(m.input_quantizer.amax)
        for n, m in qmodel.named_modules()
        if isinstance(m, nn.Conv2d) and m.input_quantizer.is_enabled
    }


# --- recipe and calibration data -------------------------------------------------------------------------------


def test_recipe_validates_and_describes():
    with pytest.raises(ValueError, match="calib_method"):
        QuantRecipe(calib_method="kl")
    with pytest.raises(ValueError, match="percentile"):
        QuantRecipe(percentile=0)
    assert "head float" in QuantRecipe(quantize_head=False).describe()
    assert QuantRecipe().to_dict()["calib_method"] == "max"


def test_calibration_draw_is_seeded_and_warns_when_short(tmp_path):
    pool = [tmp_path / f"{i}.jpg" for i in range(20)]
    first = draw_calibration_images(pool, 5, seed=3)
    assert first == draw_calibration_images(list(reversed(pool)), 5, seed=3)  # order of listing does not matter
    assert first != draw_calibration_images(pool, 5, seed=4)
    with pytest.warns(UserWarning, match="only 20 are available"):
        everything = draw_calibration_images(pool, 50, seed=0)
    assert sorted(everything) == sorted(pool)
    with pytest.raises(ValueError):
        draw_calibration_images(pool, 0)


def test_calibration_set_uses_train_split_letterboxed_like_evaluation(dataset, calib):
    assert len(calib.paths) == 8 and all(p.parent.name == "train" for p in calib.paths)
    assert calib.paths == calibration_set(dataset, IMGSZ, n=8, seed=0).paths
    batches = list(calib)
    assert [b.shape for b in batches] == [(4, 3, IMGSZ, IMGSZ)] * 2
    assert batches[0].dtype == torch.float32 and 0 <= float(batches[0].min()) and float(batches[0].max()) <= 1
    expected, _, _ = load_letterboxed(calib.paths[0], IMGSZ)
    assert torch.equal(batches[0][0], torch.from_numpy(expected))


def test_unreadable_images_are_skipped_and_none_readable_raises(dataset, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    good = next((dataset.parent / "images" / "train").glob("*.jpg"))
    calib = CalibrationSet((broken, good), IMGSZ, batch_size=4, progress=False)
    assert calib.readable is None  # no pass yet
    with pytest.warns(UserWarning, match="broken.jpg"):
        batches = list(calib)
    assert [b.shape[0] for b in batches] == [1]
    assert calib.readable == 1  # what results report as calibration images
    with pytest.raises(ValueError, match="none of the 1 calibration images"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(CalibrationSet((broken,), IMGSZ, progress=False))


# --- torch backend (ModelOpt) --------------------------------------------------------------------------------


def test_torch_backend_applies_the_reference_scheme(model, qmodel, images):
    states = {s.name: s for s in conv_quant_states(qmodel)}
    (head_name,) = detect_heads(model)
    dfl = f"{head_name}.dfl.conv"
    assert not states[dfl].weight_quantized and not states[dfl].input_quantized
    convs = {n: m for n, m in qmodel.named_modules() if isinstance(m, nn.Conv2d) and n != dfl}
    assert convs.keys() == states.keys() - {dfl}
    max_inputs = _conv_inputs(model, images)
    for name, conv in convs.items():
        s = states[name]
        assert s.weight_quantized and s.input_quantized and s.symmetric and s.num_bits == 8
        assert s.weight_axis == 0 and s.weight_scales == conv.out_channels  # per-output-channel weights
        assert s.input_scales == 1  # one per-tensor scale per conv input
        # the weight grid is symmetric per-channel max/127, and the input range is the calibration max
        assert torch.equal(conv.weight_quantizer(conv.weight), fake_quant_per_channel(conv.weight))
        assert float(conv.input_quantizer.amax) == pytest.approx(max_inputs[name], rel=1e-5)


def test_torch_backend_quantizes_but_keeps_output_close(model, qmodel, images):
    assert not any(hasattr(m, "input_quantizer") for m in model.modules())  # the input model is untouched
    reference, quantized = torch_runner(model)(images), torch_runner(qmodel)(images)
    assert quantized.shape == reference.shape == (len(images), 4 + NC, sum((IMGSZ // s) ** 2 for s in (8, 16, 32)))
    assert not torch.equal(quantized, reference)
    assert sqnr_db(reference, quantized) > 15


def test_quantize_head_false_keeps_detect_float(model, calib):
    qhead = quantize_torch(model, calib, QuantRecipe(quantize_head=False))
    (head_name,) = detect_heads(qhead)
    for s in conv_quant_states(qhead):
        in_head = s.name.startswith(f"{head_name}.")
        assert (s.weight_quantized and s.input_quantized) != in_head, s.name


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_histogram_calibration_methods_clip_the_max_ranges(model, qmodel, calib, images, method):
    """Each histogram method narrows the max calibrator's input ranges, never widens them, and narrows most of them
    (measured: percentile 38 of 63 convs below 0.999 of max, mse 62, entropy 60): a histogram pass that never ran
    would leave every range at max."""
    q = quantize_torch(model, calib, QuantRecipe(calib_method=method))
    by_max, ranges = _input_amax(qmodel), _input_amax(q)
    assert ranges.keys() == by_max.keys()
    ratios = [ranges[name] / by_max[name] for name in by_max]
    assert all(0 < r <= 1 + 1e-6 for r in ratios)
    assert sum(r < 0.999 for r in ratios) > len(ratios) // 2
    assert sqnr_db(torch_runner(model)(images), torch_runner(q)(images)) > 10


def test_histogram_calibration_needs_reiterable_batches(model, images):
    with pytest.raises(ValueError, match="re-iterable|walks the batches twice"):
        quantize_torch(model, (b for b in [images]), QuantRecipe(calib_method="mse"))


def _entropy_reference(counts: np.ndarray, edges: np.ndarray, levels: int = 128, start: int = 128) -> float:
    """A plain loop over candidates: KL(P || Q) as TensorRT / pytorch-quantization define it."""
    counts = counts.astype(np.float64).copy()
    counts[0] = counts[1]
    best, best_kl = None, math.inf
    for end in range(start, len(counts) + 1):
        p = counts[:end].copy()
        p[-1] += counts[end:].sum()
        group = np.arange(end) * levels // end
        q = np.zeros(end)
        for g in range(levels):
            members = (group == g) & (counts[:end] > 0)
            if members.any():
                q[members] = counts[:end][members].sum() / members.sum()
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        kl = math.inf if np.any(q[mask] == 0) else float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
        if kl <= best_kl:
            best, best_kl = end, kl
    return float(edges[best])


def test_histogram_calibrators_match_references():
    torch.manual_seed(0)
    data = torch.cat([torch.randn(20000).abs() ** 2, torch.zeros(5000)])
    hist = AbsHistogram(float(data.max()), bins=512)
    hist.collect(data)
    assert entropy_amax(hist, start_bin=128) == pytest.approx(
        _entropy_reference(hist.counts.numpy(), hist.edges.numpy()), rel=1e-9
    )

    def error(amax: float) -> float:
        return float(((fake_quant_scalar(data, amax) - data) ** 2).mean())

    brute = min(error(a) for a in hist.edges[1:].tolist())
    assert error(mse_amax(hist)) <= brute * 1.02  # optimal on bin centres is near-optimal on the samples
    assert percentile_amax(hist, 99.0) == pytest.approx(float(torch.quantile(data, 0.99)), rel=0.02)


def fake_quant_scalar(x: torch.Tensor, amax: float) -> torch.Tensor:
    return torch.clamp(torch.round(x / (amax / 127)), -128, 127) * (amax / 127)


# --- partial quantization: convs kept float ------------------------------------------------------------------


@pytest.fixture(scope="module")
def partial_recipe() -> QuantRecipe:
    return QuantRecipe(calib_images=8, float_layers=KEEP)


def test_float_layers_are_validated_with_the_closest_names(model):
    with pytest.raises(ValueError, match="twice"):
        QuantRecipe(float_layers=(KEEP[0], KEEP[0]))
    check_float_layers(model, QuantRecipe(float_layers=KEEP))
    with pytest.raises(ValueError, match=r"'model\.2\.m\.0\.cv1' \(closest: model\.2\.m\.0\.cv1\.conv") as err:
        check_float_layers(model, QuantRecipe(float_layers=("model.2.m.0.cv1", "model.22.dfl.conv")))
    assert "'model.22.dfl.conv'" in str(err.value)  # float anyway, so not a quantized conv: refused too
    with pytest.raises(ValueError, match="model.22.cv2.0.0.conv"):  # float already when the head stays float
        check_float_layers(model, QuantRecipe(quantize_head=False, float_layers=KEEP))
    recipe = QuantRecipe(float_layers=KEEP)
    assert f"2 convs kept float ({', '.join(KEEP)})" in recipe.describe()
    assert recipe.to_dict()["float_layers"] == KEEP
    assert set(KEEP).isdisjoint(quantized_conv_names(model, recipe))


def test_float_layers_stay_float_in_torch_and_in_the_qdq_onnx(model, calib, partial_recipe, tmp_path):
    qpartial = quantize_torch(model, calib, partial_recipe)  # verify_scheme checks every other conv
    states = {s.name: s for s in conv_quant_states(qpartial)}
    for name in KEEP:
        assert not states[name].weight_quantized and not states[name].input_quantized, name
    assert states[SHARES_INPUT].weight_quantized and states[SHARES_INPUT].input_quantized
    assert sum(s.weight_quantized for s in states.values()) == len(states) - 1 - len(KEEP)  # 1: the DFL
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from qarep_det.quant.backends.onnx_qdq import export_qdq_onnx

    convs = qdq_convs(export_qdq_onnx(qpartial, tmp_path / "partial_qdq.onnx", IMGSZ))
    for name in KEEP:
        assert convs[name] == (None, None), name
    assert all(q is not None for q in convs[SHARES_INPUT])


def test_float_layers_get_no_fake_quantize_in_openvino(model, calib, partial_recipe):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from qarep_det.quant.backends import openvino as qov

    ops = qov.conv_ops_by_module(qov.quantize_openvino(model, calib, IMGSZ, partial_recipe))
    for name in KEEP:
        assert not _quantizers_above(ops[name][0].input_value(0).get_node()), name
        assert ops[name][0].input_value(1).get_node().get_type_name() == "Constant", name  # float weights
    assert _quantizers_above(ops[SHARES_INPUT][0].input_value(0).get_node())


# --- OpenVINO backend (NNCF) ---------------------------------------------------------------------------------


def test_openvino_backend_is_int8_and_matches_the_simulated_ranges(model, qmodel, calib, images, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from qarep_det.quant.backends import openvino as qov

    ov_model = qov.quantize_openvino(model, calib, IMGSZ, QuantRecipe(calib_images=8))
    summary = int8_summary(ov_model)
    n_quantized = sum(s.weight_quantized for s in conv_quant_states(qmodel))
    assert summary["fake_quantize"] > 0 and summary["int8_weights"] == n_quantized
    assert summary["weight_levels"] == (127 if qov.cpu_has_vnni() else 64)
    # every quantized conv's input is quantized with the simulated model's range (max calibration): by a
    # FakeQuantize right above it, or, above a Concat / MaxPool / Upsample, by one on each of their inputs
    amax = _input_amax(qmodel)
    checked = set()
    for name, ops in qov.conv_ops_by_module(ov_model).items():
        quantizers = _quantizers_above(ops[0].input_value(0).get_node())
        if not quantizers:
            assert name.endswith("dfl.conv"), name
            continue
        for source in quantizers:
            high = float(np.max(source.input_value(2).get_node().get_data()))
            low = float(np.min(source.input_value(1).get_node().get_data()))
            assert high == pytest.approx(amax[name], rel=1e-4) and low == pytest.approx(-high * 128 / 127, rel=1e-4)
        checked.add(name)
    assert len(checked) == n_quantized
    # outputs: the two INT8 models differ by a weight bit on CPUs without VNNI, and rounding-boundary flips cascade
    # through the depth, so they agree about as well as each agrees with FP32 (not bit for bit)
    reference, simulated = torch_runner(model)(images), torch_runner(qmodel)(images)
    run = qov.openvino_runner(ov_model)
    real = run(images)
    assert real.shape == simulated.shape
    assert sqnr_db(simulated, real) > min(15.0, sqnr_db(reference, simulated) - 6)
    # saving never overwrites unless asked; the saved IR runs the same
    xml = qov.save_openvino(ov_model, tmp_path / "int8.xml")
    with pytest.raises(FileExistsError):
        qov.save_openvino(ov_model, xml)
    qov.save_openvino(ov_model, xml, overwrite=True)
    assert torch.allclose(qov.openvino_runner(xml)(images), real, atol=1e-4)
    assert "FakeQuantize" in xml.read_text()


def _quantizers_above(node) -> list:
    """The FakeQuantize ops that quantize ``node``'s output: itself, or those above a Concat / MaxPool / Interpolate
    on every input path ([] if a path has none)."""
    if node.get_type_name() == "FakeQuantize":
        return [node]
    if node.get_type_name() not in ("Concat", "MaxPool", "Interpolate"):
        return []
    inputs = range(node.get_input_size()) if node.get_type_name() == "Concat" else range(1)
    found = [_quantizers_above(node.input_value(i).get_node()) for i in inputs]
    return [q for qs in found for q in qs] if all(found) else []


def test_quantizers_moved_above_concat_pool_and_upsample_change_no_output(
    model, calib, images, monkeypatch: pytest.MonkeyPatch
):
    """The IR as NNCF leaves it quantizes after each Concat (the C2f's, the neck's, the SPPF's); moved onto their
    inputs, every output stays the same and OpenVINO runs the max-pool and upsamples before them on 8-bit data."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from qarep_det.quant.backends import openvino as qov
    from qarep_det.quant.backends.hoist import hoist_quantizers, quantizers_below_commuting_ops

    with monkeypatch.context() as patch:
        patch.setattr(qov, "hoist_quantizers", lambda ov_model: 0)
        unmoved = qov.quantize_openvino(model, calib, IMGSZ, QuantRecipe(calib_images=8))
    below = quantizers_below_commuting_ops(unmoved)
    assert below >= 5  # 4 C2f concats, the SPPF's, the neck's: quantized after the op
    moved = unmoved.clone()
    assert hoist_quantizers(moved) == below and quantizers_below_commuting_ops(moved) == 0
    assert quantizers_below_commuting_ops(qov.quantize_openvino(model, calib, IMGSZ, QuantRecipe(calib_images=8))) == 0
    before, after = qov.openvino_runner(unmoved)(images), qov.openvino_runner(moved)(images)
    assert torch.equal(before, after)
    precisions = [
        op.get_rt_info()["runtimePrecision"].astype(str)
        for op in qov.compile_cpu(moved).get_runtime_model().get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) in ("Pooling", "Interpolate")
    ]
    assert len(precisions) == 5 and set(precisions) <= {"u8", "i8"}  # the SPPF's 3 pools, 2 upsamples: 8-bit


def _ir_weights(ov_model) -> dict[str, np.ndarray]:
    """Each INT8 conv's weights as the IR computes with them: its weight subgraph (int8 codes, scales) folded."""
    import openvino as ov
    from openvino import opset13

    from qarep_det.quant.backends import openvino as qov

    weights = {}
    for name, (op, *_) in qov.conv_ops_by_module(ov_model).items():
        if _quantizers_above(op.input_value(0).get_node()):
            graph = ov.Model([opset13.result(op.input_value(1))], [])
            weights[name] = ov.Core().compile_model(graph, "CPU")({})[0]
    return weights


@pytest.mark.parametrize("overflow_fix", [True, False])
def test_the_half_range_simulation_is_the_grid_of_nncfs_overflow_fix(model, qmodel, calib, overflow_fix: bool):
    """With the fix on, OpenVINO's weights are ``half_range_weights``' (and not the reference's); with it off, the
    reference's: equal but for rounding ties (a weight at k + 0.5 steps), never more than one step apart."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from qarep_det.quant.backends import openvino as qov
    from qarep_det.quant.backends.simulated import half_range_weights, verify_scheme

    half = half_range_weights(qmodel)
    with pytest.raises(RuntimeError, match="not symmetric int8"):
        verify_scheme(half, QuantRecipe(calib_images=8))
    verify_scheme(qmodel, QuantRecipe(calib_images=8))  # the calibrated model is left as it was
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ir_model = qov.quantize_openvino(model, calib, IMGSZ, QuantRecipe(calib_images=8), overflow_fix=overflow_fix)
    # 8-bit weights on a CPU whose int16 sums they overflow: the scores measured here are not the target CPU's
    warned = [w for w in caught if "overflow fix off on a CPU without" in str(w.message)]
    assert len(warned) == (not overflow_fix and not qov.cpu_has_vnni())
    ir = _ir_weights(ir_model)
    assert len(ir) == sum(s.weight_quantized for s in conv_quant_states(qmodel))
    matched, other = (half, qmodel) if overflow_fix else (qmodel, half)
    off_grid, weights = 0, 0
    with torch.no_grad():
        for name, w_ir in ir.items():
            conv = matched.get_submodule(name)
            step = qmodel.get_submodule(name).weight_quantizer.amax / 127 * (2 if overflow_fix else 1)
            w_sim = conv.weight_quantizer(conv.weight).numpy()
            steps = np.abs(w_ir - w_sim) / step.reshape(-1, *[1] * (w_sim.ndim - 1)).numpy()
            assert steps.max() < 1.001, name
            off_grid += int((steps > 1e-3).sum())
            weights += w_sim.size
            conv = other.get_submodule(name)
            assert not np.allclose(conv.weight_quantizer(conv.weight).numpy(), w_ir, rtol=0, atol=1e-7), name
    assert off_grid < 1e-3 * weights


def test_building_without_the_fix_on_a_cpu_that_needs_it_warns(model, calib, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from qarep_det.quant.backends import openvino as qov

    monkeypatch.setattr(qov, "cpu_has_vnni", lambda: False)
    with pytest.warns(UserWarning, match="not those of the CPU the IR is for"):
        qov.quantize_openvino(model, calib, IMGSZ, QuantRecipe(calib_images=8), overflow_fix=False)
    assert qov.overflow_fix_on(None) and not qov.overflow_fix_on(False)  # auto follows this (posed) CPU


@pytest.mark.parametrize("cap", ["AVX2", "avx512_core", "AVX2_VNNI", "AVX512_CORE_AMX", ""])
def test_an_isa_cap_below_vnni_turns_the_overflow_fix_on(cap: str, monkeypatch: pytest.MonkeyPatch):
    """ONEDNN_MAX_CPU_ISA holds OpenVINO's kernels to an ISA: below VNNI they sum in int16 as an AVX2-only CPU does,
    so auto builds that CPU's IR (7-bit weights)."""
    from qarep_det.device import cpu_info
    from qarep_det.quant.backends import openvino as qov

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    below = cap.upper() in ("AVX2", "AVX512_CORE")
    assert qov.onednn_isa_cap() == (cap.upper() or None)
    assert qov.cpu_has_vnni() == (cpu_info().vnni and not below)
    assert qov.overflow_fix_on(None) == (not cpu_info().vnni or below) and not qov.overflow_fix_on(False)


def test_openvino_reuses_a_given_fp32_ir_and_runs_integer_kernels(model, calib):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from qarep_det.quant.backends import openvino as qov

    fp32 = qov.convert_openvino(model, IMGSZ)
    int8 = qov.quantize_openvino(model, calib, IMGSZ, QuantRecipe(calib_images=8), fp32=fp32)
    assert int8_summary(fp32)["fake_quantize"] == 0  # the caller's IR is left as it was
    summary = int8_summary(int8)
    assert summary["fake_quantize"] > 0 and summary["int8_weights"] > 0
    fp32_kernels, int8_kernels = (qov.conv_kernels(qov.compile_cpu(m)) for m in (fp32, int8))
    assert all(k.startswith("f32 ") for k in fp32_kernels)
    integer = sum(n for k, n in int8_kernels.items() if k.split()[0] in ("u8", "i8"))
    assert integer == summary["int8_weights"]  # every conv with int8 weights runs an integer kernel; DFL stays f32
    assert sum(int8_kernels.values()) == sum(fp32_kernels.values())


def test_openvino_head_float_percentile_and_unsupported_method(model, calib):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    from qarep_det.quant.backends import openvino as qov

    recipe = QuantRecipe(calib_method="percentile", quantize_head=False, calib_images=8)
    ov_model = qov.quantize_openvino(model, calib, IMGSZ, recipe)
    (head_name,) = detect_heads(model)
    for name, ops in qov.conv_ops_by_module(ov_model).items():
        quantized = bool(_quantizers_above(ops[0].input_value(0).get_node()))
        assert quantized != name.startswith(f"{head_name}."), name
    _, advanced = qov.nncf_arguments(model, qov.convert_openvino(model, IMGSZ), QuantRecipe(calib_method="mse"))
    assert advanced.activations_range_estimator_params == RangeEstimatorParametersSet.HISTOGRAM
    with pytest.raises(ValueError, match="entropy"):
        qov.quantize_openvino(model, calib, IMGSZ, QuantRecipe(calib_method="entropy"))


# --- QDQ ONNX for TensorRT ------------------------------------------------------------------------------------


def test_qdq_onnx_export_checks_runs_and_keeps_scales(qmodel, images, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from qarep_det.quant.backends.onnx_qdq import export_qdq_onnx

    path = export_qdq_onnx(qmodel, tmp_path / "int8_qdq.onnx", IMGSZ)
    with pytest.raises(FileExistsError):
        export_qdq_onnx(qmodel, path, IMGSZ)
    convs = qdq_convs(path)
    for name, (input_q, weight_q) in convs.items():
        conv = qmodel.get_submodule(name)
        if not conv.input_quantizer.is_enabled:
            assert input_q is None and weight_q is None and name.endswith("dfl.conv")
            continue
        assert input_q.axis is None and weight_q.axis == 0
        assert input_q.zero_point.dtype == np.int8 and not input_q.zero_point.any() and not weight_q.zero_point.any()
        assert float(input_q.scale) == pytest.approx(float(conv.input_quantizer.amax) / 127, rel=1e-6)
        np.testing.assert_allclose(weight_q.scale, conv.weight_quantizer.amax.flatten().numpy() / 127, rtol=1e-6)
    check = check_qdq_onnx(path, qmodel, images)
    assert check.quantize_nodes == check.dequantize_nodes == 2 * (len(convs) - 1)
    assert math.isfinite(check.max_abs_diff) and check.output_sqnr_db > 15


# --- onnxruntime's own INT8 (integer kernels) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp32_onnx(model, tmp_path_factory) -> Path:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from qarep_det.quant.backends.onnx_qdq import export_qdq_onnx

    return export_qdq_onnx(model, tmp_path_factory.mktemp("ort") / "fp32.onnx", IMGSZ)


@pytest.mark.parametrize("scope", ["all", "head float", "keep float"])
def test_onnxruntime_int8_runs_every_quantized_conv_as_an_integer_conv(model, qmodel, calib, fp32_onnx, tmp_path,
                                                                        scope):  # fmt: skip
    """onnxruntime's CPU provider must fuse exactly the convs of the recipe's scope into QLinearConv (read from the
    graph it saves after its Q/DQ fusion), on the reference's per-channel weight grid; the float ones keep float
    weights."""
    from qarep_det.quant.backends.onnx_int8 import integer_convs, optimized_op_counts, quantize_onnxruntime
    from qarep_det.quant.scope import float_conv_names

    recipe = {"all": QuantRecipe(calib_images=8), "head float": QuantRecipe(calib_images=8, quantize_head=False),
              "keep float": QuantRecipe(calib_images=8, float_layers=KEEP)}[scope]  # fmt: skip
    path = quantize_onnxruntime(model, fp32_onnx, calib, tmp_path / "int8_ort.onnx", recipe)
    with pytest.raises(FileExistsError):
        quantize_onnxruntime(model, fp32_onnx, calib, path, recipe)
    quantized, kept = quantized_conv_names(model, recipe), float_conv_names(model, recipe)
    counts = optimized_op_counts(path)
    assert integer_convs(path) == counts["QLinearConv"] == len(quantized) and counts["Conv"] == len(kept)
    convs = qdq_convs(path)
    assert {name for name, (_, weights) in convs.items() if weights is None} == kept
    for name in quantized:
        inputs, weights = convs[name]
        assert inputs.zero_point.dtype == np.uint8 and inputs.axis is None
        assert weights.zero_point.dtype == np.int8 and not weights.zero_point.any() and weights.axis == 0
        amax = qmodel.get_submodule(name).weight_quantizer.amax.flatten().numpy()  # the reference's per-channel max
        np.testing.assert_allclose(weights.scale, amax / 127, rtol=1e-6)


def test_onnxruntime_int8_is_as_close_to_fp32_as_the_simulation(model, qmodel, calib, images, fp32_onnx, tmp_path):
    """Its own quantization, not the reference's: more quantizers (conv outputs) on finer grids (uint8). So it must
    be quantized (not FP32) yet no noisier than the simulated INT8 by more than 6 dB, twice the error amplitude
    (measured: 26.9 dB against the simulation's 25.8). The file's Q/DQ arithmetic is run unfused (in float), so the
    comparison holds on any CPU: the integer kernels of CPUs without VNNI saturate full 8-bit weights, which is
    ptq_eval's reduce_range decision, not the file's scheme."""
    import onnxruntime as ort

    from qarep_det.quant.backends.onnx_int8 import quantize_onnxruntime
    from qarep_det.quant.backends.onnx_qdq import onnx_runner

    unfused = ort.SessionOptions()
    unfused.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fp32 = torch_runner(model)(images)
    int8 = onnx_runner(quantize_onnxruntime(model, fp32_onnx, calib, tmp_path / "int8_ort.onnx"), unfused)(images)
    simulated_db, ort_db = sqnr_db(fp32, torch_runner(qmodel)(images)), sqnr_db(fp32, int8)
    assert simulated_db - 6 < ort_db < 60
    assert sqnr_db(fp32, onnx_runner(fp32_onnx)(images)) > 100  # the file it starts from is the FP32 model


def test_onnxruntime_int8_refuses_what_it_cannot_calibrate(model, calib, fp32_onnx, tmp_path):
    from qarep_det.quant.backends.onnx_int8 import quantize_onnxruntime

    with pytest.raises(ValueError, match="'entropy' is not available with the onnxruntime-int8"):
        quantize_onnxruntime(model, fp32_onnx, calib, tmp_path / "x.onnx", QuantRecipe(calib_method="entropy"))
    assert not (tmp_path / "x.onnx").exists()


# --- diagnostics ----------------------------------------------------------------------------------------------


def test_diagnostics_expose_identity_style_outliers(model):
    torch.manual_seed(0)
    assert sqnr_db(torch.ones(3), torch.ones(3)) == math.inf
    weight = torch.randn(16, 64, 3, 3) * 0.05
    clean = weight_sqnr_db(weight)
    assert 35 < clean < 50
    spiked = weight.clone()
    spiked[range(16), range(16), 1, 1] = 5.0  # fused identity centre taps, 100x the typical weight
    spiked[2, 2, 1, 1] = 6.0
    ratio, channel = max_to_median(spiked)
    assert channel == 2 and ratio > 100
    assert weight_sqnr_db(spiked) < clean - 10
    convs = [m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and not n.endswith("dfl.conv")]
    assert convs and all(weight_sqnr_db(m.weight) > 20 and max_to_median(m.weight)[0] >= 1 for m in convs)


# --- missing optional packages --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("qarep_det.quant.backends.openvino", "openvino", "qarep_det[openvino]"),
        ("qarep_det.quant.backends.onnx_qdq", "onnxruntime", "qarep_det[onnx]"),
        ("qarep_det.quant.backends.simulated", "modelopt.torch.quantization", "nvidia-modelopt"),
    ],
)
def test_missing_backend_names_the_install(monkeypatch, module, blocked, extra):
    import importlib

    monkeypatch.setitem(sys.modules, blocked, None)  # makes `import blocked` raise ImportError
    backend = importlib.import_module(module)
    require = (
        backend.import_modelopt
        if module.endswith("simulated")
        else backend.require_onnx
        if module.endswith("onnx_qdq")
        else backend.require_openvino
    )
    with pytest.raises(ImportError, match=extra.replace("[", r"\[").replace("]", r"\]")):
        require()


@pytest.mark.parametrize("vnni", [False, True])
def test_converting_a_qdq_onnx_warns_where_openvino_saturates_8_bit_weights(vnni: bool, tmp_path: Path, monkeypatch):
    """A QAT model's 8-bit weights overflow OpenVINO's int16 sums on CPUs without VNNI: say so, whatever this CPU is."""
    pytest.importorskip("openvino")
    from qarep_det.quant.backends import openvino as qov

    path = tmp_path / "conv.onnx"
    torch.onnx.export(nn.Conv2d(3, 4, 3), torch.rand(1, 3, 8, 8), path, dynamo=False)
    monkeypatch.setattr(qov, "cpu_has_vnni", lambda: vnni)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        qov.convert_qdq_onnx(path)
    assert any("no int8 dot-product instructions" in str(w.message) for w in seen) != vnni
