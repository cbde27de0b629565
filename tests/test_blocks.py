"""Fusion maths: every block and stage, fused, equals its training form (float32, eval mode)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import randomize_bn
from torch import nn

from qarep_det import output_difference, reparameterize_model
from qarep_det.nn import (
    ConvBNReLU,
    QARepBlock,
    QARepCSPStage,
    QARepStage,
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


@pytest.mark.parametrize("cls", [QARepBlock, RepVGGBlock])
@pytest.mark.parametrize(("s", "channels", "g"), GRID)
def test_block_fusion(cls: type[RepBlock], s: int, channels: tuple[int, int], g: int) -> None:
    c1, c2 = channels
    block = cls(c1, c2, s, g)
    assert block.has_identity == (c1 == c2 and s == 1)
    fused = assert_fused_equal(block, c1)
    assert_one_conv_per_block(fused)
    assert fused.conv.stride == (s, s) and fused.conv.groups == g


@pytest.mark.parametrize("cls", [QARepStage, RepVGGStage])
@pytest.mark.parametrize(("s", "channels", "g"), GRID)
def test_stage_fusion(cls: type, s: int, channels: tuple[int, int], g: int) -> None:
    c1, c2 = channels
    stage = cls(c1, c2, 3, s, g)
    assert len(stage) == 3 and all(isinstance(b, cls.block) for b in stage)
    assert_one_conv_per_block(assert_fused_equal(stage, c1))


@pytest.mark.parametrize("cls", [QARepCSPStage, RepVGGCSPStage])
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


@pytest.mark.parametrize(("module", "c1"), [(SimSPPF(16, 24), 16), (ConvBNReLU(8, 16, 3, 2, 4), 8)])
def test_plain_modules_fold_bn(module: nn.Module, c1: int) -> None:
    assert_fused_equal(module, c1, size=13)


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
    ],
)
def test_bad_arguments_raise_one_clear_error(factory, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()
