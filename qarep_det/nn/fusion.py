"""Kernel algebra for re-parameterization: every branch of a block becomes one 3x3 kernel and a bias.

All functions read BatchNorm running statistics (never batch statistics), so a fused kernel reproduces the
block exactly as it behaves in eval mode, the same contract as PyTorch's ``fuse_conv_bn_eval``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def bn_scale(bn: nn.BatchNorm2d) -> Tensor:
    """``gamma / sqrt(running_var + eps)`` per channel: what a BN multiplies its input by, hence what folds into a
    kernel (and what explodes on a dead channel under RepVGG's identity BN)."""
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


def fold_bn(kernel: Tensor, bn: nn.BatchNorm2d, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fold ``bn(conv(x) + bias)`` into one kernel and bias: ``W * g/s`` and ``beta + (bias - mean) * g/s``."""
    scale = bn_scale(bn)
    shift = -bn.running_mean if bias is None else bias - bn.running_mean
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias + shift * scale


def pad_to_3x3(kernel: Tensor) -> Tensor:
    """Zero-pad a 1x1 kernel to 3x3 (a 1x1 conv with padding 0 equals a 3x3 conv with padding 1 and this kernel)."""
    return F.pad(kernel, [1, 1, 1, 1])


def _channel_diagonal(channels: int, groups: int, taps: Tensor) -> Tensor:
    """A 3x3 kernel on ``channels`` channels (``groups`` groups) where output channel ``i`` reads only input ``i``,
    through the 3x3 ``taps``; input ``i`` sits at index ``i % (channels // groups)`` inside its group."""
    per_group = channels // groups
    kernel = taps.new_zeros(channels, per_group, 3, 3)
    index = torch.arange(channels, device=taps.device)
    kernel[index, index % per_group] = taps
    return kernel


def identity_kernel(channels: int, groups: int, like: Tensor) -> Tensor:
    """The 3x3 kernel of an identity map on ``channels`` channels for a conv with ``groups`` groups."""
    taps = torch.zeros(3, 3, dtype=like.dtype, device=like.device)
    taps[1, 1] = 1.0
    return _channel_diagonal(channels, groups, taps)


def avg_pool_kernel(channels: int, groups: int, like: Tensor) -> Tensor:
    """The 3x3 kernel of ``AvgPool2d(3, 1, 1)`` (padding counted, its default): 1/9 on every tap of the diagonal."""
    return _channel_diagonal(channels, groups, torch.full((3, 3), 1 / 9, dtype=like.dtype, device=like.device))


def fused_conv(conv: nn.Conv2d, kernel: Tensor, bias: Tensor) -> nn.Conv2d:
    """A new Conv2d with ``conv``'s geometry carrying ``kernel`` and ``bias`` (detached, same device/dtype)."""
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        kernel.shape[-1],
        stride=conv.stride,
        padding=kernel.shape[-1] // 2,
        groups=conv.groups,
        bias=True,
    ).to(device=kernel.device, dtype=kernel.dtype)
    fused.weight.data.copy_(kernel.detach())
    fused.bias.data.copy_(bias.detach())
    return fused
