"""Simulated INT8 in PyTorch (the reference backend), built on NVIDIA ModelOpt (``nvidia-modelopt``).

Why ModelOpt: it is NVIDIA's maintained successor of ``pytorch-quantization``, the tool behind TensorRT's explicit
(QDQ) INT8 and behind published YOLO PTQ studies, so its fake-quant grid, max calibrator and ONNX Q/DQ export are
exactly TensorRT's. Its histogram calibrators are not used (too slow, and its MSE is broken): percentile, MSE
and entropy ranges come from :mod:`qarep_det.quant.calibrators` in a second pass and are written into the same
ModelOpt quantizers. Its fake quant runs on the CPU through a pure-torch fallback, so no CUDA package is needed.

CUDA: ModelOpt fake-quantizes a CUDA tensor with ``modelopt_cuda_ext``, a kernel that ``get_cuda_ext()``
(``modelopt/torch/quantization/extensions.py``) JIT-compiles with nvcc on first use and caches under
``~/.cache/torch_extensions``, silently, on a first GPU run (docs/int8.md). We skip it:
:func:`import_modelopt` stores ``None`` in ``get_cuda_ext``'s own memo, the state ModelOpt records itself when a build
fails, so ``fake_quant_impl`` raises ``AttributeError`` and ``FakeTensorQuantFunction.forward`` takes its documented
fallback, ``_tensor_quant``: the very pure-torch code that runs on the CPU. So CPU and CUDA run one quantization code
path (unit-tested on the CPU by posing as CUDA), with no nvcc needed. Nothing is lost in numerics: the kernel
(``kernels/quantization/gemm/tensor_quant_gpu.cu``, ``fake_tensor_quant_device``) computes the same float32 steps:
``scale = bound / amax``, round half to even (``rint``), clamp to [-128, 127] (ModelOpt's ``narrow_range`` is off
by default, and its ONNX export refuses a signed narrow range), divide by ``scale``, 0 where amax is below 2**-24
(the torch code: at or below). The cost is speed only: about six elementwise kernels and a few host syncs
per quantizer call instead of one fused kernel, in a model whose latency is a simulation's anyway. A process that
already loaded the extension (``get_cuda_ext()`` before us) keeps it.

The scheme applied (and verified after calibration by :func:`verify_scheme`): symmetric INT8 (zero point 0,
signed), per-output-channel weight scales (axis 0, max-calibrated), one per-tensor scale at the input of every
``Conv2d`` except those :mod:`qarep_det.quant.scope` keeps float. Nothing else (adds, concats, pools, upsample,
sigmoid, decode) carries a quantizer.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from qarep_det.errors import InputError
from qarep_det.quant.calibrators import AbsHistogram, histogram_amax
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.scope import float_conv_names, quantized_conv_names

INSTALL_HINT = 'pip install "nvidia-modelopt>=0.47,<0.48" huggingface_hub (both are qarep_det dependencies)'


def import_modelopt():
    """Import ``modelopt.torch.quantization`` lazily (it takes seconds) with an actionable error, and keep it from
    compiling its CUDA fake-quant extension.

    The import's own chatter (no transformers, jit.script deprecation, "No CUDA runtime is found") says nothing
    about this use, so it is muted.
    """
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import modelopt.torch.quantization as mtq
    except ImportError as err:
        raise ImportError(f"the torch INT8 backend needs NVIDIA ModelOpt: {INSTALL_HINT} ({err})") from err
    finally:
        cpp_logger.setLevel(level)
    from modelopt.torch.quantization.extensions import get_cuda_ext

    if not hasattr(get_cuda_ext, "extension"):  # not tried yet: never JIT-compile it (see the module docstring)
        get_cuda_ext.extension = None
    return mtq


@contextlib.contextmanager
def modelopt_quiet() -> Iterator[None]:
    """Mute ModelOpt's per-call chatter around a quantize or restore: its prints ("Inserted 182 quantizers"), the
    missing-transformers note, and the device warning it gives for quantizer stubs on parameter-free layers (pools)."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Cannot find transformers package")
        warnings.filterwarnings("ignore", message="Could not identify the device for TensorQuantizer")
        yield


def modelopt_config(float_convs: Iterable[str]) -> dict:
    """The ModelOpt config: deny all, then per-channel weights (axis 0) and per-tensor inputs on Conv2d only."""
    quant_cfg: list[dict] = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "parent_class": "nn.Conv2d", "cfg": {"num_bits": 8, "axis": 0}},
        {"quantizer_name": "*input_quantizer", "parent_class": "nn.Conv2d", "cfg": {"num_bits": 8, "axis": None}},
    ]
    quant_cfg += [{"quantizer_name": f"{name}.*", "enable": False} for name in sorted(float_convs)]
    return {"quant_cfg": quant_cfg, "algorithm": "max"}


def _calibrate_histograms(model: nn.Module, forward_loop: Callable[[nn.Module], int], recipe: QuantRecipe) -> None:
    """Second pass for percentile/MSE/entropy: histogram each conv input over [0, max] in float, then set amax.

    The max pass already set every input amax to the global max, which is the histogram range (as in TensorRT).
    Quantization is off during the pass so every histogram sees the float activations. An all-zero input keeps 0.
    """
    convs = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.input_quantizer.is_enabled and float(m.input_quantizer.amax) > 0
    }
    hists = {n: AbsHistogram(float(m.input_quantizer.amax)) for n, m in convs.items()}
    hooks = [m.register_forward_pre_hook(lambda _, args, h=hists[n]: h.collect(args[0])) for n, m in convs.items()]
    for m in convs.values():
        m.input_quantizer.disable_quant()
        m.weight_quantizer.disable_quant()
    try:
        forward_loop(model)
    except ValueError as err:
        raise InputError(
            f"{err}: histogram calibration walks the batches twice; pass a list or CalibrationSet"
        ) from err
    finally:
        for hook in hooks:
            hook.remove()
        for m in convs.values():
            m.input_quantizer.enable_quant()
            m.weight_quantizer.enable_quant()
    for n, m in convs.items():
        amax = histogram_amax(hists[n], recipe.calib_method, recipe.percentile)
        m.input_quantizer.amax = torch.tensor(amax, device=m.input_quantizer.amax.device)


def quantize_torch(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    recipe: QuantRecipe | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Fake-quantized INT8 copy of a fused detector, calibrated on ``batches``; ``model`` itself is not touched.

    ``batches`` yields float ``(B, 3, H, W)`` images as evaluation sees them (see ``calibration_set``). The returned
    float32 module runs on ``device`` (CPU or CUDA) like the original, so ``torch_runner`` or Ultralytics code can use
    it. Raises ``RuntimeError`` if the result deviates from the recipe (:func:`verify_scheme`).
    """
    recipe = recipe or QuantRecipe()
    mtq = import_modelopt()
    qmodel = copy.deepcopy(model).to(device).float().eval()  # fake quant computes in float32 anyway
    config = modelopt_config(float_conv_names(qmodel, recipe))

    @torch.no_grad()
    def forward_loop(m: nn.Module) -> int:
        seen = 0
        for batch in batches:
            m(batch.to(device, torch.float32))
            seen += batch.shape[0]
        if seen == 0:
            raise InputError("calibration saw no images; check the calibration set")
        return seen

    with modelopt_quiet():
        mtq.quantize(qmodel, config, forward_loop)
    if recipe.calib_method != "max":
        _calibrate_histograms(qmodel, forward_loop, recipe)
    verify_scheme(qmodel, recipe)
    return qmodel


def with_float_layers(qmodel: nn.Module, recipe: QuantRecipe) -> nn.Module:
    """A copy of a model calibrated by :func:`quantize_torch` with the quantizers of ``recipe.float_layers`` off:
    what ``quantize_torch(model, batches, recipe)`` returns, without calibrating again (checked by
    :func:`verify_scheme`; a test compares the outputs bit for bit). Calibration collects every range with
    quantization off, so no range depends on which convs stay float; ``--max-drop`` tries many float sets on one
    calibration this way."""
    model = copy.deepcopy(qmodel)
    for name in recipe.float_layers:
        conv = model.get_submodule(name)
        conv.input_quantizer.disable()
        conv.weight_quantizer.disable()
    verify_scheme(model, recipe)
    return model


HALF_RANGE_CODES = 63  # NNCF's half range (overflow fix): step 2 amax / 127, codes +-63 (+-amax itself is a tie)


def half_range_weights(qmodel: nn.Module) -> nn.Module:
    """A copy of a model calibrated by :func:`quantize_torch` whose weights round to NNCF's half-range grid, its
    overflow fix on CPUs without VNNI: per output channel a step of ``2 amax / 127`` (the 8-bit step doubled) and
    codes in [-63, 63], i.e. a narrow 7-bit quantizer of range ``amax * 63 / 63.5``. What OpenVINO computes with that
    fix, so a ranking for it sees its errors; not the reference scheme (:func:`verify_scheme` refuses it), never
    exported."""
    model = copy.deepcopy(qmodel)
    for m in model.modules():
        quantizer = getattr(m, "weight_quantizer", None) if isinstance(m, nn.Conv2d) else None
        if quantizer is not None and quantizer.is_enabled:
            quantizer.num_bits, quantizer.narrow_range = 7, True
            quantizer.amax = quantizer.amax * (HALF_RANGE_CODES / (HALF_RANGE_CODES + 0.5))
    return model


@dataclass(frozen=True)
class ConvQuantState:
    """How one Conv2d of a ModelOpt-quantized model is quantized, read back from its quantizers."""

    name: str
    weight_quantized: bool
    input_quantized: bool
    weight_scales: int  # number of weight amax values (= out channels when per-channel)
    weight_axis: int | None
    input_scales: int  # number of input amax values (1 when per-tensor)
    symmetric: bool  # signed, no affine offset: zero point 0
    num_bits: int | None


def conv_quant_states(model: nn.Module) -> list[ConvQuantState]:
    """Read back the quantizers of every Conv2d: what a test or a report needs to prove the scheme."""
    states = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        wq, iq = getattr(m, "weight_quantizer", None), getattr(m, "input_quantizer", None)
        w_on = wq is not None and wq.is_enabled
        i_on = iq is not None and iq.is_enabled
        on = [q for q in (wq, iq) if q is not None and q.is_enabled]
        states.append(
            ConvQuantState(
                name=name,
                weight_quantized=w_on,
                input_quantized=i_on,
                weight_scales=wq.amax.numel() if w_on and wq.amax is not None else 0,
                weight_axis=wq.axis if w_on else None,
                input_scales=iq.amax.numel() if i_on and iq.amax is not None else 0,
                symmetric=all(not q.unsigned and q.bias is None for q in on),
                num_bits=on[0].num_bits if on else None,
            )
        )
    return states


def verify_scheme(model: nn.Module, recipe: QuantRecipe) -> None:
    """Raise ``RuntimeError`` unless the model is quantized exactly as the recipe says (see module docstring)."""
    expected = set(quantized_conv_names(model, recipe))
    problems = []
    for s in conv_quant_states(model):
        out_channels = model.get_submodule(s.name).out_channels
        if s.name not in expected:
            if s.weight_quantized or s.input_quantized:
                problems.append(f"{s.name}: should stay float")
        elif not (s.weight_quantized and s.input_quantized):
            problems.append(f"{s.name}: weight or input not quantized")
        elif s.weight_axis != 0 or s.weight_scales != out_channels:
            problems.append(f"{s.name}: {s.weight_scales} weight scales on axis {s.weight_axis}, not per-channel")
        elif s.input_scales != 1:
            problems.append(f"{s.name}: {s.input_scales} input scales, not per-tensor")
        elif not s.symmetric or s.num_bits != 8:
            problems.append(f"{s.name}: not symmetric int8")
    from modelopt.torch.quantization.nn import TensorQuantizer

    for name, q in model.named_modules():
        parent_name, _, attr = name.rpartition(".")
        if isinstance(q, TensorQuantizer) and q.is_enabled:
            parent = model.get_submodule(parent_name)
            if not isinstance(parent, nn.Conv2d) or attr not in ("weight_quantizer", "input_quantizer"):
                problems.append(f"{name}: unexpected quantizer")
    if problems:
        raise RuntimeError("quantized model deviates from the recipe:\n  " + "\n  ".join(problems))
