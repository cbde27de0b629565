"""Shared test set-up: qarep_det imported first (offline Ultralytics), deterministic seeds, BN randomizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qarep_det  # noqa: F401  (sets offline env and registers our modules before ultralytics is used)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-default running statistics and affine parameters, then switch to eval.

    Fusion bugs hide behind default BN (mean 0, var 1, gamma 1, beta 0): every fold is then almost an identity.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
