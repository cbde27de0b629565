"""Shared test set-up: qarep_det imported first (offline Ultralytics), deterministic seeds, BN randomizer, and the
helpers several test files use."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from qarep_det_launcher import configure_offline

configure_offline()  # as our tools do, before anything imports Ultralytics: the suite never reaches the network

import qarep_det  # noqa: E402, F401  (registers our modules before Ultralytics is used)


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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors gain nothing from threads; on a busy 2-core host OpenMP spin-waits made such files ~3x slower.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fresh_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh process that does not know it runs under pytest (Ultralytics checks)."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}, **extra}


def results_epochs(run: Path) -> list[int]:
    """The epochs an Ultralytics run has logged in its results.csv."""
    with open(run / "results.csv", newline="") as f:
        return [int(float(row["epoch"])) for row in csv.DictReader(f)]


@pytest.fixture(scope="session")
def known_answer(tmp_path_factory: pytest.TempPathFactory):
    """A self-labelled dataset, a fused detector and its planted twin (``helpers.known_answer_detector``)."""
    from helpers import known_answer_detector

    return known_answer_detector(tmp_path_factory.mktemp("known_answer"))
