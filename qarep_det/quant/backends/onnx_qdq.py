"""QDQ ONNX for TensorRT: the simulated INT8 model exported with QuantizeLinear/DequantizeLinear pairs.

TensorRT builds an explicitly quantized engine from Q/DQ pairs and keeps their scales, so the engine computes the
reference recipe, not a TensorRT re-calibration. The export is ModelOpt's own route: its quantizers carry ONNX
symbolic functions that emit one Q/DQ pair per quantizer (weights: per-channel, ``axis=0``; inputs: per-tensor;
int8 zero points of 0), which only the TorchScript exporter calls (``torch.onnx.export(..., dynamo=False)``,
deprecated but present in torch 2.14).

The file agrees with the torch model closely, not exactly: onnxruntime's SiLU and accumulation order differ from
torch's in the last float bit; a value that sits on a rounding boundary then lands one INT8 step away, and such flips
cascade through the following quantizers (docs/int8.md).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from qarep_det.quant.runner import DecodedOutput, Runner

INSTALL_HINT = 'pip install "qarep_det[onnx]"'
OPSET = 17  # Q/DQ with per-channel axis needs >= 13; TensorRT 8.6+ parses 17


def require_onnx():
    """Import onnx and onnxruntime, or fail with the pip extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ImportError(f"QDQ ONNX export needs onnx and onnxruntime: {INSTALL_HINT} ({err})") from err
    return onnx, onnxruntime


def export_qdq_onnx(qmodel: nn.Module, path: str | Path, imgsz: int, overwrite: bool = False) -> Path:
    """Write the fake-quantized detector (from ``quantize_torch``) as QDQ ONNX: input ``images`` (B dynamic),
    output ``output0`` ``(B, 4 + nc, A)``; checked with ``onnx.checker``. Refuses to replace a file unless asked.
    A float detector goes the same route and comes out without Q/DQ pairs: the FP32 twin of the same graph."""
    onnx, _ = require_onnx()
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"'{path}' exists; pass overwrite=True to replace it")
    wrapped = DecodedOutput(copy.deepcopy(qmodel).float().cpu().eval())
    example = torch.zeros(1, 3, imgsz, imgsz)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        wrapped(example)  # fill Detect's anchor cache so the traced graph is the steady-state one
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, torch.jit.TracerWarning))
        torch.onnx.export(
            wrapped,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["images"],
            output_names=["output0"],
            dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}},
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def onnx_runner(path: str | Path, options=None, providers: Sequence = ("CPUExecutionProvider",)) -> Runner:
    """A runner over an ONNX file on onnxruntime's CPU provider (or ``providers``, e.g. TensorRT's), with
    ``options`` (``onnxruntime.SessionOptions``: threads, graph optimization level) or onnxruntime's defaults."""
    _, ort = require_onnx()
    session = ort.InferenceSession(str(path), options, providers=list(providers))

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"images": images.detach().float().cpu().numpy()})[0])

    return run
