"""How finely a set of images resolves an INT8 drop: the drop's standard error, from the per-image AP.

A drop measured on n images is itself a measurement, and a target below its noise is met or missed by the images
drawn as much as by the model. The estimate is paired: the same images scored by both models, one difference per
image, ``se = stdev(fp32_i - int8_i) / sqrt(n)``. Pairing cancels what each image brings to both scores (its own
difficulty: AP ranges over images from 0 to 100 for FP32 and INT8 alike), leaving the spread of what quantization
changed; two unpaired errors would charge the drop with the images' difficulty twice.

It is the standard error of the mean per-image AP50-95 difference, a proxy for the noise of the set's mAP50-95 drop:
COCO's mAP pools detections over images before averaging over categories, so it is not a mean over images, but it
moves with the same per-image differences.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from qarep_det.errors import InputError


@dataclass(frozen=True)
class Resolution:
    """The standard error of a drop (mAP50-95 points) measured on ``images`` images."""

    standard_error: float
    images: int

    @classmethod
    def paired(cls, fp32: Sequence[float], int8: Sequence[float]) -> Resolution:
        """From the per-image AP of the same images (same order) under FP32 and under INT8."""
        if len(fp32) != len(int8):
            raise ValueError(f"paired per-image values differ in length: {len(fp32)} FP32, {len(int8)} INT8")
        if len(fp32) < 2:
            raise InputError(f"a standard error needs at least 2 images, got {len(fp32)}")
        differences = [a - b for a, b in zip(fp32, int8, strict=True)]
        return cls(statistics.stdev(differences) / math.sqrt(len(differences)), len(differences))

    def resolves(self, max_drop: float) -> bool:
        """Whether a target drop is at least 2 standard errors (D = 0 only when the error is 0)."""
        return max_drop >= 2 * self.standard_error

    def images_needed(self, max_drop: float) -> int | None:
        """How many images would bring 2 standard errors down to ``max_drop`` (the error shrinks as 1/sqrt(n));
        None for D = 0 with any error, which no number of images resolves."""
        if self.standard_error == 0:
            return 0
        if max_drop <= 0:
            return None
        return math.ceil(self.images * (2 * self.standard_error / max_drop) ** 2)
