"""Calibration data: N seeded-shuffled TRAIN images, letterboxed exactly like evaluation.

Calibrating on the val split (Ultralytics' default) leaks the test set into the INT8 ranges; calibrating on
differently preprocessed images (plain resize, other size) gives ranges the evaluation never sees. So the draw comes
from the train split, and every image goes through :func:`qarep_det.data.images.load_letterboxed`, the function the
evaluation itself uses. The set is a re-iterable object (not a generator) because some backends walk the data more
than once; images are read lazily so 512 images at 640 px never sit in memory at once.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from qarep_det.checks import check_count
from qarep_det.data.dataset import resolve_dataset
from qarep_det.data.images import list_images, load_letterboxed
from qarep_det.errors import InputError
from qarep_det.quant.recipe import QuantRecipe


def train_images(data: str | Path) -> list[Path]:
    """All images of the TRAIN split named by an Ultralytics data YAML, sorted (so the draw depends only on seed)."""
    info = resolve_dataset(data, split="train")
    images = list_images(info["train"])
    if not images:
        raise InputError(f"no images found in the train split of '{data}' ({info['train']})")
    return images


def draw_calibration_images(images: Sequence[Path], n: int, seed: int = 0) -> list[Path]:
    """Shuffle with ``random.Random(seed)`` and take the first ``n``; warns and uses all when ``n`` > available."""
    if n < 1:
        raise InputError(f"number of calibration images must be >= 1, got {n}")
    pool = sorted(Path(p) for p in images)
    random.Random(seed).shuffle(pool)
    if n > len(pool):
        warnings.warn(
            f"asked for {n} calibration images but only {len(pool)} are available; calibrating on all {len(pool)}",
            stacklevel=2,
        )
    return pool[:n]


@dataclass
class CalibrationSet:
    """Re-iterable batches of letterboxed images: float32 ``(B, 3, imgsz, imgsz)`` RGB in [0, 1].

    Unreadable files are skipped with a warning; an iteration that finds no readable image raises ``ValueError``
    (at its end, so a large set is read only once). ``readable`` counts the images the last complete pass used,
    which is what results should report (None until a pass has finished).
    """

    paths: tuple[Path, ...]
    imgsz: int
    batch_size: int = 8
    progress: bool = True
    desc: str = "calibrating"
    readable: int | None = field(default=None, init=False)

    def __len__(self) -> int:
        """Number of batches if every image is readable."""
        return -(-len(self.paths) // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        pending: list[np.ndarray] = []
        readable = 0
        for path in tqdm(self.paths, desc=self.desc, unit="img", disable=not self.progress, leave=False):
            try:
                chw, _, _ = load_letterboxed(path, self.imgsz)
            except ValueError as err:
                warnings.warn(f"skipping calibration image: {err}", stacklevel=2)
                continue
            readable += 1
            pending.append(chw)
            if len(pending) == self.batch_size:
                yield torch.from_numpy(np.stack(pending))
                pending = []
        if pending:
            yield torch.from_numpy(np.stack(pending))
        if readable == 0:
            raise InputError(f"none of the {len(self.paths)} calibration images could be read")
        self.readable = readable


def calibration_set(
    data: str | Path,
    imgsz: int,
    *,
    n: int = 512,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> CalibrationSet:
    """The calibration set for a data YAML: ``n`` seeded draws from its train split at the evaluation ``imgsz``."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    paths = draw_calibration_images(train_images(data), n, seed)
    return CalibrationSet(tuple(paths), imgsz, batch_size=batch_size, progress=progress)


def recipe_calibration(
    data: str | Path, imgsz: int, recipe: QuantRecipe, *, batch_size: int = 8, progress: bool = True
) -> CalibrationSet:
    """The recipe's calibration draw, ``calib_images`` drawn with its ``seed``: the one set ptq-eval calibrates and
    ranks on, diagnose analyses and QAT starts from, so their figures are of the same images."""
    return calibration_set(
        data, imgsz, n=recipe.calib_images, seed=recipe.seed, batch_size=batch_size, progress=progress
    )


def first_images(batches: Sequence[torch.Tensor], n: int | None) -> Sequence[torch.Tensor]:
    """The first ``n`` images of a calibration set (all for None), as a set of the same kind: a ``CalibrationSet``
    of its first ``n`` paths, or a list of batches cut at ``n`` images. The draw is a seeded shuffle, so its first
    ``n`` are a seeded random subset, the same whatever the set's size."""
    if n is None:
        return batches
    check_count("number of images", n)
    if isinstance(batches, CalibrationSet):
        return replace(batches, paths=batches.paths[:n])
    out, left = [], n
    for batch in batches:
        if left <= 0:
            break
        out.append(batch[:left])
        left -= out[-1].shape[0]
    return out
