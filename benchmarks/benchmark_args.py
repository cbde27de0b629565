"""The arguments every benchmark script shares: one checkpoint, its data, the image size and the calibration draw."""

from __future__ import annotations

import argparse
from pathlib import Path

from qarep_det.quant.backends.openvino import OVERFLOW_FIX


def benchmark_parser(doc: str | None, imgsz: int, calib_images: int, out: str) -> argparse.ArgumentParser:
    """A parser with ``--weights``, ``--data``, ``--imgsz``, ``--calib-images`` and ``--out`` (default ``out``, the
    script's folder under runs/benchmarks); the first line of the script's docstring is its description."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--imgsz", type=int, default=imgsz)
    parser.add_argument("--calib-images", type=int, default=calib_images)
    parser.add_argument(
        "--out", type=Path, default=Path(out), help=f"output folder, files in it replaced (default: {out})"
    )
    return parser


def add_overflow_fix(parser: argparse.ArgumentParser) -> None:
    """``--overflow-fix``, as ptq_eval takes it: NNCF's 7-bit weight grid on or off, or as this CPU needs."""
    parser.add_argument(
        "--overflow-fix",
        choices=OVERFLOW_FIX,
        default="auto",
        help="openvino: NNCF's overflow fix (7-bit weights); auto: on where this CPU has no VNNI",
    )


def overflow_fix(args: argparse.Namespace) -> bool | None:
    return OVERFLOW_FIX[args.overflow_fix]
