"""Quantization-aware fine-tuning on Ultralytics' trainer: the QAT trainer, its recipe and its input checks.

``tools/qat.py`` fuses a trained checkpoint, quantizes it with ptq_eval's recipe (:func:`qarep_det.quant.qat.
make_student`) and fine-tunes it here, with Ultralytics' dataloaders, loss, validation and checkpoints. The trainer
class lives in the package for the same reason as ``QARepTrainer``: DDP workers unpickle it by reference.

The calibrated student reaches the trainer as a module, not a file: ``trainer.model`` is set to the student with its
fake quant reverted to plain convs and the ModelOpt state beside it (:func:`pack_student`). That object pickles by
reference, so Ultralytics' DDP launcher can hand it to every worker (it deletes the run directory before spawning
them, so a file there would not survive), and :meth:`QATTrainer.setup_model` re-applies the quantization in each
process. ``--resume`` loads last.pt through Ultralytics' own QAT checkpoint support.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from ultralytics.cfg import get_cfg
from ultralytics.utils import DEFAULT_CFG_DICT
from ultralytics.utils.torch_utils import qat_state, restore_qat, strip_qat, unwrap_model

from qarep_det.device import torch_device
from qarep_det.integrations.analysis import keep_most_sensitive
from qarep_det.integrations.checkpoint import load_detector
from qarep_det.integrations.run_options import (
    RECIPE,
    RunOptions,
    TrainInputError,
    check_dataset,
    check_run_settings,
    one_line,
    run_overrides,
)
from qarep_det.integrations.trainer import QARepTrainer, make_trainer, register_trainer
from qarep_det.quant.calibration import calibration_set
from qarep_det.quant.qat import FeatureDistillationLoss, QATDetectionModel, is_qat_model, make_student, pin_ranges
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.scope import check_partial
from qarep_det.quant.simulated import import_modelopt, modelopt_quiet
from qarep_det.reparam import reparameterize_model

# Fine-tuning, not training: ModelOpt's guidance is 1-10% of the schedule at a small learning rate with the ranges
# frozen. lr0 1e-4 is 1% of the training recipe's SGD lr0. No warmup: Ultralytics' warmup starts biases at lr 0.1,
# which would undo a trained model. No mosaic (as in the recipe's last epochs). FP32, not AMP: float16 activations
# would add rounding noise that the INT8 engine does not have, on top of the simulated quantization.
QAT_RECIPE: dict[str, Any] = {
    **RECIPE,
    "lr0": 1e-4,
    "warmup_epochs": 0.0,
    "mosaic": 0.0,
    "close_mosaic": 0,
    "amp": False,
}

STATE_KEY = "qat_state"  # where pack_student puts the ModelOpt state on the packed student


@dataclass
class QATOptions(RunOptions):
    """One QAT run, as ``tools/qat.py`` flags describe it (see that tool's ``--help`` for each field)."""

    weights: Path | None = None
    epochs: int = 10
    project: Path = Path("runs/qat")
    lr0: float = QAT_RECIPE["lr0"]
    recipe: QuantRecipe = field(default_factory=QuantRecipe)  # ptq_eval's recipe, for FP32 weights
    keep_float: int = 0  # keep the K convs float that hurt most alone (diagnose's ranking on the calibration draw)
    recipe_flags: tuple[str, ...] = ()  # recipe flags the user gave: refused with QAT weights, whose ranges are set
    distill: bool = False


class QATTrainer(QARepTrainer):
    """Fine-tunes a fake-quantized fused detector; its quantizer ranges stay frozen (in the EMA too)."""

    def setup_model(self) -> dict | None:
        """A packed student (new run, also in DDP workers): re-apply its quantization; else Ultralytics' loading."""
        import_modelopt()  # before any CUDA forward: keeps ModelOpt from JIT-compiling its kernel (see simulated.py)
        with modelopt_quiet():
            if isinstance(self.model, nn.Module):
                restore_qat(self.model, self.model.__dict__.pop(STATE_KEY))
                return None
            return super().setup_model()

    def get_model(self, cfg: Any = None, weights: nn.Module | None = None, verbose: bool = True) -> nn.Module:
        """On resume: the QAT student that Ultralytics' ``load_checkpoint`` restored from last.pt, as it is."""
        if weights is None or not is_qat_model(weights):
            raise TrainInputError("QAT resumes from a QAT checkpoint only (its last.pt)")
        return self.set_model_names_for_load(weights)

    def _setup_train(self) -> None:
        super()._setup_train()
        student = unwrap_model(self.model)
        pin_ranges(self.ema.ema, student)
        if student.distill:  # after the EMA copy: validation keeps the plain detection loss
            teacher = copy.deepcopy(student.fp32_reference).to(self.device)
            student.criterion = FeatureDistillationLoss(student.init_criterion(), student, teacher)

    def optimizer_step(self) -> None:
        super().optimizer_step()
        pin_ranges(self.ema.ema, unwrap_model(self.model))


register_trainer(QATTrainer, lambda checkpoint: bool(checkpoint.get("modelopt")))


def pack_student(student: QATDetectionModel) -> QATDetectionModel:
    """A copy of the student that pickles (plain convs) and carries its ModelOpt state for :meth:`setup_model`."""
    state = qat_state(student)
    packed = copy.deepcopy(student)
    strip_qat(packed)
    packed.__dict__[STATE_KEY] = state
    return packed


def _start_student(options: QATOptions, device: str) -> QATDetectionModel:
    """The student a new run starts from: the checkpoint's own if it is a QAT one, else a freshly calibrated one."""
    model = load_detector(options.weights)  # a QAT checkpoint comes back quantized (Ultralytics re-applies ModelOpt)
    if is_qat_model(model):
        if not isinstance(model, QATDetectionModel):
            raise TrainInputError(
                f"--weights '{options.weights}' is a QAT checkpoint without qarep_det's FP32 reference (made by "
                "another tool); start from its FP32 checkpoint instead"
            )
        if options.recipe_flags:
            flags = ", ".join(f"--{f.replace('_', '-')}" for f in options.recipe_flags)
            raise TrainInputError(f"--weights '{options.weights}' is QAT: its ranges are set; drop {flags}")
        if options.distill and model.fp32_reference is None:
            raise TrainInputError(f"--distill: '{options.weights}' holds no FP32 teacher to distill from")
        model.distill = options.distill
        return model
    fused, recipe = reparameterize_model(model), options.recipe
    check_partial(fused, recipe, options.keep_float)  # before minutes of calibration
    calib = calibration_set(options.data, options.imgsz, recipe.calib_images, recipe.seed, batch_size=8)
    main_device = torch_device(device, first=True)  # DDP: the main process calibrates on its own device
    recipe = keep_most_sensitive(fused, calib, recipe, options.keep_float, main_device)
    return make_student(fused, calib, recipe, main_device, options.distill).cpu()


def make_qat_trainer(options: QATOptions) -> QATTrainer:
    """Check every input, calibrate the student (or take the checkpoint's), then build the trainer.

    Raises ``TrainInputError`` with a one-line reason before anything is written; a resumed run is handed to
    :func:`qarep_det.integrations.trainer.make_trainer`, which recognises QAT checkpoints (registered above).
    """
    if options.resume:
        trainer = make_trainer(options)
        if not isinstance(trainer, QATTrainer):
            raise TrainInputError(f"--resume: '{trainer.args.resume}' is not a QAT run (resume it with tools/train.py)")
        return trainer
    if options.weights is None or options.data is None:
        raise TrainInputError("--weights and --data are required (unless --resume)")
    if not Path(options.weights).is_file():
        raise TrainInputError(f"--weights '{options.weights}' not found")
    if not options.lr0 > 0:
        raise TrainInputError(f"--lr0 must be > 0, got {options.lr0}")
    device = check_run_settings(options)
    check_dataset(Path(options.data))
    overrides = {
        **QAT_RECIPE,
        **run_overrides(options, device),
        "lr0": options.lr0,
        "model": str(Path(options.weights).resolve()),
        "pretrained": False,
    }
    try:
        get_cfg(dict(DEFAULT_CFG_DICT), overrides)  # Ultralytics' own checks, before calibrating or writing
        student = _start_student(options, device)
    except (TypeError, ValueError, SyntaxError, FileNotFoundError) as e:
        raise TrainInputError(one_line(e)) from e
    trainer = QATTrainer(overrides=overrides)
    trainer.model = pack_student(student)
    return trainer
