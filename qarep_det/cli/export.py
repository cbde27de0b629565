"""Re-parameterize a trained detector, check fused against unfused on real images, export it (FP32 or INT8).

qarep-det export --weights runs/qarep_s/weights/best.pt --format onnx --imgsz 640   (or python tools/export.py)
qarep-det export --weights best.pt --format openvino --int8 --data coco.yaml      (best_int8_openvino_model/)

--int8 writes the INT8 model ptq-eval scores on the matching backend (openvino: the NNCF IR; onnx: the QDQ ONNX of
TensorRT's scheme, ptq-eval's torch and onnxruntime model), made by ptq-eval's own steps from the same flags, in the
layout Ultralytics loads: 'qarep-det yolo val model=best_int8_openvino_model data=...' and 'predict' run on it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qarep_det.cli.common import tool_parser, unexpected_flags
from qarep_det.cli.ptq_eval import add_int8_args, int8_settings
from qarep_det.errors import InputError
from qarep_det.pipelines.export_int8 import export_int8
from qarep_det.ultralytics.export import FORMATS, export
from qarep_det.ultralytics.int8_export import INT8_WRITERS, int8_writer

FP32_FLAGS = {"weights", "format", "imgsz", "data", "overwrite", "int8"}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = tool_parser(__doc__, prog, allow_abbrev=False)  # exact flags: the INT8 ones are told apart by name
    parser.add_argument("--weights", required=True, help="trained Ultralytics checkpoint (.pt)")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="export format")
    parser.add_argument("--imgsz", type=int, default=640, help="square input size")
    parser.add_argument(
        "--data",
        default=None,
        help="dataset YAML whose val images check fusion (default: Ultralytics' samples); with --int8 required, and "
        "its train split calibrates",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    parser.add_argument(
        "--int8",
        action="store_true",
        help="write the INT8 model ptq-eval scores (the flags below as ptq-eval takes them), beside the weights: "
        "<stem>_int8_openvino_model/ or <stem>_int8_qdq.onnx",
    )
    parser.add_argument(
        "--backend",
        choices=INT8_WRITERS,
        help="--int8: the ptq-eval backend whose INT8 model is written (default: the one that writes --format)",
    )
    add_int8_args(parser, 512, "--int8: calibration images from --data's train split", "--int8: calibration batch")
    args = parser.parse_args(argv)
    if not args.int8:
        if extra := unexpected_flags(argv, FP32_FLAGS):
            raise InputError(f"{extra}: only with --int8")
        path, diff = export(args.weights, args.format, args.imgsz, args.data, args.overwrite)
        print(f"fused vs unfused on real images: {diff}")
        print(f"exported {path}")
        return 0
    if args.data is None:
        raise InputError("--int8 needs --data: its train split calibrates")
    backend, _ = int8_writer(args.format, args.backend)
    settings = int8_settings(args, Path(args.data), (backend,), args.imgsz, args.calib_images)
    result = export_int8(args.weights, args.format, settings, backend=backend, overwrite=args.overwrite)
    print(f"fused vs unfused on real images: {result.fusion}")
    kept = ", ".join(result.float_layers) or "none"
    print(f"exported {result.path} (ptq-eval's {result.backend} INT8 model; convs kept float: {kept})")
    return 0
