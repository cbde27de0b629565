"""Post-training INT8: calibration data, the reference recipe, three backends and the numbers behind a diagnosis.

Every backend hands evaluation a runner (``runner.Runner``: images in, ``(B, 4 + nc, A)`` decoded predictions out):

- ``simulated.quantize_torch`` + ``runner.torch_runner``: simulated INT8 (NVIDIA ModelOpt), any device; the reference.
- ``openvino.quantize_openvino`` + ``openvino.openvino_runner``: real INT8 on the CPU (an IR quantized by NNCF).
- ``onnx_qdq.export_qdq_onnx`` + ``onnx_qdq.onnx_runner``: the simulated model as QDQ ONNX for TensorRT, run on
  onnxruntime.
- ``onnx_int8.quantize_onnxruntime`` + ``onnx_qdq.onnx_runner``: real INT8 on the CPU (onnxruntime's own
  ``quantize_static``, integer ``QLinearConv`` kernels).

``recipe`` says what is quantized and how, ``scope`` which convs, ``calibration`` on which images; ``diagnostics``
measures weights, outputs and BN scales; ``planted`` makes a known INT8 outlier; ``qat`` the QAT student.
Nothing here imports ``integrations`` or ``eval``, and importing this package loads no heavy dependency: ModelOpt,
OpenVINO/NNCF and ONNX load only when their backend is used.
"""
