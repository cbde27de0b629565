"""A planted INT8 outlier that FP32 cannot see: a known answer for the per-conv analysis and ``--keep-float``.

In a fused detector, a producer block (conv + ReLU) feeds a consumer conv. The busiest ``fraction`` of the
producer's output channels (largest mean activation on a few images) are scaled by ``2^-exponent`` (their rows of
the fused weight and bias) and the consumer's weights for those input channels by ``2^+exponent``. ReLU is
positively homogeneous (``relu(a z) = a relu(z)`` for ``a > 0``) and powers of two scale floats exactly, so the FP32
output does not change. At INT8 the consumer loses both halves of its input: its one per-tensor input scale, set by
the untouched channels, rounds the shrunken channels to zero, and each per-channel weight scale, set by the grown
weights, rounds the untouched channels' weights to zero. This is how real outliers hurt (values of very different
magnitude sharing one scale), made exact and attributable to one conv; the energy-weighted input and weight SQNRs
barely show it (measured: 31-36 dB), the consumer's output does.

The result is saved as an Ultralytics-style checkpoint holding the fused model in float32: fp16, Ultralytics'
checkpoint default, would flush 2^-12-scaled weights towards zero and change the FP32 model.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import torch
import ultralytics
from torch import nn

from qarep_det.checkpoint import load_detector
from qarep_det.reparam import output_difference, reparameterize_model

MAX_REL_CHANGE = 1e-5  # FP32 output change (relative to its largest value) above which planting is refused


@dataclass(frozen=True)
class PlantedOutlier:
    """Where the outlier sits and the FP32 change it caused (0 when exact), stored in the checkpoint."""

    producer: str
    consumer: str  # the consumer's conv, the one INT8 hurts (e.g. ``model.8.1.conv``)
    channels: tuple[int, ...]
    exponent: int
    fp32_max_rel_change: float


def block_conv(model: nn.Module, name: str) -> tuple[str, nn.Conv2d]:
    """A conv by its own name or by the name of a fused block holding it as ``.conv``."""
    try:
        module = model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"'{name}' is not a module of this model") from e
    if isinstance(module, nn.Conv2d):
        return name, module
    if isinstance(getattr(module, "conv", None), nn.Conv2d):
        return f"{name}.conv", module.conv
    raise ValueError(f"'{name}' is a {type(module).__name__}, neither a Conv2d nor a fused block with a .conv")


@torch.no_grad()
def busiest_channels(model: nn.Module, producer: str, images: torch.Tensor, k: int) -> list[int]:
    """The ``k`` output channels of ``producer`` with the largest mean activation on ``images``, sorted."""
    means: list[torch.Tensor] = []
    handle = model.get_submodule(producer).register_forward_hook(lambda _, __, out: means.append(out.mean((0, 2, 3))))
    try:
        model(images)
    finally:
        handle.remove()
    return sorted(means[0].topk(k).indices.tolist())


@torch.no_grad()
def plant_outlier(
    fused: nn.Module,
    producer: str,
    consumer: str,
    images: torch.Tensor,
    fraction: float = 0.25,
    exponent: int = 12,
) -> tuple[nn.Module, PlantedOutlier]:
    """A float32 copy of the float32 detector ``fused`` with the outlier planted between ``producer`` (a fused
    block) and ``consumer`` (a fused block or conv); ``fused`` is untouched.

    Raises ``ValueError`` for bad names, shapes or arguments, and when the FP32 output on ``images`` changes (the
    producer's output also feeds something else, or its activation is not positively homogeneous like SiLU).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not isinstance(exponent, int) or not 1 <= exponent <= 30:
        raise ValueError(f"exponent must be an int in [1, 30], got {exponent!r}")
    planted = copy.deepcopy(fused).float().eval()
    _, producer_conv = block_conv(planted, producer)
    consumer_name, consumer_conv = block_conv(planted, consumer)
    if producer_conv.bias is None:
        raise ValueError(f"'{producer}' has no fused bias; plant into a fused (re-parameterized) model")
    if consumer_conv.groups != 1 or consumer_conv.in_channels != producer_conv.out_channels:
        raise ValueError(
            f"'{consumer_name}' ({consumer_conv.in_channels} input channels, groups {consumer_conv.groups}) cannot "
            f"consume '{producer}' ({producer_conv.out_channels} channels) one to one"
        )
    k = max(1, round(fraction * producer_conv.out_channels))
    channels = busiest_channels(planted, producer, images, k)
    producer_conv.weight[channels] *= 2.0**-exponent
    producer_conv.bias[channels] *= 2.0**-exponent
    consumer_conv.weight[:, channels] *= 2.0**exponent
    change = output_difference(fused, planted, images).max_rel
    if change > MAX_REL_CHANGE:
        raise ValueError(
            f"planting changed the FP32 output by {change:.3g} (relative): '{producer}' must feed '{consumer_name}' "
            "only, through a positively homogeneous activation such as ReLU"
        )
    return planted, PlantedOutlier(producer, consumer_name, tuple(channels), exponent, change)


def save_planted(
    planted: nn.Module, info: PlantedOutlier, path: str | os.PathLike, images: torch.Tensor, overwrite: bool = False
) -> Path:
    """Write a float32 Ultralytics checkpoint of the planted fused model, then check that it loads with
    :func:`load_detector` and that fusing it again changes nothing (as ptq_eval and diagnose will do)."""
    path = Path(path)
    if path.suffix != ".pt":
        raise ValueError(f"checkpoint path must end with .pt, got '{path}'")
    if path.exists() and not overwrite:
        raise FileExistsError(f"'{path}' exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "model": copy.deepcopy(planted).float().cpu(),
        "ema": None,
        "date": datetime.now().astimezone().isoformat(),
        "version": ultralytics.__version__,
        "planted_outlier": asdict(info),
    }
    torch.save(checkpoint, path)
    diff = output_difference(planted.cpu(), reparameterize_model(load_detector(path)), images.cpu()).max_abs
    if diff != 0:
        path.unlink()
        raise RuntimeError(f"the saved checkpoint does not reproduce the planted model (max abs diff {diff:.3g})")
    return path
