"""Detector checkpoints: load one with one clear error for each way it can be wrong, load and fuse one once for the
report tools, name one, save one exactly."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import ultralytics
from torch import nn
from ultralytics.nn.modules import Detect
from ultralytics.nn.tasks import DetectionModel, load_checkpoint

from qarep_det.errors import InputError
from qarep_det.quant.backends.simulated import modelopt_quiet
from qarep_det.quant.qat import QATDetectionModel, qat_student
from qarep_det.reparam import output_difference, reparameterize_model


def load_detector(weights: str | os.PathLike) -> DetectionModel:
    """Load an Ultralytics detection checkpoint (``.pt``) as an FP32 model in eval mode (a QAT checkpoint: its
    fake-quantized student, as Ultralytics restores it).

    Raises ``FileNotFoundError`` for a missing file (before Ultralytics could try to download a file of that
    name) and ``ValueError`` for a corrupt file or a checkpoint that does not hold a detector.
    """
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights '{path}' not found")
    if path.suffix != ".pt":
        raise InputError(f"weights '{path}' must be an Ultralytics .pt checkpoint")
    try:
        with modelopt_quiet():  # a QAT checkpoint: Ultralytics re-applies its ModelOpt quantization
            model, _ = load_checkpoint(path)
    except Exception as e:  # torch.load fails in many ways on a corrupt file; all mean "unreadable"
        first_line = next((line for line in str(e).splitlines() if line.strip()), "")
        raise InputError(f"cannot read weights '{path}': {type(e).__name__}: {first_line.strip()}") from e
    if not isinstance(model, DetectionModel) or type(model.model[-1]) is not Detect:
        raise InputError(f"weights '{path}' hold a {type(model).__name__}, not an Ultralytics Detect detector")
    return model.eval()


def model_name(weights: Path) -> str:
    """A readable name for a checkpoint: the run folder for Ultralytics' ``RUN/weights/best.pt``, else the stem."""
    return weights.parent.parent.name if weights.parent.name == "weights" else weights.stem


@dataclass(frozen=True)
class FusedCheckpoint:
    """A checkpoint loaded and fused once, for everything a report tool does with it."""

    path: Path
    fused: DetectionModel | None  # the FP32 model, fused (a QAT checkpoint's: its start); None when unknown
    student: DetectionModel | None  # a QAT checkpoint's fine-tuned fake-quantized model, fused; None for an FP32 one

    @property
    def name(self) -> str:
        return model_name(self.path)

    @property
    def ours(self) -> bool:
        """Whether a QAT student is qarep_det's (its recipe and FP32 reference stored), not Ultralytics' quantize=8."""
        return _carries_fp32(self.student)


def _carries_fp32(student: nn.Module | None) -> bool:
    """Whether a QAT student is qarep_det's: it carries its recipe and the FP32 model it started from."""
    return isinstance(student, QATDetectionModel) and student.fp32_reference is not None


def load_fused(weights: str | os.PathLike, fp32_weights: str | os.PathLike | None = None) -> FusedCheckpoint:
    """:func:`load_detector`, then re-parameterize it; raises as :func:`load_detector` does.

    A QAT checkpoint of qarep_det's brings its FP32 reference. One of Ultralytics' own ``quantize=8`` has none: its
    FP32 model is ``fp32_weights`` (e.g. the checkpoint the run started from) or unknown (None), and its student is
    fused as Ultralytics' export fuses it (BatchNorm folded, weight ranges rescaled along).
    """
    model = load_detector(weights)
    student = qat_student(model)
    if student is None:
        return FusedCheckpoint(Path(weights), reparameterize_model(model), None)
    if _carries_fp32(student):
        return FusedCheckpoint(Path(weights), reparameterize_model(student.fp32_reference), student)
    fp32 = None if fp32_weights is None else reparameterize_model(load_detector(fp32_weights))
    return FusedCheckpoint(Path(weights), fp32, reparameterize_model(student))


def checkpoint_paths(weights: Sequence[str | os.PathLike]) -> list[Path]:
    """``weights`` as paths, checked before a tool spends minutes on the first one: ``ValueError`` for none,
    ``FileNotFoundError`` naming the first missing file."""
    paths = [Path(w) for w in weights]
    if not paths:
        raise InputError("no weights given")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"weights '{path}' not found")
    return paths


def save_detector(
    model: nn.Module,
    path: str | os.PathLike,
    images: torch.Tensor,
    overwrite: bool = False,
    **extra: Any,
) -> Path:
    """Write a float32 Ultralytics checkpoint of a detector, fused or in training form (``extra`` keys stored beside
    it), then check that it loads with :func:`load_detector` and fuses to what ``model`` fuses to on ``images`` (as
    ptq_eval, diagnose and QAT will fuse it); a checkpoint that fails the check is deleted. Float32 because
    Ultralytics' fp16 default would flush small weights, e.g. a planted outlier's (``quant.planted``).
    """
    path = Path(path)
    if path.suffix != ".pt":
        raise InputError(f"checkpoint path must end with .pt, got '{path}'")
    if path.exists() and not overwrite:
        raise FileExistsError(f"'{path}' exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "model": copy.deepcopy(model).float().cpu(),
        "ema": None,
        "date": datetime.now().astimezone().isoformat(),
        "version": ultralytics.__version__,
        **extra,
    }
    torch.save(checkpoint, path)
    reference, loaded = (reparameterize_model(m.cpu()) for m in (model, load_detector(path)))
    diff = output_difference(reference, loaded, images.cpu()).max_abs
    if diff != 0:
        path.unlink()
        raise RuntimeError(f"the saved checkpoint does not reproduce the model (max abs diff {diff:.3g})")
    return path
