"""Fusion maths: every block and stage, fused, equals its training form (float32, eval mode)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn
from torch import nn

from qarep_det import output_difference, reparameterize_model
from qarep_det.nn import (
    ACTIVATIONS,
    SPPCSPC,
    ConvBNReLU,
    QARepBlock,
    QARepBlockV2,
    QARepCSPStage,
    QARepCSPStageV2,
    QARepStage,
    QARepStageV2,
    RepBlock,
    RepVGGBlock,
    RepVGGCSPStage,
    RepVGGStage,
    SimSPPF,
    reparameterize_modules,
)

TOL = 1e-5
GRID = list(itertools.product((1, 2), ((8, 8), (8, 16)), (1, 4)))  # stride x (c1 == c2, c1 != c2) x groups


def assert_fused_equal(module: nn.Module, c1: int, size: int = 11) -> nn.Module:
    """Fuse a copy of ``module`` and check outputs agree to TOL relative; return the fused copy."""
    randomize_bn(module)
    fused = reparameterize_model(module)
    diff = output_difference(module, fused, torch.randn(2, c1, size, size))
    assert diff.max_rel < TOL, diff
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    return fused


def assert_one_conv_per_block(fused: nn.Module) -> None:
    blocks = [m for m in fused.modules() if isinstance(m, RepBlock)]
    assert blocks
    for block in blocks:
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == 1 and convs[0].kernel_size == (3, 3) and convs[0].bias is not None


BLOCKS = [QARepBlock, QARepBlockV2, RepVGGBlock]


@pytest.mark.parametrize("cls", BLOCKS)
@pytest.mark.parametrize(("s", "channels", "g"), GRID)
def test_block_fusion(cls: type[RepBlock], s: int, channels: tuple[int, int], g: int) -> None:
    c1, c2 = channels
    block = cls(c1, c2, s, g)
    assert block.has_identity == (c1 == c2 and s == 1)
    fused = assert_fused_equal(block, c1)
    assert_one_conv_per_block(fused)
    assert fused.conv.stride == (s, s) and fused.conv.groups == g


@pytest.mark.parametrize("cls", [QARepStage, QARepStageV2, RepVGGStage])
@pytest.mark.parametrize(("s", "channels", "g"), GRID)
def test_stage_fusion(cls: type, s: int, channels: tuple[int, int], g: int) -> None:
    c1, c2 = channels
    stage = cls(c1, c2, 3, s, g)
    assert len(stage) == 3 and all(isinstance(b, cls.block) for b in stage)
    assert_one_conv_per_block(assert_fused_equal(stage, c1))


@pytest.mark.parametrize("cls", [QARepCSPStage, QARepCSPStageV2, RepVGGCSPStage])
@pytest.mark.parametrize("channels", [(16, 16), (8, 16)])
@pytest.mark.parametrize("n", [1, 4])
def test_csp_stage_fusion(cls: type, channels: tuple[int, int], n: int) -> None:
    """CSP stages have no stride or groups argument (YOLOv6's BepC3 has neither): channels x depth here."""
    c1, c2 = channels
    stage = cls(c1, c2, n)
    assert len(stage.m) == max(n // 2, 1)
    fused = assert_fused_equal(stage, c1)
    assert_one_conv_per_block(fused)
    assert not any(isinstance(m, ConvBNReLU) and not m.fused for m in fused.modules())


@pytest.mark.parametrize(
    ("module", "c1"), [(SimSPPF(16, 24), 16), (ConvBNReLU(8, 16, 3, 2, 4), 8), (SPPCSPC(16, 24, "silu"), 16)]
)
def test_plain_modules_fold_bn(module: nn.Module, c1: int) -> None:
    assert_fused_equal(module, c1, size=13)


@pytest.mark.parametrize("s", [1, 2])
@pytest.mark.parametrize(("c1", "c2"), [(8, 8), (8, 16)])
@pytest.mark.parametrize("g", [1, 4])
def test_v2_equals_an_independent_formula_of_the_block(s: int, c1: int, c2: int, g: int) -> None:
    """YOLOv6's QARepVGGBlockV2 written out with functional ops: relu(bn_post(bn(conv3x3 x) + conv1x1 x + x +
    avgpool3x3(x))), the last two only when c1 == c2 and s == 1; the pool counts its zero padding."""
    block = randomize_bn(QARepBlockV2(c1, c2, s, g))
    x = torch.randn(2, c1, 9, 9)
    conv3, bn3 = block.branch_3x3
    y = F.batch_norm(F.conv2d(x, conv3.weight, None, s, 1, 1, g), bn3.running_mean, bn3.running_var, bn3.weight,
                     bn3.bias, False, 0.0, bn3.eps)  # fmt: skip
    y = y + F.conv2d(x, block.branch_1x1.weight, None, s, 0, 1, g)
    if c1 == c2 and s == 1:
        y = y + x + F.avg_pool2d(x, 3, 1, 1, count_include_pad=True)
    else:
        assert block.branch_avg is None
    bn = block.bn
    expected = F.relu(F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
        fused = reparameterize_model(block)
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)


def test_v2_fusion_is_exact_at_the_borders() -> None:
    """A 1x1 map is all border: the average pool sees one real value and eight zero pads (x / 9)."""
    block = randomize_bn(QARepBlockV2(4, 4))
    assert_fused_equal(block, 4, size=1)
    assert_fused_equal(block, 4, size=2)


def test_v2_is_v1_plus_an_average_pool_on_identity_blocks_only() -> None:
    assert isinstance(QARepBlockV2(8, 8).branch_avg, nn.AvgPool2d)
    assert QARepBlockV2(8, 16).branch_avg is None and QARepBlockV2(8, 8, 2).branch_avg is None
    v1, v2 = QARepBlock(8, 8), QARepBlockV2(8, 8)
    assert [n for n, _ in v1.named_parameters()] == [n for n, _ in v2.named_parameters()]


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize(
    "factory",
    [
        lambda act: QARepBlock(8, 8, act=act),
        lambda act: QARepBlockV2(8, 8, act=act),
        lambda act: RepVGGBlock(8, 8, act=act),
        lambda act: QARepStage(8, 8, 2, act=act),
        lambda act: RepVGGCSPStage(8, 8, 2, act=act),
        lambda act: ConvBNReLU(8, 8, 3, act=act),
        lambda act: SimSPPF(8, 8, act=act),
        lambda act: SPPCSPC(8, 8, act),
    ],
)
def test_every_activation_fuses_exactly_and_is_used_everywhere(factory, act: str) -> None:
    module = factory(act)
    expected = type(ACTIVATIONS[act]())
    acts = [m for m in module.modules() if isinstance(m, (nn.ReLU, nn.SiLU, nn.LeakyReLU))]
    assert acts and all(type(m) is expected for m in acts)
    if act == "lrelu":
        assert all(m.negative_slope == 0.1 for m in acts)
    fused = assert_fused_equal(module, 8)
    assert all(type(m) is expected for m in fused.modules() if isinstance(m, (nn.ReLU, nn.SiLU, nn.LeakyReLU)))


def test_sppcspc_has_yolov7s_shape() -> None:
    """cv1 1x1 -> cv3 3x3 -> cv4 1x1, pools 5/9/13, cv5 1x1 (4c -> c) -> cv6 3x3, cv2 1x1 beside, cv7 1x1 (2c -> c2)."""
    m = SPPCSPC(32, 16)
    assert [m.get_submodule(f"cv{i}").branch[0].kernel_size[0] for i in range(1, 8)] == [1, 1, 3, 1, 1, 3, 1]
    assert [p.kernel_size for p in m.m] == [5, 9, 13] and all(p.stride == 1 for p in m.m)
    assert m.cv5.branch[0].in_channels == 64 and m.cv7.branch[0].in_channels == 32
    assert m(torch.randn(1, 32, 7, 7)).shape == (1, 16, 7, 7)


def test_qarep_structure_matches_paper() -> None:
    """QARep: BN on the 3x3 only, a bias-free BN-free 1x1, identity without BN, one BN after the sum."""
    block = QARepBlock(8, 8)
    assert isinstance(block.branch_3x3[1], nn.BatchNorm2d)
    assert isinstance(block.branch_1x1, nn.Conv2d) and block.branch_1x1.bias is None
    assert isinstance(block.bn, nn.BatchNorm2d)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in block.modules()) == 2
    assert sum(isinstance(m, nn.BatchNorm2d) for m in RepVGGBlock(8, 8).modules()) == 3


def test_reparameterize_is_idempotent_and_in_place() -> None:
    block = randomize_bn(QARepBlock(8, 8))
    x = torch.randn(1, 8, 7, 7)
    expected = block(x)
    block.reparameterize()
    conv = block.conv
    block.reparameterize()
    assert block.conv is conv and block.fused
    assert not hasattr(block, "branch_1x1") and not hasattr(block, "bn")
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-5)
    assert reparameterize_modules(block) == 0


def test_reparameterize_model_leaves_argument_untouched_and_uses_running_stats() -> None:
    stage = randomize_bn(QARepStage(8, 8, 2)).train()
    before = copy.deepcopy(stage.state_dict())
    fused = reparameterize_model(stage)
    assert stage.training and not fused.training
    assert all(torch.equal(before[k], v) for k, v in stage.state_dict().items())
    assert all(not b.fused for b in stage)
    diff = output_difference(stage, fused, torch.randn(2, 8, 9, 9))  # compares in eval mode
    assert diff.max_rel < TOL


def test_gradients_flow_through_every_branch() -> None:
    block = QARepBlock(8, 8).train()
    block(torch.randn(2, 8, 5, 5)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: QARepBlock(8, 8, 3), "stride s must be one of"),
        (lambda: RepVGGBlock(6, 8, 1, 4), "divisible by groups"),
        (lambda: QARepBlock(0, 8), "c1 must be a positive int"),
        (lambda: QARepStage(8, 8, 0), "repeat count n"),
        (lambda: QARepCSPStage(8, 8, 2, 1.5), "expansion e"),
        (lambda: SimSPPF(8, 8, 4), "pool size k"),
        (lambda: ConvBNReLU(8, 8, 2), "kernel size k"),
        (lambda: QARepBlock(8, 8, act="gelu"), "act must be one of relu, silu, lrelu, got 'gelu'"),
        (lambda: SPPCSPC(8, 8, "swish"), "act must be one of"),
    ],
)
def test_bad_arguments_raise_one_clear_error(factory, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()
