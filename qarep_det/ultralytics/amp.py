"""Ultralytics' AMP check without its download: the same question asked of the model being trained.

``BaseTrainer._setup_train`` calls ``check_amp``, which downloads YOLO26n to compare FP16 with FP32 on CUDA. Our
trainers swap it, for the duration of that call only, for :func:`check_amp_offline`, which asks the same question
(may this device train with autocast?) of a copy of the model being trained.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn
from ultralytics.engine import trainer as engine_trainer
from ultralytics.utils import LOGGER
from ultralytics.utils.torch_utils import unwrap_model

from qarep_det.quant.runner import first_output
from qarep_det.ultralytics.registration import RegistrationError


def amp_matches_fp32(model: nn.Module, dtype: torch.dtype = torch.float16, imgsz: int = 256) -> bool:
    """Whether autocast at ``dtype`` reproduces the FP32 output of ``model`` (a copy, in eval mode) on a fixed input.

    It catches what Ultralytics' check exists for (NaN or garbage from a GPU's half-precision kernels); decoded
    boxes must agree within 0.5 px (Ultralytics' tolerance) plus 1 %, as this model is not trained yet.
    """
    device = next(model.parameters()).device
    probe = copy.deepcopy(unwrap_model(model)).eval()
    x = torch.rand(2, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        ref = first_output(probe(x)).float()
        with torch.autocast(device.type, dtype=dtype):
            out = first_output(probe(x)).float()
    return ref.shape == out.shape and bool(torch.isfinite(out).all()) and torch.allclose(out, ref, rtol=0.01, atol=0.5)


def check_amp_offline(model: nn.Module) -> bool:
    """Stand-in for Ultralytics' ``check_amp`` (same contract: may training use AMP?) that needs no network."""
    device = next(model.parameters()).device
    if device.type in {"cpu", "mps"}:
        return False  # Ultralytics trains in FP32 on these too
    ok = amp_matches_fp32(model)
    if ok:
        LOGGER.info("AMP: checks passed (FP16 vs FP32 on the model being trained, offline)")
    else:
        LOGGER.warning("AMP: FP16 output differs from FP32 on this device, training in FP32")
    return ok


@contextlib.contextmanager
def offline_amp_check() -> Iterator[None]:
    """Make ``BaseTrainer._setup_train`` call ``check_amp_offline`` where it calls Ultralytics' ``check_amp``."""
    original = getattr(engine_trainer, "check_amp", None)
    if not callable(original):
        raise RegistrationError("ultralytics.engine.trainer.check_amp is gone; the offline AMP check needs updating")
    engine_trainer.check_amp = check_amp_offline
    try:
        yield
    finally:
        engine_trainer.check_amp = original
