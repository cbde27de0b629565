"""What a training run on Ultralytics' trainer takes, and the checks that fail bad input in one line.

Shared by ``tools/train.py`` and ``tools/qat.py``: the training recipe, the options both tools' flags describe, and
the checks of everything a user can get wrong (files, dataset layout, every label row, device, settings), run before
the trainer exists, so bad input fails with one ``InputError`` line and nothing is written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ultralytics.data.utils import img2label_paths
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils import DEFAULT_CFG_DICT, LOGGER

from qarep_det.checks import check_count, check_imgsz
from qarep_det.data.dataset import resolve_dataset
from qarep_det.data.images import list_images
from qarep_det.data.labels import read_yolo_label
from qarep_det.device import process_count, resolve_device
from qarep_det.errors import InputError, one_line
from qarep_det.nn import RepVGGBlock

# YOLOv6-S's solver (its configs/yolov6s.py) and its train.py default of 15 final epochs without mosaic. The
# optimizer is pinned: Ultralytics' default 'auto' picks MuSGD for a COCO-length run and then ignores lr0.
RECIPE: dict[str, Any] = {
    "optimizer": "SGD",
    "lr0": 0.01,
    "lrf": 0.01,  # final lr = lr0 * lrf
    "cos_lr": True,  # YOLOv6's 'Cosine' schedule (Ultralytics' default is linear)
    "momentum": 0.937,
    "weight_decay": 5e-4,  # Ultralytics scales it by batch * accumulate / 64, as YOLOv6 does
    "warmup_epochs": 3.0,
    "warmup_momentum": 0.8,
    "warmup_bias_lr": 0.1,
    "close_mosaic": 15,
}

# QAT is fine-tuning, not training: ModelOpt's guidance is 1-10% of the schedule at a small learning rate. Adam
# rather than the training recipe's SGD: a fused model's weights and ranges span orders of magnitude, which SGD's
# steps do not (docs/qat.md: SGD broke a planted model within steps). No warmup: Ultralytics' warmup starts biases at
# lr 0.1, which would undo a trained model. No mosaic (as in the recipe's last epochs). FP32, not AMP: float16
# activations would add rounding noise that the INT8 engine does not have, on top of the simulated quantization.
# Both QAT paths use it: tools/qat.py on top of RECIPE, Ultralytics' quantize=8 where the user set nothing else.
QAT_FINE_TUNING: dict[str, Any] = {
    "optimizer": "Adam",
    "lr0": 1e-5,
    "warmup_epochs": 0.0,
    "mosaic": 0.0,
    "close_mosaic": 0,
    "amp": False,
}

QAT_LR0: dict[str, float] = {"Adam": 1e-5, "SGD": 1e-4}
"""QAT's lr0 per optimizer. SGD's 1e-4 is 1% of the training recipe's lr0; Adam's 1e-5 is the top of NVIDIA's
yolov7_qat range (1e-6..1e-5)."""

# Ultralytics settings that have a TrainOptions field (a tools/train.py flag) of their own: --hyp may not set them.
OPTION_FLAGS: dict[str, str] = {
    "model": "--cfg",
    "data": "--data",
    "epochs": "--epochs",
    "imgsz": "--imgsz",
    "batch": "--batch",
    "device": "--device",
    "workers": "--workers",
    "project": "--project",
    "name": "--name",
    "exist_ok": "--exist-ok",
    "resume": "--resume",
    "pretrained": "--weights",
    "seed": "--seed",
    "save_dir": "--project/--name",
    "task": "(always 'detect')",
    "mode": "(always 'train')",
}


@dataclass
class RunOptions:
    """What every training run takes: data, schedule, hardware and where the run goes (tool flags of the same names)."""

    data: Path | None = None
    epochs: int = 300
    imgsz: int = 640
    batch: int = 32
    device: str = "auto"  # '0' if CUDA is available else 'cpu'; on resume, the run's own device
    workers: int = 8
    project: Path = Path("runs/train")
    name: str = "exp"
    exist_ok: bool = False
    resume: Path | bool = False  # True: the newest last.pt under project
    seed: int = 0


@dataclass
class TrainOptions(RunOptions):
    """One training run, as ``tools/train.py`` flags describe it (see that tool's ``--help`` for each field)."""

    cfg: Path | None = None
    weights: Path | None = None
    hyp: Path | Mapping[str, Any] | None = None  # extra Ultralytics settings: a YAML file or a mapping
    rep_l2: str = "plain"  # ignored on resume: the run's own choice is read from its checkpoint


def train_device(device: str) -> str:
    """``--device`` in Ultralytics' form, or ``InputError`` (see :func:`qarep_det.device.resolve_device`)."""
    try:
        return resolve_device(device)
    except ValueError as e:
        raise InputError(f"--{e}") from e


def load_hyp(hyp: Path | Mapping[str, Any] | None) -> dict[str, Any]:
    """Extra Ultralytics settings from a YAML file or mapping, checked for unknown keys and keys flags own."""
    if hyp is None:
        return {}
    if isinstance(hyp, Mapping):
        values: Any = dict(hyp)
    else:
        path = Path(hyp)
        if not path.is_file():
            raise InputError(f"--hyp file '{path}' not found")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise InputError(f"--hyp file '{path}' is not valid YAML: {one_line(e)}") from e
        if not isinstance(values, dict):
            raise InputError(f"--hyp file '{path}' must map Ultralytics setting names to values")
    unknown = sorted(str(k) for k in values if k not in DEFAULT_CFG_DICT)
    if unknown:
        raise InputError(f"--hyp: unknown Ultralytics setting(s): {', '.join(unknown)}")
    owned = sorted(k for k in values if k in OPTION_FLAGS)
    if owned:
        flags = ", ".join(f"{k} {OPTION_FLAGS[k]}" for k in owned)
        raise InputError(f"--hyp may not set what a flag sets: {flags}")
    return values


def check_dataset(data: Path, single_cls: bool = False) -> dict[str, Any]:
    """Check a data YAML as the trainer will read it, and its images and labels; returns Ultralytics' data dict.

    Every label file is read with the rules evaluation uses (:func:`qarep_det.data.labels.read_yolo_label`; cheap
    enough for COCO train2017, docs/coco.md), so that a bad row fails here, naming the file and line, instead of
    Ultralytics skipping its image with a warning.
    """
    data = Path(data)
    if not data.is_file():
        raise InputError(f"data file '{data}' not found")
    try:
        raw = yaml.safe_load(data.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise InputError(f"data file '{data}' is not valid YAML: {one_line(e)}") from e
    if not isinstance(raw, dict):
        raise InputError(f"data file '{data}' is not a YAML mapping")
    for split, aliases in (("train", ("train",)), ("val", ("val", "validation"))):
        if not any(raw.get(k) for k in aliases):
            raise InputError(f"data file '{data}' has no '{split}:' entry ('train' and 'val' are required)")
    try:
        info = resolve_dataset(data)  # resolves paths exactly as the trainer will, never downloading
    except Exception as e:
        raise InputError(f"data file '{data}': {one_line(e)}") from e
    nkpt, ndim = info.get("kpt_shape") or (0, 0)  # pose labels train a detector on their boxes
    for split in ("train", "val"):
        try:
            images = list_images(info[split])
        except FileNotFoundError as e:
            raise InputError(f"data file '{data}', {split}: {one_line(e)}") from e
        if not images:
            raise InputError(f"data file '{data}', {split}: no images in {info[split]}")
        LOGGER.info(f"Checking the labels of {len(images)} {split} images...")
        for label in img2label_paths([str(p) for p in images]):
            if os.path.isfile(label):
                try:
                    read_yolo_label(label, info["nc"], single_cls, keypoint_fields=nkpt * ndim)
                except ValueError as e:
                    raise InputError(str(e)) from e
    return info


def check_model_cfg(cfg: Path, data: Mapping[str, Any], rep_l2: str) -> None:
    """Build the model once (the trainer would fail only after creating the run directory)."""
    cfg = Path(cfg)
    if cfg.suffix not in {".yaml", ".yml"}:
        raise InputError(f"model cfg '{cfg}' must be a model YAML (fine-tune a checkpoint with --weights)")
    try:
        model = DetectionModel(str(cfg), nc=data["nc"], ch=data["channels"], verbose=False)
    except FileNotFoundError:
        raise InputError(f"model cfg '{cfg}' not found (a file, or the name of a shipped YAML)") from None
    except Exception as e:
        raise InputError(f"model cfg '{cfg}': {one_line(e)}") from e
    if rep_l2 == "custom" and not any(isinstance(m, RepVGGBlock) for m in model.modules()):
        raise InputError(f"--rep-l2 custom acts on RepVGGBlock layers and '{cfg}' has none")


def check_run_settings(options: RunOptions) -> str:
    """Check the settings every new run shares; returns the device in Ultralytics' form."""
    try:
        check_count("--epochs", options.epochs)
        check_count("--batch", options.batch)
        check_count("--workers", options.workers, 0)
        check_imgsz(options.imgsz, "--imgsz")
    except ValueError as e:
        raise InputError(str(e)) from e
    device = train_device(options.device)
    if options.batch % process_count(device):
        raise InputError(f"--batch {options.batch} must be a multiple of the number of devices in {device}")
    return device


def run_overrides(options: RunOptions, device: str) -> dict[str, Any]:
    """The Ultralytics settings a new run takes from its shared options (paths resolved)."""
    return {
        "task": "detect",
        "mode": "train",
        "data": str(Path(options.data).resolve()),
        "epochs": options.epochs,
        "imgsz": options.imgsz,
        "batch": options.batch,
        "device": device,
        "workers": options.workers,
        "project": str(Path(options.project).resolve()),  # Ultralytics nests relative ones under its runs_dir
        "name": options.name,
        "exist_ok": options.exist_ok,
        "seed": options.seed,
    }


def checkpoint_to_resume(options: RunOptions) -> Path:
    """The last.pt that ``options.resume`` names, or the newest one under ``options.project``."""
    if options.resume is True:
        project = Path(options.project).resolve()
        runs = sorted(project.glob("*/weights/last.pt"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise InputError(f"--resume: no run with weights/last.pt under '{project}'")
        return runs[-1]
    last = Path(options.resume)
    if not last.is_file():
        raise InputError(f"--resume: checkpoint '{last}' not found")
    return last.resolve()
