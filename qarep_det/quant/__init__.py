"""Post-training INT8: calibration data, the reference recipe, three backends and diagnostics.

Every backend hands evaluation a :data:`Runner` (images in, ``(B, 4 + nc, A)`` decoded predictions out):

- :func:`quantize_torch` + :func:`torch_runner`: simulated INT8 (NVIDIA ModelOpt), any device; the reference.
- :func:`quantize_openvino` + :func:`openvino_runner`: real INT8 on CPU (OpenVINO IR quantized by NNCF).
- :func:`export_qdq_onnx`: the simulated model as QDQ ONNX for TensorRT (check it with :func:`check_qdq_onnx`).

:func:`analyze` says where the INT8 error comes from, conv by conv (``tools/diagnose.py``, ``ptq_eval --keep-float``),
and :func:`bn_scales` reads the training form's BN scale factors behind it.

Heavy dependencies (modelopt, openvino/nncf, onnx/onnxruntime) load only when their backend is used.
"""

from qarep_det.quant.analysis import ModelAnalysis, analyze, bn_scales
from qarep_det.quant.calibration import CalibrationSet, calibration_set, draw_calibration_images, train_images
from qarep_det.quant.diagnostics import detection_sqnr_db, sqnr_db, weight_report
from qarep_det.quant.onnx_qdq import check_qdq_onnx, export_qdq_onnx, onnx_runner
from qarep_det.quant.openvino import convert_openvino, openvino_runner, quantize_openvino, save_openvino
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.runner import Runner, torch_runner
from qarep_det.quant.simulated import conv_quant_states, quantize_torch, verify_scheme

__all__ = [
    "CalibrationSet",
    "ModelAnalysis",
    "QuantRecipe",
    "Runner",
    "analyze",
    "bn_scales",
    "calibration_set",
    "check_qdq_onnx",
    "conv_quant_states",
    "convert_openvino",
    "detection_sqnr_db",
    "draw_calibration_images",
    "export_qdq_onnx",
    "onnx_runner",
    "openvino_runner",
    "quantize_openvino",
    "quantize_torch",
    "save_openvino",
    "sqnr_db",
    "torch_runner",
    "train_images",
    "verify_scheme",
    "weight_report",
]
