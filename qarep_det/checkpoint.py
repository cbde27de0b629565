"""Load a trained detector checkpoint with one clear error for each way it can be wrong."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ultralytics.nn.modules import Detect
from ultralytics.nn.tasks import DetectionModel, load_checkpoint

from qarep_det.quant.simulated import modelopt_quiet


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
        raise ValueError(f"weights '{path}' must be an Ultralytics .pt checkpoint")
    try:
        with modelopt_quiet():  # a QAT checkpoint: Ultralytics re-applies its ModelOpt quantization
            model, _ = load_checkpoint(path)
    except Exception as e:  # torch.load fails in many ways on a corrupt file; all mean "unreadable"
        first_line = next((line for line in str(e).splitlines() if line.strip()), "")
        raise ValueError(f"cannot read weights '{path}': {type(e).__name__}: {first_line.strip()}") from e
    if not isinstance(model, DetectionModel) or type(model.model[-1]) is not Detect:
        raise ValueError(f"weights '{path}' hold a {type(model).__name__}, not an Ultralytics Detect detector")
    return model.eval()


def checkpoint_paths(weights: Sequence[str | os.PathLike]) -> list[Path]:
    """``weights`` as paths, checked before a tool spends minutes on the first one: ``ValueError`` for none,
    ``FileNotFoundError`` naming the first missing file."""
    paths = [Path(w) for w in weights]
    if not paths:
        raise ValueError("no weights given")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"weights '{path}' not found")
    return paths
