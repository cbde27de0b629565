"""The one interface every backend hands to evaluation: a runner.

A runner maps float32 ``(B, 3, H, W)`` RGB in [0, 1] (letterboxed by ``load_letterboxed``) to ``(B, 4 + nc, A)``:
xywh boxes in input pixels, then per-class sigmoid scores, i.e. what an Ultralytics ``DetectionModel`` returns in
eval mode. Evaluation then never needs to know whether a torch module, an OpenVINO network or anything else ran.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Runner = Callable[[torch.Tensor], torch.Tensor]


def first_output(output: torch.Tensor | tuple | list) -> torch.Tensor:
    """The decoded predictions: Ultralytics returns ``(y, raw)`` in eval mode and ``y`` alone in export mode."""
    return output[0] if isinstance(output, (tuple, list)) else output


class DecodedOutput(nn.Module):
    """Wraps a detector so ``forward`` returns only the decoded ``(B, 4 + nc, A)`` tensor (for export and tracing)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return first_output(self.model(x))


def torch_runner(model: nn.Module, device: str | torch.device = "cpu") -> Runner:
    """A runner for a (float, half or fake-quantized) torch detector: eval mode, no grad, input cast to the model's
    dtype; outputs come back as float32 on the CPU."""
    model = model.to(device).eval()
    dtype = next(model.parameters()).dtype

    @torch.no_grad()
    def run(images: torch.Tensor) -> torch.Tensor:
        return first_output(model(images.to(device, dtype))).float().cpu()

    return run
