"""Pure-PyTorch blocks and stages (no Ultralytics import), usable in any model."""

from torch import nn

from qarep_det.nn.blocks import ConvBNReLU, QARepBlock, Reparameterizable, RepBlock, RepVGGBlock
from qarep_det.nn.stages import (
    CSPRepStage,
    QARepCSPStage,
    QARepStage,
    RepStage,
    RepVGGCSPStage,
    RepVGGStage,
    SimSPPF,
)


def reparameterize_modules(module: nn.Module) -> int:
    """Fuse every block of ours inside ``module`` in place; returns how many were fused now."""
    pending = [m for m in module.modules() if isinstance(m, Reparameterizable) and not m.fused]
    for m in pending:
        m.reparameterize()
    return len(pending)


__all__ = [
    "ConvBNReLU",
    "CSPRepStage",
    "QARepBlock",
    "QARepCSPStage",
    "QARepStage",
    "RepBlock",
    "Reparameterizable",
    "RepStage",
    "RepVGGBlock",
    "RepVGGCSPStage",
    "RepVGGStage",
    "SimSPPF",
    "reparameterize_modules",
]
