"""YOLO label files, read with one set of rules by the training checks and by evaluation's ground truth.

Hand-written rather than Ultralytics' ``verify_image_label`` because that one also verifies (and may rewrite) the
image file, and neither a check nor an evaluation may touch user data; and because it skips a whole image with a
warning on a bad row, where we fail naming the file and line (a silently dropped image trains less and inflates
mAP). The rules are Ultralytics': a row is ``class x y w h`` (normalized), a pose row ``class x y w h`` plus keypoint
fields, or a polygon ``class x1 y1 x2 y2 ...`` (odd length, at least 7), which counts as its bounding box; a file
holds boxes or polygons, not both; duplicate rows count once; a missing file means an image without objects.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from ultralytics.utils.ops import segments2boxes

from qarep_det.errors import InputError

COORD_TOLERANCE = 0.01  # Ultralytics accepts normalized coordinates slightly outside 0..1


def _row_problem(row: list[str], nc: int, single_cls: bool, box_fields: frozenset[int]) -> str | None:
    """Why one row breaks the rules, or None."""
    if len(row) not in box_fields and (len(row) < 7 or len(row) % 2 == 0):
        return f"{len(row)} fields, expected 'class x y w h' or a polygon 'class x1 y1 x2 y2 ...'"
    try:
        cls, *coords = map(float, row)
    except ValueError:
        return f"not a number in '{' '.join(row)}'"
    if not (math.isfinite(cls) and cls == int(cls) and (single_cls or 0 <= cls < nc)):
        return f"class {row[0]} is not an integer in 0..{nc - 1} (the dataset has {nc})"
    low, high = -COORD_TOLERANCE, 1 + COORD_TOLERANCE
    if not all(low <= v <= high for v in (coords[:4] if len(row) in box_fields else coords)):  # NaN fails too
        return f"coordinates must be normalized to 0..1: '{' '.join(row)}'"
    return None


def read_yolo_label(
    path: str | os.PathLike, nc: int, single_cls: bool = False, keypoint_fields: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Classes ``(N,)`` and normalized xywh boxes ``(N, 4)`` of one label file (duplicates once; a missing file: no
    objects). ``keypoint_fields`` is ``nkpt * ndim`` for pose labels, whose boxes are read.

    Raises ``ValueError`` naming the file and line of the first row that breaks the rules (module docstring).
    """
    path = Path(path)
    if not path.is_file():
        return np.zeros(0, dtype=np.int64), np.zeros((0, 4), dtype=np.float32)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"label file '{path}' cannot be read: {' '.join(str(e).split())}") from e
    box_fields = frozenset({5, 5 + keypoint_fields})
    labels, kinds = [], set()
    for n, line in enumerate(lines, 1):
        row = line.split()
        if not row:
            continue
        if problem := _row_problem(row, nc, single_cls, box_fields):
            raise InputError(f"label file '{path}' line {n}: {problem}")
        values = np.array(row, dtype=np.float32)
        is_box = len(row) in box_fields
        kinds.add(is_box)
        box = values[1:5] if is_box else segments2boxes([values[1:].reshape(-1, 2)])[0]
        labels.append(np.concatenate([values[:1], box]))
    if len(kinds) > 1:
        raise InputError(f"label file '{path}' mixes boxes and polygons")
    if not labels:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 4), dtype=np.float32)
    unique = np.unique(np.stack(labels), axis=0)
    return unique[:, 0].astype(np.int64), unique[:, 1:]
