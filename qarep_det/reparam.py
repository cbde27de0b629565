"""Model-level re-parameterization: a fused deep copy, and a numeric check that it computes the same thing.

Fusion reads BatchNorm running statistics, so the copy is returned in eval mode whatever mode the argument
was in (a fused model has no BatchNorm left to train); the argument itself is never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from ultralytics.nn.tasks import BaseModel

from qarep_det.nn import reparameterize_modules


def reparameterize_model(model: nn.Module) -> nn.Module:
    """Return a deep copy of ``model`` (a block, a stage or a whole detector) with every branch and BN folded.

    Our blocks become one conv each; inside an Ultralytics model, its own Conv+BN layers are folded too by
    Ultralytics' ``fuse()`` (which qarep_det extends to our blocks).
    """
    fused = copy.deepcopy(model).eval()
    if isinstance(fused, BaseModel):
        fused.fuse(verbose=False)
    else:
        reparameterize_modules(fused)
    return fused


def _tensors(output: object) -> Iterator[Tensor]:
    """Every tensor in a (possibly nested) model output: Ultralytics heads return tuples, lists and dicts."""
    if isinstance(output, Tensor):
        yield output
    elif isinstance(output, (list, tuple)):
        for item in output:
            yield from _tensors(item)
    elif isinstance(output, dict):
        for item in output.values():
            yield from _tensors(item)


@dataclass(frozen=True)
class OutputDifference:
    """Largest absolute difference, and that difference relative to the reference output's largest magnitude."""

    max_abs: float
    max_rel: float

    def __str__(self) -> str:
        return f"max abs diff {self.max_abs:.3g}, max rel diff {self.max_rel:.3g}"


@torch.no_grad()
def output_difference(reference: nn.Module, candidate: nn.Module, x: Tensor) -> OutputDifference:
    """Compare two models (e.g. unfused and fused) on input ``x``, both in eval mode.

    Relative difference is ``max|a - b| / max|a|`` per output tensor (maximised over tensors): element-wise
    ratios blow up on near-zero outputs and say nothing about fusion error.
    """
    modes = reference.training, candidate.training
    reference.eval(), candidate.eval()
    try:
        ref, cand = list(_tensors(reference(x))), list(_tensors(candidate(x)))
    finally:
        reference.train(modes[0]), candidate.train(modes[1])
    if len(ref) != len(cand) or any(a.shape != b.shape for a, b in zip(ref, cand, strict=True)):
        raise ValueError("models produce outputs of different structure or shape")
    max_abs = max_rel = 0.0
    for a, b in zip(ref, cand, strict=True):
        diff = (a.float() - b.float()).abs().max().item()
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(a.float().abs().max().item(), torch.finfo(torch.float32).tiny))
    return OutputDifference(max_abs, max_rel)
