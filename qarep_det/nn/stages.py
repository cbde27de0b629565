"""Stages that stack re-parameterizable blocks, in both flavours, plus a ReLU SPPF.

Naming scheme: a generic class takes the block type (``RepStage(c1, c2, n, s, g, block=QARepBlock)``); each
flavour has a named subclass so a YAML can say what it means: ``QARepStage`` / ``RepVGGStage`` and
``QARepCSPStage`` / ``RepVGGCSPStage``. ``SimSPPF`` has no multi-branch conv, so one class serves both
families (a flavoured twin would be the same module under two names).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qarep_det.nn.blocks import ConvBNReLU, QARepBlock, RepBlock, RepVGGBlock


def check_repeats(name: str, n: int) -> None:
    """Raise a readable ``ValueError`` for a repeat count that is not a positive int."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{name}: repeat count n must be a positive int, got {n!r}")


class RepStage(nn.Sequential):
    """``n`` blocks in a row (YOLOv6's RepBlock); the first may change channels and stride; ``g`` groups each."""

    block: type[RepBlock] = QARepBlock

    def __init__(
        self, c1: int, c2: int, n: int = 1, s: int = 1, g: int = 1, block: type[RepBlock] | None = None
    ) -> None:
        check_repeats(type(self).__name__, n)
        block = block or self.block
        super().__init__(*(block(c1 if i == 0 else c2, c2, s if i == 0 else 1, g) for i in range(n)))


class RepBottleneck(nn.Module):
    """Two blocks with a residual add (YOLOv6's BottleRep without the learnable weight)."""

    def __init__(self, c: int, block: type[RepBlock]) -> None:
        super().__init__()
        self.cv1 = block(c, c)
        self.cv2 = block(c, c)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv2(self.cv1(x)) + x


class CSPRepStage(nn.Module):
    """CSP stage (YOLOv6's BepC3): two 1x1 splits, ``max(n // 2, 1)`` Rep bottlenecks on one, a 1x1 merge.

    Each bottleneck holds two blocks, so ``n`` counts blocks like ``RepStage`` does and depth scales alike.
    """

    block: type[RepBlock] = QARepBlock

    def __init__(self, c1: int, c2: int, n: int = 1, e: float = 0.5, block: type[RepBlock] | None = None) -> None:
        super().__init__()
        check_repeats(type(self).__name__, n)
        if not 0 < e <= 1:
            raise ValueError(f"{type(self).__name__}: expansion e must be in (0, 1], got {e!r}")
        block = block or self.block
        hidden = max(int(c2 * e), 1)
        self.cv1 = ConvBNReLU(c1, hidden, 1)
        self.cv2 = ConvBNReLU(c1, hidden, 1)
        self.m = nn.Sequential(*(RepBottleneck(hidden, block) for _ in range(max(n // 2, 1))))
        self.cv3 = ConvBNReLU(2 * hidden, c2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class SimSPPF(nn.Module):
    """SPPF with ReLU (YOLOv6's SimSPPF): 1x1 reduce, three chained max-pools, concat, 1x1 expand."""

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        if not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"SimSPPF: pool size k must be a positive odd int, got {k!r}")
        hidden = max(c1 // 2, 1)
        self.cv1 = ConvBNReLU(c1, hidden, 1)
        self.cv2 = ConvBNReLU(hidden * 4, c2, 1)
        self.pool = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: Tensor) -> Tensor:
        y = [self.cv1(x)]
        y.extend(self.pool(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, dim=1))


class QARepStage(RepStage):
    """``RepStage`` of ``QARepBlock``s."""

    block = QARepBlock


class RepVGGStage(RepStage):
    """``RepStage`` of ``RepVGGBlock``s (baseline)."""

    block = RepVGGBlock


class QARepCSPStage(CSPRepStage):
    """``CSPRepStage`` of ``QARepBlock``s."""

    block = QARepBlock


class RepVGGCSPStage(CSPRepStage):
    """``CSPRepStage`` of ``RepVGGBlock``s (baseline)."""

    block = RepVGGBlock
