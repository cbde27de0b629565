"""Deploy export: re-parameterize, prove the fused model equals the trained one on real images, then export.

The export itself is Ultralytics' exporter (ONNX, OpenVINO) run on the already fused model, so the file holds
exactly the graph that was checked. Unlike Ultralytics' own export, an existing output is never replaced
unless ``overwrite=True``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
from ultralytics import YOLO
from ultralytics.utils import ASSETS

from qarep_det.data.dataset import resolve_dataset
from qarep_det.data.images import list_images, load_letterboxed
from qarep_det.errors import InputError
from qarep_det.reparam import OutputDifference, output_difference, reparameterize_model
from qarep_det.ultralytics.checkpoint import load_detector

FORMATS = ("onnx", "openvino")
FUSION_TOLERANCE = 1e-4  # max relative output difference accepted between fused and unfused models


class FusionMismatchError(RuntimeError):
    """The fused model does not reproduce the trained one: exporting it would ship a different model."""


def check_images(data: str | os.PathLike | None, n: int = 8) -> list[Path]:
    """Real images to check fusion on: the first ``n`` of the data's val split, else Ultralytics' sample images."""
    if data is None:
        return list_images(ASSETS)[:n]
    files = list_images(resolve_dataset(data)["val"])[:n]
    if not files:
        raise InputError(f"no images in the val split of '{data}'")
    return files


def check_fusion(model: torch.nn.Module, fused: torch.nn.Module, images: list[Path], imgsz: int) -> OutputDifference:
    """Worst difference of ``fused`` vs ``model`` on ``images``; raises ``FusionMismatchError`` above tolerance."""
    batch = torch.from_numpy(np.stack([load_letterboxed(p, imgsz)[0] for p in images]))
    diff = output_difference(model, fused, batch)
    if diff.max_rel > FUSION_TOLERANCE:
        raise FusionMismatchError(f"fused model differs from the trained one ({diff}); tolerance {FUSION_TOLERANCE}")
    return diff


def export_path(weights: Path, fmt: str) -> Path:
    """Where Ultralytics' exporter writes ``fmt`` for ``weights`` (a file for ONNX, a folder for OpenVINO)."""
    return weights.with_suffix(".onnx") if fmt == "onnx" else weights.with_name(f"{weights.stem}_openvino_model")


def export(
    weights: str | os.PathLike,
    fmt: str = "onnx",
    imgsz: int = 640,
    data: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> tuple[Path, OutputDifference]:
    """Fuse the detector in ``weights``, check it on real images, export it as ``fmt``; returns (path, difference)."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format '{fmt}'; choose from {', '.join(FORMATS)}")
    weights = Path(weights)
    model = load_detector(weights)
    target = export_path(weights, fmt)
    if target.exists() and not overwrite:
        raise FileExistsError(f"'{target}' exists; pass overwrite=True (--overwrite) to replace it")
    fused = reparameterize_model(model)
    diff = check_fusion(model, fused, check_images(data), imgsz)
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    yolo = YOLO(weights, task="detect")
    yolo.model = fused
    out = yolo.export(format=fmt, imgsz=imgsz, half=False, int8=False, dynamic=False, verbose=False)
    return Path(out), diff
