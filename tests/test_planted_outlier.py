"""The mechanism behind the paper: a dead channel under RepVGG's identity BN ruins INT8; QARep's structure does not.

A RepVGG block whose identity-BN input channel is dead (post-ReLU zeros, running variance ~0) gets a huge
``gamma / sigma`` that lands on the fused kernel's centre tap; per-channel INT8 then spends that output channel's
whole range on it. The same-shape QARep block has no identity BN to blow up. ``bn_scales`` (what diagnose reports
for the training form) must see the cause before fusion hides it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_bn
from torch import nn

from qarep_det import reparameterize_model
from qarep_det.nn import ConvBNReLU, QARepBlock, QARepBlockV2, RepVGGBlock
from qarep_det.sensitivity.diagnostics import (
    BN_OUTLIER_FACTOR,
    bn_scales,
    fake_quant_per_channel,
    max_to_median,
    sqnr_db,
)
from qarep_det.sensitivity.planted import plant_outlier

CHANNELS, DEAD = 16, [2, 5, 9, 13]  # a quarter of the channels dead, as in long-trained RepVGG layers


def dead_channel_input() -> torch.Tensor:
    """Post-ReLU activations whose DEAD channels are always zero."""
    x = torch.relu(torch.randn(8, CHANNELS, 12, 12, generator=torch.Generator().manual_seed(1)))
    x[:, DEAD] = 0
    return x


def int8_output_sqnr(block: nn.Module, x: torch.Tensor) -> float:
    """Output SQNR of a fused block at INT8: per-channel symmetric weights, per-tensor symmetric max input."""
    conv = block.conv
    scale = x.abs().max().item() / 127
    xq = torch.fake_quantize_per_tensor_affine(x, scale, 0, -128, 127)
    with torch.no_grad():
        reference = block(x)
        quantized = block.act(nn.functional.conv2d(xq, fake_quant_per_channel(conv.weight), conv.bias, 1, 1))
    return sqnr_db(reference, quantized)


def test_dead_identity_channel_makes_an_outlier_only_in_repvgg() -> None:
    x = dead_channel_input()
    repvgg = randomize_bn(RepVGGBlock(CHANNELS, CHANNELS))
    with torch.no_grad():  # what training does to a dead channel's identity BN: var -> 0, mean -> 0
        repvgg.branch_identity.running_var[DEAD] = 1e-6
        repvgg.branch_identity.running_mean[DEAD] = 0.0
    qarep = randomize_bn(QARepBlock(CHANNELS, CHANNELS))
    scales = {(r.block, r.branch): r for r in bn_scales(nn.Sequential(repvgg, qarep))}
    assert set(scales) == {("0", "3x3"), ("0", "1x1"), ("0", "identity"), ("1", "3x3"), ("1", "post")}
    identity = scales["0", "identity"]
    assert identity.block_type == "RepVGGBlock" and identity.channel in DEAD and identity.outliers == len(DEAD)
    assert identity.max > BN_OUTLIER_FACTOR * identity.median
    assert [key for key, r in scales.items() if r.outlier] == [("0", "identity")]
    fused_repvgg, fused_qarep = reparameterize_model(repvgg), reparameterize_model(qarep)
    assert bn_scales(fused_repvgg) == []  # fused: no BN left to read

    ratio_repvgg, channel = max_to_median(fused_repvgg.conv.weight)
    ratio_qarep, _ = max_to_median(fused_qarep.conv.weight)
    assert channel in DEAD and ratio_repvgg > 1000
    assert ratio_repvgg > 50 * ratio_qarep  # QARep's identity tap stands out too, but by its post-BN scale only
    for c in DEAD:  # the identity's centre tap is each dead channel's largest weight
        assert fused_repvgg.conv.weight[c, c, 1, 1].abs() == fused_repvgg.conv.weight[c].abs().max()

    sqnr_repvgg, sqnr_qarep = int8_output_sqnr(fused_repvgg, x), int8_output_sqnr(fused_qarep, x)
    assert sqnr_qarep > 25
    assert sqnr_qarep - sqnr_repvgg > 10, (sqnr_repvgg, sqnr_qarep)


def test_v2_blocks_name_the_same_bns_as_v1() -> None:
    """V2 adds a parameter-free pool: its BNs (3x3, post) are V1's, read without any per-type code."""
    rows = bn_scales(nn.Sequential(QARepBlockV2(8, 8), QARepBlockV2(8, 16, 2)))
    assert [(r.block, r.block_type, r.branch) for r in rows] == [
        ("0", "QARepBlockV2", "3x3"), ("0", "QARepBlockV2", "post"), ("1", "QARepBlockV2", "3x3"),
        ("1", "QARepBlockV2", "post"),
    ]  # fmt: skip


class Pair(nn.Sequential):
    """Two fused blocks returning a tuple, as a detector does: what plant_outlier compares."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (super().forward(x),)


def test_planting_needs_a_positively_homogeneous_producer() -> None:
    x = torch.rand(2, 8, 9, 9)
    for act in ("relu", "lrelu"):  # act(a z) = a act(z) for a > 0: the planted model is FP32-exact
        fused = reparameterize_model(randomize_bn(Pair(QARepBlock(8, 8, act=act), QARepBlockV2(8, 8))))
        planted, info = plant_outlier(fused, "0", "1", x, exponent=12)
        assert info.fp32_max_rel_change == 0 and info.consumer == "1.conv"
    silu = reparameterize_model(randomize_bn(Pair(QARepBlock(8, 8, act="silu"), QARepBlock(8, 8))))
    try:
        plant_outlier(silu, "0", "1", x)
    except ValueError as e:
        assert "'0' ends in SiLU, which is not positively homogeneous" in str(e) and "\n" not in str(e)
    else:
        raise AssertionError("a SiLU producer was planted")


@pytest.mark.parametrize(
    ("producer", "consumer"),
    [
        (QARepBlock(8, 8), QARepBlock(8, 16, 2)),  # QARep: the post-BN alone ends the sum
        (QARepBlockV2(8, 8), ConvBNReLU(8, 16, 3)),
        (RepVGGBlock(8, 8), RepVGGBlock(8, 16, 2)),  # RepVGG: every branch BN, the identity's too
        (ConvBNReLU(8, 8, 3), QARepBlockV2(8, 16, 2)),
    ],
    ids=["qarep", "qarep_v2", "repvgg", "conv_bn"],
)
def test_planting_into_the_training_form_fuses_to_the_fused_planting(producer: nn.Module, consumer: nn.Module) -> None:
    """What QAT and quantize=8 start from: the unfused planting is FP32-exact, and fusing it gives the outlier that
    planting into the fused model gives (the same channels, the same fused weights up to rounding)."""
    x = torch.rand(4, 8, 9, 9)
    unfused = randomize_bn(Pair(producer, consumer)).eval()
    planted, info = plant_outlier(unfused, "0", "1", x, exponent=12)
    assert info.fp32_max_rel_change == 0 and info.consumer == "1.conv"
    assert not planted[0].fused and not planted[1].fused  # still the training form
    fused_planting, fused_info = plant_outlier(reparameterize_model(unfused), "0", "1", x, exponent=12)
    assert fused_info.channels == info.channels
    for a, b in zip(reparameterize_model(planted).parameters(), fused_planting.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_an_unfused_consumer_with_an_identity_is_refused() -> None:
    """An identity branch passes the shrunken channels on unscaled: refused, not silently changed."""
    with pytest.raises(ValueError, match="'1' has an identity branch"):
        plant_outlier(randomize_bn(Pair(QARepBlock(8, 8), RepVGGBlock(8, 8))), "0", "1", torch.rand(2, 8, 9, 9))
