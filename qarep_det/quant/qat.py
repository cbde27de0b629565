"""Quantization-aware fine-tuning (QAT): the student model, its FP32 reference, and feature distillation.

A QAT student is the fused detector quantized exactly as post-training quantization does it (:func:`quantize_torch`:
ModelOpt fake quant, TensorRT's scheme, the same calibration draw and scope), then fine-tuned. Its quantizer ranges
(``amax``) are either ``frozen`` at their calibrated values (ModelOpt keeps them as buffers: its own QAT guidance) or
``learned`` with the weights (LSQ, :mod:`qarep_det.quant.lsq`); the student records which (``qat_ranges``). It is
built and saved as a plain ModelOpt model either way: the trainer makes its ranges parameters in each process.

The checkpoint format is Ultralytics' own QAT format (ultralytics >= 8.4.190 trains QAT with ``quantize=8``): the
student is pickled with its fake-quant modules reverted to plain convs, and ``ckpt["modelopt"]`` carries ModelOpt's
conversion state plus the calibrated ranges in float32; Ultralytics' ``load_checkpoint`` re-applies them, so
``YOLO(best.pt)`` or ``torch.load`` in a fresh process gives the INT8 student back. Two things are ours:

- the student is a :class:`QATDetectionModel`, which carries the FP32 model it started from
  (``fp32_reference``, outside the module tree so training, ``state_dict`` and ``.half()`` never touch it): the
  teacher for distillation and what ``ptq_eval`` scores the student against;
- ``half()`` keeps float32. Ultralytics halves every checkpoint it writes; for a QAT model that rounds the learned
  weights by up to 2^-11 relative, which moves the INT8 code of every weight that sits that close to a rounding
  boundary (the ranges themselves travel separately in float32). A QAT model exists to pin those codes.

Why not Ultralytics' ``prepare_qat``: it calibrates on 8 augmented training batches with ModelOpt's default config and
keeps the head's output convs float, i.e. another recipe than the one ptq_eval measures; and it trains the unfused
model. Here the fused model is trained, so what is fine-tuned is exactly what is deployed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from ultralytics.nn.modules.head import Detect
from ultralytics.nn.tasks import DetectionModel

from qarep_det.errors import InputError
from qarep_det.quant.backends.simulated import import_modelopt, quantize_torch
from qarep_det.quant.recipe import QuantRecipe

DISTILL_WEIGHT = 10.0
"""Weight of the feature distillation loss against the detection loss (both per image, summed over the batch).

The distillation term is the mean over the three head inputs of ||student - teacher||^2 / ||teacher||^2, so a student
whose features sit at 20 dB SQNR (0.01) adds 0.1 per image, against a detection loss of about 3-4 per image (box, cls
and DFL at Ultralytics' gains) late in training: a nudge towards the FP32 features, not a replacement of the task.
"""


RANGES = ("frozen", "learned")
"""What QAT does with the quantizer ranges: keep the calibrated ones, or learn them (LSQ) with the weights."""


class QATDetectionModel(DetectionModel):
    """A fake-quantized fused detector in training, with the FP32 model it started from (see module docstring)."""

    fp32_reference: DetectionModel | None = None  # set through __dict__: a module attribute would join the tree
    distill: bool = False  # train with FeatureDistillationLoss against fp32_reference
    calibrated_ranges: dict[str, Tensor] | None = None  # the ranges calibration gave, by key (set through __dict__)
    qat_ranges: str = "frozen"  # one of RANGES (class default: checkpoints written before learned ranges existed)
    qat_lr_ranges: float | None = None  # the learned ranges' learning rate (Ultralytics' settings take no new key)
    qat_form: str = "fused"  # what trained: the fused convs, or the blocks' branches ("training", qat/training_form.py)

    def half(self) -> QATDetectionModel:
        """Keep float32: rounding fine-tuned weights to float16 would move their INT8 codes (module docstring)."""
        return self

    def predict(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run float16 input (a caller that asked for ``half()``, e.g. ``val(half=True)``) in float32 too."""
        return super().predict(x.float() if x.dtype == torch.float16 else x, *args, **kwargs)


def quantizer_ranges(model: nn.Module) -> dict[str, Tensor]:
    """Every quantizer range (``amax``) of a ModelOpt-quantized model by state-dict key, detached copies."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith("_quantizer._amax")}


@torch.no_grad()
def pin_ranges(target: nn.Module, source: nn.Module) -> None:
    """Copy every quantizer range of ``source`` into ``target`` exactly.

    Ultralytics' EMA averages every floating-point buffer; ``a * d + a * (1 - d)`` is not always ``a`` in float32,
    so without this the EMA's frozen ranges would drift by a few ulps per update. (Learned ranges are averaged.)
    """
    ranges = quantizer_ranges(source)
    for key, value in target.state_dict().items():
        if key in ranges:
            value.copy_(ranges[key])


def make_student(
    fused: DetectionModel,
    batches: Iterable[Tensor],
    recipe: QuantRecipe,
    *,
    device: str | torch.device = "cpu",
    distill: bool = False,
    ranges: str = "frozen",
    lr_ranges: float | None = None,
) -> QATDetectionModel:
    """Quantize a fused detector with the PTQ recipe and make it a trainable QAT student.

    The student keeps a float32 copy of ``fused`` as ``fp32_reference``. Parameters are made trainable (fusion
    leaves some frozen), except the DFL's constant conv, which Ultralytics' trainer keeps frozen too. ``ranges``
    (one of :data:`RANGES`) and ``lr_ranges`` are recorded for the trainer.
    """
    if ranges not in RANGES:
        raise InputError(f"ranges must be one of {', '.join(RANGES)}, got {ranges!r}")
    student = quantize_torch(fused, batches, recipe, device)
    student.__class__ = QATDetectionModel
    student.__dict__["fp32_reference"] = copy.deepcopy(fused).float().cpu().eval()
    student.distill = distill
    student.__dict__["calibrated_ranges"] = {k: v.cpu() for k, v in quantizer_ranges(student).items()}
    student.qat_ranges, student.qat_lr_ranges = ranges, lr_ranges
    student.qat_recipe = recipe.to_dict()
    for name, p in student.named_parameters():
        p.requires_grad_(".dfl." not in name)
    return student


def range_moves(student: QATDetectionModel) -> list[dict[str, Any]]:
    """Each range of the student against the calibrated one it started from, in forward order: the conv, the
    quantizer (input or weight), both ranges (a weight's: the median over its channels) and the ratio learned /
    calibrated (a weight's: median, min and max over its channels; channels calibrated at 0 have none)."""
    rows = []
    for key, learned in quantizer_ranges(student).items():
        start = (student.calibrated_ranges or {}).get(key)
        if start is None:
            continue
        learned = learned.cpu()
        conv, quantizer = key.removesuffix("_quantizer._amax").rsplit(".", 1)
        live = start.flatten() > 0
        ratio = learned.flatten()[live] / start.flatten()[live]
        rows.append(
            {
                "conv": conv,
                "quantizer": quantizer,
                "calibrated": float(start.median()),
                "learned": float(learned.median()),
                "ratio": float(ratio.median()) if live.any() else math.nan,
                "ratio_min": float(ratio.min()) if live.any() else math.nan,
                "ratio_max": float(ratio.max()) if live.any() else math.nan,
            }
        )
    return rows


def is_qat_model(model: nn.Module) -> bool:
    """Whether ``model`` carries ModelOpt fake-quant modules (matched by class name: no ModelOpt import needed)."""
    return any(type(m).__name__ == "TensorQuantizer" for m in model.modules())


def qat_student(model: nn.Module) -> DetectionModel | None:
    """The fake-quantized model a loaded checkpoint holds, or None for an FP32 one: qarep_det's QAT student (with
    its FP32 reference) or a model of Ultralytics' own ``quantize=8`` training (without one)."""
    if not is_qat_model(model):
        return None
    import_modelopt()  # before any CUDA forward: keeps ModelOpt from JIT-compiling its kernel
    return model


ULTRALYTICS_QAT = {"calib_method": "max", "ranges": "frozen"}
"""What Ultralytics' ``quantize=8`` (``prepare_qat``) does, for a report: ModelOpt's max calibration on 8 train
batches, ranges held fixed while training."""


class HeadInputs:
    """Records the feature maps entering a detector's Detect head on every forward (a forward pre-hook)."""

    def __init__(self, model: nn.Module) -> None:
        head = next(m for m in model.modules() if isinstance(m, Detect))
        self.features: list[Tensor] = []
        self.handle = head.register_forward_pre_hook(self._record)

    def _record(self, _: nn.Module, args: tuple) -> None:
        self.features = list(args[0])


class FeatureDistillationLoss:
    """Detection loss plus :data:`DISTILL_WEIGHT` times a normalized L2 between student and teacher head inputs.

    Hand-written rather than Ultralytics' ``DistillationModel``: that one serves a larger teacher, learning a
    projector from student to teacher features; with an identical architecture the projector could absorb the
    quantization error instead of the student. Here the student's own features must match the FP32 ones.
    Used as the training model's criterion only: validation keeps the plain detection loss.
    """

    def __init__(self, detection_loss: Any, student: nn.Module, teacher: nn.Module, weight: float = DISTILL_WEIGHT):
        self.detection_loss = detection_loss
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight = weight
        self.student_inputs = HeadInputs(student)
        self.teacher_inputs = HeadInputs(self.teacher)

    def __call__(self, preds: Any, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        loss, items = self.detection_loss(preds, batch)
        with torch.no_grad():
            self.teacher(batch["img"])
        terms = [
            (s - t).pow(2).mean() / t.pow(2).mean().clamp(min=1e-12)
            for s, t in zip(self.student_inputs.features, self.teacher_inputs.features, strict=True)
        ]
        distill = torch.stack(terms).mean()
        batch_size = batch["img"].shape[0]
        loss = torch.cat([loss, (self.weight * batch_size * distill).view(1).to(loss.dtype)])
        return loss, {**items, "distill_loss": distill.detach()}
