"""The arguments every benchmark script shares: one checkpoint, its data, the image size and the calibration draw."""

from __future__ import annotations

import argparse
from pathlib import Path


def benchmark_parser(doc: str | None, imgsz: int, calib_images: int) -> argparse.ArgumentParser:
    """A parser with ``--weights``, ``--data``, ``--imgsz``, ``--calib-images`` and ``--out``; the first line of the
    script's docstring is its description."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--imgsz", type=int, default=imgsz)
    parser.add_argument("--calib-images", type=int, default=calib_images)
    parser.add_argument("--out", type=Path, required=True)
    return parser
