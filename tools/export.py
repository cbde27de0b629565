"""Re-parameterize a trained detector, check fused against unfused on real images, export it.

python tools/export.py --weights runs/qarep_s/weights/best.pt --format onnx --imgsz 640
"""

from __future__ import annotations

import argparse
import sys

import qarep_det  # noqa: F401  (offline Ultralytics, module registration)
from qarep_det.cli import OneLineErrorParser
from qarep_det.export import FORMATS, FusionMismatchError, export


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--weights", required=True, help="trained Ultralytics checkpoint (.pt)")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="export format")
    parser.add_argument("--imgsz", type=int, default=640, help="square input size")
    parser.add_argument("--data", default=None, help="dataset YAML whose val images check fusion (default: samples)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    args = parser.parse_args(argv)
    try:
        path, diff = export(args.weights, args.format, args.imgsz, args.data, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, FusionMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"fused vs unfused on real images: {diff}")
    print(f"exported {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
