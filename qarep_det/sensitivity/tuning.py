"""The tuning set of ``ptq_eval --max-drop``: labelled images on which each candidate's INT8 drop is measured.

Never the scored split: choosing how many convs stay float by their drop on the val split would report the very
drop the choice was fitted to, an optimistic one. Never the calibration images either: the ranges were fitted on
those. By default the set is the next images of calibration's own seeded shuffle of the train split (so the two
are disjoint by construction, whatever their sizes), letterboxed like evaluation and scored against their YOLO
labels by the same pycocotools code as the val split; a named split of the data YAML can stand in for train. Train
images flatter FP32 and INT8 alike (the model has seen them), so the drop between the two is what they measure.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qarep_det.checks import check_count
from qarep_det.data.dataset import resolve_dataset
from qarep_det.data.images import list_images
from qarep_det.errors import InputError
from qarep_det.evaluation.coco import GroundTruth, ground_truth_from_labels
from qarep_det.quant.calibration import train_images

SCORED_SPLIT = "val"  # the split ptq_eval reports


@dataclass(frozen=True)
class TuningSet:
    """The tuning images with their ground truth, and where they were drawn from."""

    ground_truth: GroundTruth
    split: str
    requested: int

    @property
    def images(self) -> int:
        return len(self.ground_truth.image_files)

    def describe(self) -> str:
        return f"{self.images} {self.split} images (neither calibration nor {SCORED_SPLIT} images)"


def _real(paths: Iterable[str | os.PathLike]) -> set[str]:
    """Paths as the file system resolves them, so a split reached through a link or another spelling still
    counts as the same images."""
    return {os.path.realpath(p) for p in paths}


def tuning_set(
    data: str | os.PathLike,
    n: int,
    *,
    seed: int,
    calibration: Iterable[str | os.PathLike],
    scored: Iterable[str | os.PathLike],
    split: str = "train",
) -> TuningSet:
    """``n`` images of ``split`` (default train) that are neither ``calibration`` nor ``scored`` images, in the
    order of ``random.Random(seed)``'s shuffle of the sorted split: for train, calibration's own shuffle, whose first
    images are the calibration draw. Fewer left than ``n``: all of them, with a warning that says how many.
    ``ValueError`` (one line) for the scored split, a missing split, no image left, or no labelled box."""
    check_count("number of tuning images", n)
    if split == SCORED_SPLIT:
        raise InputError(f"the tuning set cannot be the scored '{SCORED_SPLIT}' split: its drop would be optimistic")
    if split == "train":
        pool = train_images(data)
    else:
        info = resolve_dataset(data)
        if not info.get(split):
            raise InputError(f"the data has no '{split}' split to tune on")
        entries = info[split] if isinstance(info[split], list) else [info[split]]
        pool = list_images([Path(info["path"]) / e for e in entries])  # Ultralytics resolves only its own splits
    pool = sorted(Path(p) for p in pool)
    random.Random(seed).shuffle(pool)
    taken = _real(calibration) | _real(scored)
    left = [p for p in pool if os.path.realpath(p) not in taken]
    if len(left) == 1 or n == 1:
        raise InputError("a tuning set needs at least 2 images: its drop's standard error is a spread over images")
    if not left:
        raise InputError(
            f"no {split} image is left for tuning: all {len(pool)} are calibration or {SCORED_SPLIT} images; "
            "give fewer --calib-images or name another split with --tune-split"
        )
    if len(left) < n:
        warnings.warn(
            f"asked for {n} tuning images but only {len(left)} {split} images are neither calibration nor "
            f"{SCORED_SPLIT} images; tuning on those {len(left)}",
            stacklevel=2,
        )
    names = resolve_dataset(data)["names"]
    names = list(names.values()) if isinstance(names, dict) else list(names)
    ground_truth = ground_truth_from_labels(left[:n], names)
    if not ground_truth.annotations["annotations"]:
        raise InputError(f"the {len(left[:n])} tuning images have no labelled box: their mAP is undefined")
    return TuningSet(ground_truth, split, n)
