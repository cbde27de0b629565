"""Re-parameterize a trained detector, check fused against unfused on real images, export it.

qarep-det export --weights runs/qarep_s/weights/best.pt --format onnx --imgsz 640   (or python tools/export.py)
"""

from __future__ import annotations

from qarep_det.cli.common import tool_parser
from qarep_det.ultralytics.export import FORMATS, export


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = tool_parser(__doc__, prog)
    parser.add_argument("--weights", required=True, help="trained Ultralytics checkpoint (.pt)")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="export format")
    parser.add_argument("--imgsz", type=int, default=640, help="square input size")
    parser.add_argument("--data", default=None, help="dataset YAML whose val images check fusion (default: samples)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    args = parser.parse_args(argv)
    path, diff = export(args.weights, args.format, args.imgsz, args.data, args.overwrite)
    print(f"fused vs unfused on real images: {diff}")
    print(f"exported {path}")
    return 0
