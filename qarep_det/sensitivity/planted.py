"""A planted INT8 outlier that FP32 cannot see: a known answer for the per-conv analysis and ``--keep-float``.

In a fused detector, a producer block (conv + ReLU) feeds a consumer conv. The busiest ``fraction`` of the
producer's output channels (largest mean activation on a few images) are scaled by ``2^-exponent`` (their rows of
the fused weight and bias) and the consumer's weights for those input channels by ``2^+exponent``. ReLU is
positively homogeneous (``relu(a z) = a relu(z)`` for ``a > 0``) and powers of two scale floats exactly, so the FP32
output does not change. At INT8 the consumer loses both halves of its input: its one per-tensor input scale, set by
the untouched channels, rounds the shrunken channels to zero, and each per-channel weight scale, set by the grown
weights, rounds the untouched channels' weights to zero. This is how real outliers hurt (values of very different
magnitude sharing one scale), made exact and attributable to one conv; the energy-weighted input and weight SQNRs
barely show it, the consumer's output does.

The producer's activation must be positively homogeneous: ReLU and LeakyReLU qualify (``lrelu(a z) = a lrelu(z)``),
SiLU does not and is refused before anything is changed. The planted model is saved by
:func:`qarep_det.ultralytics.checkpoint.save_detector` in float32: fp16, Ultralytics' checkpoint default, would flush
2^-12-scaled weights towards zero and change the FP32 model.

The same outlier can be planted into the training form, for what starts from an unfused checkpoint (QAT, Ultralytics'
``quantize=8``): the BatchNorms that end the producer's sum (QARep's post-BN; every branch BN of a RepVGG block or a
conv-BN) take the 2^-exponent on their weight and bias, and every conv of a consumer without an identity branch the
2^+exponent on its input channels. Fusing that model gives the outlier the fused form would have had.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from qarep_det.errors import InputError
from qarep_det.nn import Reparameterizable, positively_homogeneous
from qarep_det.reparam import output_difference

MAX_REL_CHANGE = 1e-5  # FP32 output change (relative to its largest value) above which planting is refused


@dataclass(frozen=True)
class PlantedOutlier:
    """Where the outlier sits and the FP32 change it caused (0 when exact), stored in the checkpoint."""

    producer: str
    consumer: str  # the consumer's conv, the one INT8 hurts (e.g. ``model.8.1.conv``)
    channels: tuple[int, ...]
    exponent: int
    fp32_max_rel_change: float


def named_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` with a one-line ``ValueError`` for a wrong name."""
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise InputError(f"'{name}' is not a module of this model") from e


def output_scaled(block: nn.Module, name: str) -> list[torch.Tensor]:
    """The tensors whose rows are a producer's pre-activation output channels: a fused block's conv weight and bias,
    or the BatchNorms that end a training-form block's sum (QARep's post-BN; each branch BN of RepVGG or conv-BN)."""
    conv = getattr(block, "conv", None)
    if isinstance(conv, nn.Conv2d) and conv.bias is not None:
        return [conv.weight, conv.bias]
    bns = block.branch_bns() if isinstance(block, Reparameterizable) else {}
    if not bns:
        raise InputError(f"'{name}' is a {type(block).__name__}, neither a fused block nor a training-form one of ours")
    ends = [bns["post"]] if "post" in bns else list(bns.values())
    return [t for bn in ends for t in (bn.weight, bn.bias)]


def input_scaled(block: nn.Module, name: str) -> list[torch.Tensor]:
    """The conv weights through which a consumer (a conv, a fused block, or a training-form block without an
    identity: an identity would pass the shrunken channels on unscaled) reads its input, input channels on dim 1."""
    if isinstance(block, Reparameterizable) and not block.fused and getattr(block, "has_identity", False):
        raise InputError(f"'{name}' has an identity branch, which would pass the planted channels on unscaled")
    weights = [m.weight for m in block.modules() if isinstance(m, nn.Conv2d)]  # a bare conv: itself
    if not weights:
        raise InputError(f"'{name}' is a {type(block).__name__} without a conv to consume with")
    return weights


def check_producer_activation(model: nn.Module, producer: str) -> None:
    """``ValueError`` in one line when the producer's activation would not pass a channel scale through exactly."""
    act = getattr(model.get_submodule(producer), "act", None)  # a bare Conv2d is linear: no activation
    if act is not None and not positively_homogeneous(act):
        raise InputError(
            f"'{producer}' ends in {type(act).__name__}, which is not positively homogeneous (act(a z) != a act(z)), "
            "so scaling its channels would change the FP32 model; plant after a ReLU or LeakyReLU"
        )


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
    """A float32 copy of the float32 detector ``fused`` with the outlier planted between ``producer`` (a block)
    and ``consumer`` (a block or a conv), fused or in training form; ``fused`` is untouched.

    Raises ``ValueError`` for bad names, shapes or arguments, a producer whose activation is not positively
    homogeneous (SiLU), a training-form consumer with an identity branch, and when the FP32 output on ``images``
    changes (the producer's output feeds something else).
    """
    if not 0 < fraction <= 1:
        raise InputError(f"fraction must be in (0, 1], got {fraction}")
    if not isinstance(exponent, int) or not 1 <= exponent <= 30:
        raise InputError(f"exponent must be an int in [1, 30], got {exponent!r}")
    planted = copy.deepcopy(fused).float().eval()
    shrink = output_scaled(named_module(planted, producer), producer)
    check_producer_activation(planted, producer)
    consumer_module = named_module(planted, consumer)
    grow = input_scaled(consumer_module, consumer)
    consumer_name = consumer if isinstance(consumer_module, nn.Conv2d) else f"{consumer}.conv"  # its name once fused
    width = len(shrink[0])
    for weight in grow:  # a grouped conv's filters read in_channels / groups each: not one to one
        if weight.shape[1] != width:
            raise InputError(
                f"'{consumer}' ({weight.shape[1]} input channels per filter) cannot consume '{producer}' ({width} "
                "channels) one to one"
            )
    channels = busiest_channels(planted, producer, images, max(1, round(fraction * width)))
    for t in shrink:
        t[channels] *= 2.0**-exponent
    for weight in grow:
        weight[:, channels] *= 2.0**exponent
    change = output_difference(fused, planted, images).max_rel
    if change > MAX_REL_CHANGE:
        raise InputError(
            f"planting changed the FP32 output by {change:.3g} (relative): '{producer}' must feed '{consumer_name}' "
            "only, through a positively homogeneous activation such as ReLU"
        )
    return planted, PlantedOutlier(producer, consumer_name, tuple(channels), exponent, change)
