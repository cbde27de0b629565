"""Real INT8 on CPU: OpenVINO IR quantized by NNCF, configured to the reference recipe.

Why OpenVINO + NNCF: OpenVINO is the maintained CPU runtime with real INT8 kernels and NNCF is its own post-training
quantizer, so the IR runs integer convolutions, not simulated ones. Speed depends on the CPU (docs/int8.md): CPUs
with int8 dot products (VNNI, AMX) are where INT8 pays off in time. The IR is about 4x smaller either way.

How NNCF is pinned to the recipe (nncf 3.4): preset PERFORMANCE (symmetric activations, symmetric per-channel
weights), bias correction off (``disable_bias_correction=True``; NNCF's default would hide structural problems), and
an ignored scope that (a) lists every op type other than convolution, so the only activation quantizers are the ones
feeding a conv, exactly as in the simulated model, and (b) names the convs :mod:`qarep_det.quant.scope` keeps float
(DFL, and the Detect convs when ``quantize_head=False``). Ranges: ``max`` -> NNCF MINMAX (the simulated model's
amax); ``percentile`` -> the largest per-image |x| quantile (NNCF has no global-histogram percentile, and averaging
per-image quantiles, its MEAN_QUANTILE, lands far lower); ``mse`` -> NNCF's HISTOGRAM estimator (an L2-error search
ported from torch's HistogramObserver, not TensorRT's MSE sweep); ``entropy`` -> not offered by NNCF,
``ValueError``. How close each lands to the torch backend's ranges: docs/int8.md.

A scheme gap NNCF cannot close through its API: it makes an activation quantizer unsigned (u8, step max/255)
whenever calibration saw no negative value, e.g. after every ReLU, while TensorRT is always signed (s8, step
max/127); ``QuantizationParameters(signedness_to_force=True)`` is rejected against its hardware config
("Quantization parameter constraints specified in NNCF config are incompatible with HW capabilities"). By default
such quantizers are rewritten afterwards to the signed grid of the same range, so the IR computes what TensorRT
would. ``asymmetric_activations=True`` (ptq_eval's and export's
``--openvino-activations asymmetric``) gives NNCF its preset MIXED instead and keeps its grid: each activation on
[min, max] with a zero point (after a ReLU [0, max], a step of max/255), the grid of Ultralytics' own INT8 export,
which the CPU's u8 x s8 dot products take without a shift (docs/int8.md: as fast and as accurate as that export).

Where a conv's input is a Concat, MaxPool or nearest Upsample, the quantizer is then moved onto that op's inputs
(:mod:`qarep_det.quant.backends.hoist`, exact), so the CPU concatenates, pools and upsamples 8-bit data as in
Ultralytics' own INT8 export.

A hardware gap: CPUs without VNNI (AVX2, AVX-512F) multiply u8 x s8 pairs into saturating int16 sums, which full
8-bit weights overflow; NNCF's overflow fix (a 7-bit weight grid, step 2 max/127, codes in [-63, 64]) keeps the sums
exact (docs/int8.md). So ``overflow_fix=None`` (auto) turns the fix on for every layer when the CPU has no VNNI
(``/proc/cpuinfo``) and off otherwise, where the IR's weights equal the reference's exactly; ``True`` / ``False``
(ptq_eval's ``--overflow-fix on|off``) build for another CPU than this one. With the fix on, the OpenVINO model is one
weight bit coarser than the reference (a step of 2 max/127):
:func:`~qarep_det.quant.backends.simulated.half_range_weights` is that grid in torch (tested against the IR), so a
ranking for this backend sees the errors it will make.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from qarep_det.device import cpu_info
from qarep_det.errors import InputError
from qarep_det.logs import quiet
from qarep_det.quant.backends.hoist import hoist_quantizers
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.runner import DecodedOutput, Runner
from qarep_det.quant.scope import float_conv_names

if TYPE_CHECKING:
    import openvino as ov

INSTALL_HINT = 'pip install "qarep_det[openvino]"'
CONV_TYPES = ("Convolution", "GroupConvolution")
_NOT_OPS = ("Parameter", "Result", "Constant")
_TORCH_PREFIX = "__module.model."  # friendly names of converted ops start with the torch module path


def require_openvino():
    """Import openvino and nncf, or fail with the pip extra to install."""
    try:
        import nncf
        import openvino as ov
    except ImportError as err:
        raise ImportError(f"the OpenVINO backend needs openvino and nncf: {INSTALL_HINT} ({err})") from err
    return ov, nncf


def convert_openvino(model: nn.Module, imgsz: int) -> ov.Model:
    """FP32 OpenVINO model of a fused detector: input ``(B, 3, imgsz, imgsz)`` (dynamic B), output ``(B, 4+nc, A)``."""
    ov, _ = require_openvino()
    wrapped = DecodedOutput(copy.deepcopy(model).float().cpu().eval())
    example = torch.zeros(1, 3, imgsz, imgsz)
    with torch.no_grad():
        wrapped(example)  # fill Detect's anchor cache first, else the two trace runs differ and tracing fails
    with warnings.catch_warnings():  # jit.trace deprecation; anchors traced as constants is intended (fixed imgsz)
        warnings.simplefilter("ignore", (FutureWarning, torch.jit.TracerWarning))
        return ov.convert_model(wrapped, example_input=example, input=[(-1, 3, imgsz, imgsz)])


def conv_ops_by_module(ov_model: ov.Model) -> dict[str, list]:
    """Convolution ops of a converted model keyed by the torch module they came from (e.g. ``model.22.cv2.0.2``)."""
    found: dict[str, list] = {}
    for op in ov_model.get_ordered_ops():
        scope = op.get_friendly_name().split("/", 1)[0]
        if op.get_type_name() in CONV_TYPES and scope.startswith(_TORCH_PREFIX):
            found.setdefault(scope[len(_TORCH_PREFIX) :], []).append(op)
    return found


def ignored_scope(model: nn.Module, ov_model: ov.Model, recipe: QuantRecipe):
    """NNCF ignored scope: every non-conv op type, plus the convs the recipe keeps float (by exact op name)."""
    _, nncf = require_openvino()
    convs = conv_ops_by_module(ov_model)
    torch_convs = {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if set(convs) != torch_convs:
        raise RuntimeError(
            "cannot match OpenVINO convolutions to torch modules (op naming changed?); "
            f"unmatched: {sorted(torch_convs ^ set(convs))[:5]}"
        )
    names = [op.get_friendly_name() for name in sorted(float_conv_names(model, recipe)) for op in convs[name]]
    types = sorted({op.get_type_name() for op in ov_model.get_ordered_ops()} - set(CONV_TYPES) - set(_NOT_OPS))
    return nncf.IgnoredScope(names=names, types=types)


def _range_estimator(recipe: QuantRecipe):
    """NNCF activation range estimator for the recipe's calibration method (see module docstring)."""
    from nncf.quantization.range_estimator import (
        AggregatorType,
        RangeEstimatorParameters,
        RangeEstimatorParametersSet,
        StatisticsCollectorParameters,
        StatisticsType,
    )

    if recipe.calib_method == "max":
        return RangeEstimatorParametersSet.MINMAX
    if recipe.calib_method == "percentile":  # the largest per-image |x| quantile (MEAN here gave half the range)
        tail = StatisticsCollectorParameters(
            StatisticsType.ABS_QUANTILE, AggregatorType.MAX, quantile_outlier_prob=1.0 - recipe.percentile / 100.0
        )
        return RangeEstimatorParameters(min=tail, max=copy.copy(tail))
    if recipe.calib_method == "mse":
        return RangeEstimatorParametersSet.HISTOGRAM
    raise InputError(
        f"calib_method {recipe.calib_method!r} is not available with NNCF (it has max, quantile and histogram-MSE "
        "range estimators); use max, percentile or mse for the OpenVINO backend"
    )


class SingleImages:
    """Re-iterable view of calibration batches as single ``(1, 3, H, W)`` numpy images, so NNCF counts images."""

    def __init__(self, batches: Iterable[torch.Tensor]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[np.ndarray]:
        for batch in self.batches:
            for image in batch:
                yield image[None].float().cpu().numpy()


def force_signed_activations(ov_model: ov.Model) -> int:
    """Rewrite unsigned activation FakeQuantize ranges [0, m] to TensorRT's signed grid (step m/127); returns count."""
    ov, _ = require_openvino()
    changed = 0
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() != "FakeQuantize" or op.get_attributes()["levels"] != 256:
            continue
        ranges = [op.input_value(i).get_node() for i in range(1, 5)]
        if any(r.get_type_name() != "Constant" for r in ranges):
            continue
        in_low, in_high, out_low, out_high = (r.get_data().astype(np.float32) for r in ranges)
        if in_low.size != 1 or np.any(in_low != 0) or np.any(out_low != 0) or np.any(in_high <= 0):
            continue
        op.input(1).replace_source_output(ov.opset13.constant(-in_high * 128 / 127).output(0))
        op.input(3).replace_source_output(ov.opset13.constant(-out_high * 128 / 127).output(0))
        changed += 1
    return changed


ONEDNN_NO_VNNI = ("SSE41", "AVX", "AVX2", "AVX512_CORE")  # oneDNN ISA caps below every int8 dot product


def onednn_isa_cap() -> str | None:
    """``ONEDNN_MAX_CPU_ISA``, upper-cased (None if unset): OpenVINO's CPU plugin builds its oneDNN kernels for at
    most this ISA, e.g. ``AVX2`` runs an AVX2-only CPU's integer convs (``jit_avx2_I8``, int16 sums) on a newer
    one (checked in docs/int8.md against the kernels OpenVINO reports)."""
    return os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() or None


def cpu_has_vnni() -> bool:
    """Whether OpenVINO's convs have an int8 dot-product instruction here (AVX-VNNI, AVX512-VNNI or AMX): the CPU
    has one and :func:`onednn_isa_cap` does not hold oneDNN below it; False if unknown."""
    return cpu_info().vnni and onednn_isa_cap() not in ONEDNN_NO_VNNI


OVERFLOW_FIX: dict[str, bool | None] = {"auto": None, "on": True, "off": False}  # the CLI's --overflow-fix
OPENVINO_ACTIVATIONS = ("signed", "asymmetric")  # the CLI's --openvino-activations (see module docstring)


def overflow_fix_on(overflow_fix: bool | None = None) -> bool:
    """Whether NNCF's overflow fix applies: as given, or (``None``) decided by this CPU, on where it has no VNNI."""
    return not cpu_has_vnni() if overflow_fix is None else overflow_fix


def nncf_arguments(
    model: nn.Module,
    ov_model: ov.Model,
    recipe: QuantRecipe,
    overflow_fix: bool | None = None,
    *,
    asymmetric_activations: bool = False,
) -> tuple[dict, object]:
    """The recipe as NNCF arguments (see module docstring): the keywords ``nncf.quantize`` and
    ``nncf.quantize_with_accuracy_control`` share (preset, subset size, ignored scope), and the advanced parameters
    (bias correction off, the overflow fix, the range estimator), which the two take under different names.
    ``overflow_fix=None`` decides by the CPU: 7-bit weights without VNNI, 8-bit with it; ``asymmetric_activations``:
    preset MIXED (asymmetric activations) instead of PERFORMANCE."""
    _, nncf = require_openvino()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    range_estimator = _range_estimator(recipe)  # fail on an unsupported method before anything else
    advanced = AdvancedQuantizationParameters(
        disable_bias_correction=True,
        overflow_fix=OverflowFix.ENABLE if overflow_fix_on(overflow_fix) else OverflowFix.DISABLE,
        activations_range_estimator_params=range_estimator,
    )
    shared = {
        "preset": nncf.QuantizationPreset.MIXED if asymmetric_activations else nncf.QuantizationPreset.PERFORMANCE,
        "subset_size": recipe.calib_images,
        "ignored_scope": ignored_scope(model, ov_model, recipe),
    }
    return shared, advanced


@contextlib.contextmanager
def nncf_quiet() -> Iterator[None]:
    """NNCF logs one INFO line per op it leaves unquantized: hundreds here. Warnings stay."""
    with quiet(logging.getLogger("nncf")):
        yield


def quantize_openvino(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    imgsz: int,
    recipe: QuantRecipe | None = None,
    asymmetric_activations: bool = False,
    overflow_fix: bool | None = None,
    fp32: ov.Model | None = None,
) -> ov.Model:
    """INT8 OpenVINO model of a fused torch detector, calibrated on ``batches`` (letterboxed at ``imgsz``).

    ``overflow_fix=None`` decides by the CPU (see module docstring): 7-bit weights without VNNI, 8-bit with it.
    ``fp32``: the FP32 IR of ``model`` at ``imgsz`` if the caller already has it (converting a detector takes
    seconds); it is copied, never modified.
    """
    recipe = recipe or QuantRecipe()
    _, nncf = require_openvino()
    _range_estimator(recipe)  # fail on an unsupported method before converting anything
    if overflow_fix is False and not cpu_has_vnni():
        warnings.warn(
            "overflow fix off on a CPU without int8 dot-product instructions (VNNI/AMX): OpenVINO sums the 8-bit "
            "weights in saturating int16 here, so the INT8 scores measured on this CPU are not those of the CPU the "
            "IR is for",
            stacklevel=2,
        )
    ov_model = fp32.clone() if fp32 is not None else convert_openvino(model, imgsz)
    shared, advanced = nncf_arguments(
        model, ov_model, recipe, overflow_fix, asymmetric_activations=asymmetric_activations
    )
    with nncf_quiet():
        quantized = nncf.quantize(ov_model, nncf.Dataset(SingleImages(batches)), advanced_parameters=advanced, **shared)
    if not asymmetric_activations:
        force_signed_activations(quantized)
    hoist_quantizers(quantized)
    return quantized


def nncf_default(fp32: ov.Model, batches: Iterable[torch.Tensor], images: int) -> ov.Model:
    """``fp32`` (copied) quantized by ``nncf.quantize`` with NNCF's defaults, the anchor our IR is compared with:
    its preset (performance: symmetric activations), its ranges, its bias correction, its overflow fix (first layer
    only) and every op type it quantizes, on the calibration ``batches``; ``subset_size`` is their ``images`` so
    that it sees the same images as the recipe (its default, 300, would take fewer or repeat none)."""
    _, nncf = require_openvino()
    with nncf_quiet():
        return nncf.quantize(fp32.clone(), nncf.Dataset(SingleImages(batches)), subset_size=images)


def convert_qdq_onnx(path: str | Path) -> ov.Model:
    """OpenVINO model of a QDQ ONNX file (a QAT student's): its Q/DQ pairs become FakeQuantize ops with the file's
    scales and its weights INT8 constants, so the CPU runs integer convolutions with the learned ranges.

    Nothing is re-calibrated, so NNCF's overflow fix cannot apply: the weights keep all 8 bits, also on CPUs
    without VNNI (see the module docstring); ptq_eval's openvino row against its torch row shows what that costs.
    """
    ov, _ = require_openvino()
    if not cpu_has_vnni():
        warnings.warn(
            "this CPU has no int8 dot-product instructions (VNNI/AMX): OpenVINO sums the QAT model's 8-bit weights in "
            "saturating int16 and its INT8 score can fall far below the torch and onnxruntime rows (docs/qat.md); "
            "score the OpenVINO artefact on a CPU with VNNI",
            stacklevel=2,
        )
    converted = ov.convert_model(str(path))
    hoist_quantizers(converted)
    return converted


def read_openvino(path: str | Path) -> ov.Model:
    """An IR (.xml) as a model object, to reshape or quantize before compiling."""
    ov, _ = require_openvino()
    return ov.Core().read_model(str(path))


def save_openvino(ov_model: ov.Model, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``path`` (.xml) and its .bin in full precision; refuses to replace either unless ``overwrite``."""
    ov, _ = require_openvino()
    xml = Path(path)
    if xml.suffix != ".xml":
        raise InputError(f"OpenVINO IR path must end with .xml, got '{xml}'")
    existing = [p for p in (xml, xml.with_suffix(".bin")) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"'{existing[0]}' exists; pass overwrite=True to replace it")
    xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov_model, str(xml), compress_to_fp16=False)  # the default would halve FP32 weights to FP16
    return xml


def compile_cpu(model: ov.Model | str | Path, num_threads: int | None = None) -> ov.CompiledModel:
    """Compile an OpenVINO model (object or .xml path) for the CPU with FP32 as the float precision."""
    ov, _ = require_openvino()
    config: dict[str, object] = {"INFERENCE_PRECISION_HINT": "f32"}  # no silent bf16/fp16 on CPUs that have it
    if num_threads:
        config["INFERENCE_NUM_THREADS"] = num_threads
    return ov.Core().compile_model(model if not isinstance(model, (str, Path)) else str(model), "CPU", config)


def conv_kernels(compiled: ov.CompiledModel) -> Counter[str]:
    """How many convolutions of a compiled model run on each CPU kernel, as ``"<precision> <kernel>"``.

    Read from OpenVINO's execution graph: it shows whether an INT8 IR really runs integer kernels
    (e.g. ``u8 jit_avx2_I8``) and which ones, which is what decides INT8 speed on a given CPU.
    """
    counts: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "Convolution":
            counts[f"{info['runtimePrecision'].astype(str)} {info['primitiveType'].astype(str)}"] += 1
    return counts


def openvino_runner(model: ov.Model | ov.CompiledModel | str | Path, num_threads: int | None = None) -> Runner:
    """A runner over an OpenVINO model (object or .xml path, compiled by :func:`compile_cpu`), or over a model the
    caller already compiled (e.g. to read its kernels with :func:`conv_kernels`; ``num_threads`` is then unused)."""
    ov, _ = require_openvino()
    compiled = model if isinstance(model, ov.CompiledModel) else compile_cpu(model, num_threads)
    request = compiled.create_infer_request()

    def run(images: torch.Tensor) -> torch.Tensor:
        result = request.infer({0: images.detach().float().cpu().numpy()})
        return torch.from_numpy(np.array(result[compiled.output(0)]))  # copy: the request reuses its buffer

    return run
