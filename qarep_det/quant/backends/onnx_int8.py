"""onnxruntime INT8 that runs on integer kernels: the FP32 ONNX quantized by onnxruntime's own ``quantize_static``.

Why a second ONNX file: the QDQ ONNX of :mod:`~qarep_det.quant.backends.onnx_qdq` is TensorRT's scheme (Q/DQ on conv
inputs and weights only), and onnxruntime's CPU provider fuses a conv into ``QLinearConv`` only from the pattern
DQ(input) + DQ(weight) -> Conv -> Q(output): the conv's OUTPUT must be quantized too. On that file every conv runs in
float on dequantized values (slower than FP32). Here onnxruntime's quantizer writes the pattern its CPU provider
fuses, so each conv the recipe quantizes becomes one integer conv (counted by :func:`optimized_op_counts`).

How ``quantize_static`` is pinned to the reference recipe (:mod:`qarep_det.quant.recipe`), and where the format
makes it differ:

- Weights: INT8 symmetric per output channel (``per_channel=True``, ``WeightSymmetric``), step ``max|w| / 127`` per
  channel: the reference grid. onnxruntime quantizes the bias too, to int32 at ``input scale * weight scale`` (the
  reference keeps it float), and may widen a channel's weight scale where that bias would overflow int32.
- Activations: UINT8, asymmetric, per tensor (onnxruntime's x86 integer kernels are U8S8: uint8 activations times
  int8 weights, with VNNI/AMX kernels; int8 activations run a slower path). Ranges are onnxruntime's MinMax, the
  recipe's ``max``: the global min and max over the calibration images, widened to include 0. The reference is
  symmetric int8 at ``max|x| / 127``; here a tensor's step is ``(max - min) / 255``, finer (a post-ReLU tensor gets
  zero point 0 and step ``max / 255``, half the reference's). Only ``max`` is offered: the recipe's percentile / MSE
  / entropy are searches over a symmetric |x| histogram, which onnxruntime's two-sided histogram calibrators do not
  compute (:func:`check_recipe`).
- Where: a quantized conv's input, weights and OUTPUT. The reference quantizes conv inputs only; the output
  quantizers are what integer kernels need (the QLinearConv writes uint8). A ReLU (or Clip) right after a quantized
  conv is folded into the output quantizer (zero point 0 clamps as the ReLU would: exact), so a conv followed by a
  conv reads the very tensor the reference quantizes, on a finer grid. The last convs of the Detect head are
  quantized convs too, so their raw box and class logits leave them as uint8 before the float decode: an error the
  reference does not make.
- What stays float is the recipe's scope (:mod:`qarep_det.quant.scope`), by ONNX node name: the DFL conv, every
  Detect conv when ``quantize_head=False``, and the ``float_layers`` (``nodes_to_exclude``), and every op other than
  conv and ReLU (``op_types_to_quantize``): decode, DFL softmax, sigmoid, concat, upsample, pools and adds stay float
  ops, though onnxruntime may run a concat or max-pool between two quantized tensors on their uint8 values (which
  computes the same). A float conv reads the uint8 output of the quantized conv before it, if any (the reference
  keeps its input float): only its weights and arithmetic are float.
- ``reduce_range``: 7-bit weights (codes in [-64, 64], step ``max|w| / 64``) for CPUs without VNNI, whose U8S8
  kernels sum pairs of products in saturating int16 (onnxruntime's advice; the same fault NNCF's overflow fix
  avoids). ptq_eval decides it as it decides the overflow fix (by this CPU unless told).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from qarep_det.errors import InputError
from qarep_det.quant.backends.onnx_qdq import require_onnx
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.scope import float_conv_names

QUANTIZED_OPS = ("Conv", "Relu", "Clip")  # a ReLU / Clip after a quantized conv folds into its output quantizer
INTEGER_CONVS = ("QLinearConv", "ConvInteger")  # what onnxruntime's CPU provider runs a fused integer conv as
_EXPORT_PREFIX = "model."  # the export wrapper (DecodedOutput) names every weight model.<module>.weight


def check_recipe(recipe: QuantRecipe) -> None:
    """``InputError`` for a recipe this backend cannot follow: only the ``max`` range estimator (onnxruntime's
    MinMax) has an onnxruntime counterpart (see the module docstring)."""
    if recipe.calib_method != "max":
        raise InputError(
            f"calib_method {recipe.calib_method!r} is not available with the onnxruntime-int8 backend: onnxruntime's "
            "histogram calibrators are not the recipe's symmetric |x| searches; use max (onnxruntime's MinMax)"
        )


def conv_nodes(model: nn.Module, graph) -> dict[str, str]:
    """ONNX node name of every ``Conv2d`` of ``model`` in an exported graph, keyed by torch module name.

    Matched through the weight initializer (``model.<module>.weight``), since TorchScript's node scopes do not spell
    module paths unambiguously; a conv that cannot be matched is a ``RuntimeError`` (the export changed), never a
    silently quantized float conv."""
    found = {}
    for node in graph.node:
        if node.op_type == "Conv" and len(node.input) > 1:
            found[node.input[1].removeprefix(_EXPORT_PREFIX).removesuffix(".weight")] = node.name
    torch_convs = {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if missing := sorted(torch_convs - found.keys()):
        raise RuntimeError(f"cannot match ONNX convs to torch modules (weight naming changed?): {missing[:5]}")
    return {name: found[name] for name in torch_convs}


def own_initializers(model) -> None:
    """Give every conv its own weight and bias initializers, in place.

    TorchScript's export stores equal parameters once (e.g. the zero biases of an untrained head) and feeds the
    others through ``Identity`` nodes; onnxruntime's quantizer quantizes only a bias that is an initializer, and a
    conv whose bias is not stays a float conv. Each such ``Identity`` becomes a copy of its initializer under the
    Identity's output name, so every name the convs read is unchanged."""
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    copies = [n for n in graph.node if n.op_type == "Identity" and n.input[0] in initializers]
    for node in copies:
        graph.initializer.append(
            numpy_helper.from_array(numpy_helper.to_array(initializers[node.input[0]]), node.output[0])
        )
        graph.node.remove(node)


def _calibration_reader(batches: Iterable[torch.Tensor]):
    """onnxruntime's ``CalibrationDataReader`` over calibration batches (the ``images`` input, batch dimension
    dynamic); it walks ``batches`` once, lazily, as ``quantize_static`` asks."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[torch.Tensor] | None = None

        def get_next(self) -> dict | None:
            if self.batches is None:
                self.batches = iter(batches)
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch.detach().float().cpu().numpy()}

    return Reader()


class _NoPreprocessAdvice(logging.Filter):
    """Drops ``quantize_static``'s advice to run its pre-processing (symbolic shape inference and graph
    optimization): the exported graph has static shapes but the batch and is already folded."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    root = logging.getLogger()
    advice = _NoPreprocessAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def quantize_onnxruntime(
    model: nn.Module,
    fp32_onnx: str | Path,
    batches: Iterable[torch.Tensor],
    path: str | Path,
    recipe: QuantRecipe | None = None,
    reduce_range: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``path``: ``fp32_onnx`` (``model`` exported by :func:`qarep_det.quant.backends.onnx_qdq.export_qdq_onnx`)
    quantized by onnxruntime's ``quantize_static`` for its integer CPU kernels, calibrated with MinMax on
    ``batches`` (float ``(B, 3, H, W)`` images as evaluation sees them). ``model`` names the convs the recipe keeps
    float. Refuses to replace a file unless asked. The scheme and how it differs from the reference: module
    docstring."""
    recipe = recipe or QuantRecipe()
    check_recipe(recipe)
    onnx, _ = require_onnx()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"'{path}' exists; pass overwrite=True to replace it")
    fp32 = onnx.load(str(fp32_onnx))
    nodes = conv_nodes(model, fp32.graph)
    own_initializers(fp32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qarep_ort_") as scratch, _quiet():
        onnx.save(fp32, prepared := str(Path(scratch) / "fp32.onnx"))
        quantize_static(
            prepared,
            str(path),
            _calibration_reader(batches),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=sorted(nodes[name] for name in float_conv_names(model, recipe)),
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    return path


def quantize_static_default(fp32_onnx: str | Path, batches: Iterable[torch.Tensor], path: str | Path) -> Path:
    """Write ``path``: ``fp32_onnx`` quantized as onnxruntime's documentation advises a CNN on x86, the anchor our
    integer file is compared with: its pre-processing (``quant_pre_process``), then ``quantize_static`` with QDQ,
    MinMax on ``batches``, uint8 activations and per-channel int8 weights (U8S8, which onnxruntime's quantization
    guide advises for x86; its own default, S8S8, left 16 of yolo_qarep_s's 60 convs float on onnxruntime 1.32 and
    ran 1.6x slower), convs only. Nothing of
    the recipe: the DFL conv and the Detect head's convs are quantized too, and every range is onnxruntime's own.
    Convs only, because its default (every op type it can quantize) also quantizes the decode: the concat of pixel
    boxes and class scores becomes one uint8 tensor, whose step (2.49 on yolo_qarep_s at 320 px) rounds every
    score to 0 or 2.49 (measured mAP50-95 0.00 there, docs/int8.md)."""
    require_onnx()
    from onnxruntime.quantization import QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qarep_ort_") as scratch:
        quant_pre_process(str(fp32_onnx), prepared := str(Path(scratch) / "fp32_pre.onnx"), skip_symbolic_shape=True)
        quantize_static(
            prepared,
            str(path),
            _calibration_reader(batches),
            per_channel=True,
            op_types_to_quantize=["Conv"],
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return path


def optimized_op_counts(path: str | Path) -> Counter[str]:
    """Op types of ``path`` as onnxruntime's CPU provider runs it: the graph after its basic and extended
    optimizations (Q/DQ fusion into ``QLinearConv`` and friends), saved by the session
    (``SessionOptions.optimized_model_filepath``) and counted. The layout-specific level above is left out, so the
    graph (and the count) does not depend on this CPU's ISA."""
    onnx, ort = require_onnx()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with tempfile.TemporaryDirectory(prefix="qarep_ort_") as scratch:
        options.optimized_model_filepath = str(Path(scratch) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def integer_convs(path: str | Path) -> int:
    """How many convs of an ONNX file onnxruntime's CPU provider runs on integer kernels."""
    counts = optimized_op_counts(path)
    return sum(counts[op] for op in INTEGER_CONVS)
