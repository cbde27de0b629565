"""The post-training INT8 recipe: one frozen description shared by every backend.

The reference scheme is TensorRT's, the one YOLOv6 used for its published QARepVGG numbers: INT8 symmetric (zero
point 0), per-output-channel weight scales, one per-tensor scale for the input of every ``Conv2d``. What stays
float is fixed, not configurable: the box decode, the DFL (its constant 1x1 conv is part of decode), the sigmoid and
the box/score concat, because pixel-scale boxes and 0-1 scores cannot share one INT8 grid. Whether the ``Detect``
head's own convs are quantized is an explicit option, since papers differ and the result table must say. Partial
quantization keeps named convs float (``float_layers``), e.g. the few a sensitivity ranking blames for most of the
INT8 loss; every backend reads them through :mod:`qarep_det.quant.scope`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from qarep_det.errors import InputError

CalibMethod = Literal["max", "percentile", "mse", "entropy"]
CALIB_METHODS: tuple[str, ...] = ("max", "percentile", "mse", "entropy")


@dataclass(frozen=True, kw_only=True)
class QuantRecipe:
    """How to calibrate and what to quantize; validated on construction so a typo fails before calibration.

    ``calib_method`` picks the activation range estimator (weights always use their per-channel max, as TensorRT
    does): ``max`` = global abs-max, ``percentile`` = that percentile of |x| over the calibration histogram,
    ``mse`` / ``entropy`` = the histogram range that minimises quantization MSE / KL divergence. ``float_layers``
    names ``Conv2d`` modules of the fused model (e.g. ``model.8.1.conv``) that stay float; whether they exist is
    checked against the model by :func:`qarep_det.quant.scope.check_float_layers`.
    """

    calib_method: CalibMethod = "max"
    percentile: float = 99.99
    quantize_head: bool = True
    calib_images: int = 512
    seed: int = 0
    float_layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "float_layers", tuple(self.float_layers))  # a list from a CLI or JSON is fine too
        if not all(isinstance(name, str) and name for name in self.float_layers):
            raise InputError(f"float_layers must be conv module names, got {self.float_layers!r}")
        if len(set(self.float_layers)) != len(self.float_layers):
            raise InputError(f"float_layers names a conv twice: {self.float_layers!r}")
        if self.calib_method not in CALIB_METHODS:
            raise InputError(f"calib_method must be one of {CALIB_METHODS}, got {self.calib_method!r}")
        if not 0.0 < self.percentile <= 100.0:
            raise InputError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.calib_images < 1:
            raise InputError(f"calib_images must be >= 1, got {self.calib_images}")

    def describe(self) -> str:
        """One line for result tables, e.g. ``int8 w:per-channel a:per-tensor max, head int8, 512 imgs, seed 0``,
        naming the convs kept float (up to three, else their count)."""
        method = f"percentile {self.percentile:g}" if self.calib_method == "percentile" else self.calib_method
        head = "head int8" if self.quantize_head else "head float"
        kept = ""
        if n := len(self.float_layers):
            names = f" ({', '.join(self.float_layers)})" if n <= 3 else ""
            kept = f", {n} conv{'s' if n > 1 else ''} kept float{names}"
        return f"int8 sym w:per-channel a:per-tensor {method}, {head}{kept}, {self.calib_images} imgs, seed {self.seed}"

    def to_dict(self) -> dict[str, object]:
        """Plain dict for JSON result files."""
        return asdict(self)
