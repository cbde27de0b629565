"""The detector YAMLs this package ships (``qarep_det/model_yamls/``), listed and found by name.

The files are package data, so ``YOLO("yolo_qarep_s.yaml")`` works from any folder once ``qarep_det`` is imported
(``integrations.ultralytics`` resolves the names), exactly as Ultralytics' own ``YOLO("yolov8s.yaml")`` does. In a
source checkout, ``model_yamls/`` at the top is a link to the same folder: one copy, nothing to drift.
"""

from __future__ import annotations

import os
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model_yamls"


def model_yamls() -> list[str]:
    """The file names of the shipped model YAMLs, sorted (``yolo_qarep_n.yaml``, ...)."""
    return sorted(p.name for p in MODEL_DIR.glob("*.yaml"))


def model_yaml(name: str | os.PathLike) -> Path:
    """The shipped YAML called ``name`` (with or without ``.yaml``); ``FileNotFoundError`` listing the names."""
    file = Path(name).name
    path = MODEL_DIR / (file if file.endswith((".yaml", ".yml")) else f"{file}.yaml")
    if not path.is_file():
        raise FileNotFoundError(
            f"no model YAML named '{name}' ships with qarep_det; choose from {', '.join(model_yamls())}"
        )
    return path


def shipped_name(cfg: str | os.PathLike) -> Path | None:
    """The shipped YAML a model argument names when it is not a file: a bare name (``yolo_qarep_s.yaml``) or a
    name under ``model_yamls/`` (the path docs/models.md uses from a checkout), else None. A path that exists wins."""
    path = Path(cfg)
    if path.is_file() or path.suffix not in {".yaml", ".yml"} or path.parent.name not in {"", "model_yamls"}:
        return None
    if len(path.parts) > 2:
        return None
    candidate = MODEL_DIR / path.name
    return candidate if candidate.is_file() else None
