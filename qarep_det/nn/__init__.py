"""Pure-PyTorch blocks and stages (no Ultralytics import), usable in any model."""

from torch import nn

from qarep_det.nn.activation import ACTIVATIONS, make_activation, positively_homogeneous
from qarep_det.nn.blocks import ConvBNReLU, QARepBlock, QARepBlockV2, Reparameterizable, RepBlock, RepVGGBlock
from qarep_det.nn.stages import (
    SPPCSPC,
    CSPRepStage,
    QARepCSPStage,
    QARepCSPStageV2,
    QARepStage,
    QARepStageV2,
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
    "ACTIVATIONS",
    "ConvBNReLU",
    "CSPRepStage",
    "QARepBlock",
    "QARepBlockV2",
    "QARepCSPStage",
    "QARepCSPStageV2",
    "QARepStage",
    "QARepStageV2",
    "RepBlock",
    "Reparameterizable",
    "RepStage",
    "RepVGGBlock",
    "RepVGGCSPStage",
    "RepVGGStage",
    "SPPCSPC",
    "SimSPPF",
    "make_activation",
    "positively_homogeneous",
    "reparameterize_modules",
]
