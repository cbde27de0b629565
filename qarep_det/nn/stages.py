"""Stages that stack re-parameterizable blocks, in every flavour, and the two SPP blocks of the detectors we build.

Naming scheme: a generic class takes the block type (``RepStage(c1, c2, n, s, g, act, block=QARepBlock)``); each
flavour has a named subclass so a YAML can say what it means: ``QARepStage`` / ``QARepStageV2`` / ``RepVGGStage``
and ``QARepCSPStage`` / ``QARepCSPStageV2`` / ``RepVGGCSPStage``, and for the two middle steps of the QARepVGG
paper's ablation ``RepVGGNoIdBNStage`` / ``RepVGGNoIdBNCSPStage`` (S2) and ``QARepNoPostBNStage`` /
``QARepNoPostBNCSPStage`` (S3). ``SimSPPF`` (YOLOv6) and ``SPPCSPC`` (YOLOv7) have
no multi-branch conv, so one class each serves every family (a flavoured twin would be the same module under two
names). Every module takes ``act`` last (see ``activation``); ReLU is the default.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qarep_det.nn.blocks import (
    ConvBNReLU,
    QARepBlock,
    QARepBlockV2,
    QARepNoPostBNBlock,
    RepBlock,
    RepVGGBlock,
    RepVGGNoIdBNBlock,
)
from qarep_det.nn.registry import yaml_module


def check_repeats(name: str, n: int) -> None:
    """Raise a readable ``ValueError`` for a repeat count that is not a positive int."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{name}: repeat count n must be a positive int, got {n!r}")


class RepStage(nn.Sequential):
    """``n`` blocks in a row (YOLOv6's RepBlock); the first may change channels and stride; ``g`` groups each."""

    block: type[RepBlock] = QARepBlock

    def __init__(
        self,
        c1: int,
        c2: int,
        n: int = 1,
        s: int = 1,
        g: int = 1,
        act: str = "relu",
        block: type[RepBlock] | None = None,
    ) -> None:
        check_repeats(type(self).__name__, n)
        block = block or self.block
        super().__init__(*(block(c1 if i == 0 else c2, c2, s if i == 0 else 1, g, act) for i in range(n)))


class RepBottleneck(nn.Module):
    """Two blocks with a residual add (YOLOv6's BottleRep without the learnable weight)."""

    def __init__(self, c: int, block: type[RepBlock], act: str = "relu") -> None:
        super().__init__()
        self.cv1 = block(c, c, act=act)
        self.cv2 = block(c, c, act=act)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv2(self.cv1(x)) + x


class CSPRepStage(nn.Module):
    """CSP stage (YOLOv6's BepC3): two 1x1 splits, ``max(n // 2, 1)`` Rep bottlenecks on one, a 1x1 merge.

    Each bottleneck holds two blocks, so ``n`` counts blocks like ``RepStage`` does and depth scales alike.
    """

    block: type[RepBlock] = QARepBlock

    def __init__(
        self,
        c1: int,
        c2: int,
        n: int = 1,
        e: float = 0.5,
        act: str = "relu",
        block: type[RepBlock] | None = None,
    ) -> None:
        super().__init__()
        check_repeats(type(self).__name__, n)
        if not isinstance(e, (int, float)) or not 0 < e <= 1:
            raise ValueError(f"{type(self).__name__}: expansion e must be in (0, 1], got {e!r}")
        block = block or self.block
        hidden = max(int(c2 * e), 1)
        self.cv1 = ConvBNReLU(c1, hidden, 1, act=act)
        self.cv2 = ConvBNReLU(c1, hidden, 1, act=act)
        self.m = nn.Sequential(*(RepBottleneck(hidden, block, act) for _ in range(max(n // 2, 1))))
        self.cv3 = ConvBNReLU(2 * hidden, c2, 1, act=act)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


@yaml_module
class SimSPPF(nn.Module):
    """SPPF with ReLU (YOLOv6's SimSPPF): 1x1 reduce, three chained max-pools, concat, 1x1 expand."""

    def __init__(self, c1: int, c2: int, k: int = 5, act: str = "relu") -> None:
        super().__init__()
        if not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"SimSPPF: pool size k must be a positive odd int, got {k!r}")
        hidden = max(c1 // 2, 1)
        self.cv1 = ConvBNReLU(c1, hidden, 1, act=act)
        self.cv2 = ConvBNReLU(hidden * 4, c2, 1, act=act)
        self.pool = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: Tensor) -> Tensor:
        y = [self.cv1(x)]
        y.extend(self.pool(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, dim=1))


@yaml_module
class SPPCSPC(nn.Module):
    """YOLOv7's SPP block in a CSP split: one half goes 1x1 -> 3x3 -> 1x1, max pools 5/9/13 next to it, concat,
    1x1 -> 3x3; the other half is one 1x1; both are concatenated and mixed by a last 1x1. Hidden width = ``c2``
    (YOLOv7's ``int(2 * c2 * 0.5)``). Ultralytics has no equivalent (its SPP, SPPF and SPPELAN differ)."""

    POOLS = (5, 9, 13)

    def __init__(self, c1: int, c2: int, act: str = "relu") -> None:
        super().__init__()
        self.cv1 = ConvBNReLU(c1, c2, 1, act=act)
        self.cv2 = ConvBNReLU(c1, c2, 1, act=act)
        self.cv3 = ConvBNReLU(c2, c2, 3, act=act)
        self.cv4 = ConvBNReLU(c2, c2, 1, act=act)
        self.m = nn.ModuleList(nn.MaxPool2d(k, 1, k // 2) for k in self.POOLS)
        self.cv5 = ConvBNReLU(4 * c2, c2, 1, act=act)
        self.cv6 = ConvBNReLU(c2, c2, 3, act=act)
        self.cv7 = ConvBNReLU(2 * c2, c2, 1, act=act)

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv4(self.cv3(self.cv1(x)))
        y = self.cv6(self.cv5(torch.cat([y, *(pool(y) for pool in self.m)], dim=1)))
        return self.cv7(torch.cat((y, self.cv2(x)), dim=1))


@yaml_module(repeats=True)
class QARepStage(RepStage):
    """``RepStage`` of ``QARepBlock``s."""

    block = QARepBlock


@yaml_module(repeats=True)
class QARepStageV2(RepStage):
    """``RepStage`` of ``QARepBlockV2``s (YOLOv6's -qa models)."""

    block = QARepBlockV2


@yaml_module(repeats=True)
class RepVGGStage(RepStage):
    """``RepStage`` of ``RepVGGBlock``s (baseline)."""

    block = RepVGGBlock


@yaml_module(repeats=True)
class QARepCSPStage(CSPRepStage):
    """``CSPRepStage`` of ``QARepBlock``s."""

    block = QARepBlock


@yaml_module(repeats=True)
class QARepCSPStageV2(CSPRepStage):
    """``CSPRepStage`` of ``QARepBlockV2``s (YOLOv6-M-qa's stages)."""

    block = QARepBlockV2


@yaml_module(repeats=True)
class RepVGGCSPStage(CSPRepStage):
    """``CSPRepStage`` of ``RepVGGBlock``s (baseline)."""

    block = RepVGGBlock


@yaml_module(repeats=True)
class RepVGGNoIdBNStage(RepStage):
    """``RepStage`` of ``RepVGGNoIdBNBlock``s (ablation step S2)."""

    block = RepVGGNoIdBNBlock


@yaml_module(repeats=True)
class RepVGGNoIdBNCSPStage(CSPRepStage):
    """``CSPRepStage`` of ``RepVGGNoIdBNBlock``s (ablation step S2)."""

    block = RepVGGNoIdBNBlock


@yaml_module(repeats=True)
class QARepNoPostBNStage(RepStage):
    """``RepStage`` of ``QARepNoPostBNBlock``s (ablation step S3)."""

    block = QARepNoPostBNBlock


@yaml_module(repeats=True)
class QARepNoPostBNCSPStage(CSPRepStage):
    """``CSPRepStage`` of ``QARepNoPostBNBlock``s (ablation step S3)."""

    block = QARepNoPostBNBlock
