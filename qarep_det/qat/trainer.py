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
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import load_checkpoint
from ultralytics.utils import DEFAULT_CFG_DICT, LOGGER, RANK
from ultralytics.utils.torch_utils import qat_state, restore_qat, strip_qat, unwrap_model

from qarep_det.device import torch_device
from qarep_det.errors import InputError, one_line
from qarep_det.qat.range_report import write_range_report
from qarep_det.qat.training_form import (
    BLOCKS_KEY,
    DEFAULT_FORM,
    FORMS,
    ema_fused,
    to_training_form,
    training_form_blocks,
)
from qarep_det.quant.backends.simulated import import_modelopt, modelopt_quiet
from qarep_det.quant.calibration import recipe_calibration
from qarep_det.quant.lsq import LogDomainSteps, freeze_ranges, learn_ranges, range_parameters
from qarep_det.quant.qat import (
    RANGES,
    FeatureDistillationLoss,
    QATDetectionModel,
    is_qat_model,
    make_student,
    pin_ranges,
)
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.scope import check_partial
from qarep_det.reparam import reparameterize_model
from qarep_det.sensitivity.rankings import keep_most_sensitive
from qarep_det.ultralytics.checkpoint import load_detector
from qarep_det.ultralytics.run_options import (
    QAT_FINE_TUNING,
    QAT_LR0,
    RECIPE,
    RunOptions,
    check_dataset,
    check_run_settings,
    run_overrides,
)
from qarep_det.ultralytics.trainer import QARepTrainer, make_trainer, register_trainer

QAT_RECIPE: dict[str, Any] = {**RECIPE, **QAT_FINE_TUNING}

LEARNING_RATES: dict[str, tuple[float, float]] = {"Adam": (QAT_LR0["Adam"], 0.1), "SGD": (QAT_LR0["SGD"], 1e-2)}
"""Per optimizer QAT offers: the weights' lr0 (``QAT_LR0``) and the learned ranges' lr unless told otherwise
(measured: docs/qat.md)."""
DEFAULT_RANGES = "learned"

STATE_KEY = "qat_state"  # where pack_student puts the ModelOpt state on the packed student


@dataclass
class QATOptions(RunOptions):
    """One QAT run, as ``tools/qat.py`` flags describe it (see that tool's ``--help`` for each field)."""

    weights: Path | None = None
    epochs: int = 10
    project: Path = Path("runs/qat")
    optimizer: str = QAT_RECIPE["optimizer"]  # one of LEARNING_RATES
    lr0: float | None = None  # None: the optimizer's, from LEARNING_RATES
    ranges: str = DEFAULT_RANGES  # one of RANGES
    lr_ranges: float | None = None  # learned ranges only; None: the optimizer's, from LEARNING_RATES
    recipe: QuantRecipe = field(default_factory=QuantRecipe)  # ptq_eval's recipe, for FP32 weights
    keep_float: int = 0  # keep the K convs float that hurt most alone (diagnose's ranking on the calibration draw)
    recipe_flags: tuple[str, ...] = ()  # recipe flags the user gave: refused with QAT weights, whose ranges are set
    distill: bool = False
    form: str = DEFAULT_FORM  # one of FORMS: train the fused convs, or the blocks' branches (qat/training_form.py)


class QATTrainer(QARepTrainer):
    """Fine-tunes a fake-quantized fused detector, its ranges frozen (in the EMA too) or learned; never returns a
    model worse than its start: the start is validated as epoch 0 and is best.pt until an epoch beats it."""

    start_log = ("QAT", "PTQ INT8", "try another --optimizer or --lr0")

    def keeps_start(self) -> bool:
        """Always: a new QAT run validates its start (:meth:`_setup_train`), a resumed one did."""
        return True

    @property
    def learned(self) -> bool:
        """Whether this run learns its ranges (the student's choice, pickled with every checkpoint)."""
        return isinstance(self.model, nn.Module) and unwrap_model(self.model).qat_ranges == "learned"

    def setup_model(self) -> dict | None:
        """A packed student (new run, also in DDP workers): re-apply its quantization; else Ultralytics' loading.
        Learned ranges become parameters here, before the optimizer, DDP and the EMA take hold of the model."""
        import_modelopt()  # before any CUDA forward: keeps ModelOpt from JIT-compiling its kernel (see simulated.py)
        with modelopt_quiet():
            if isinstance(self.model, nn.Module):
                restore_qat(self.model, self.model.__dict__.pop(STATE_KEY))
                ckpt = None
                if blocks := self.model.__dict__.pop(BLOCKS_KEY, None):
                    LOGGER.info(f"QAT: {to_training_form(self.model, blocks)} blocks train in their training form")
            else:
                ckpt = super().setup_model()
        if self.learned:
            LOGGER.info(f"QAT: learning {len(learn_ranges(self.model))} quantizer ranges (LSQ)")
        return ckpt

    def get_model(self, cfg: Any = None, weights: nn.Module | None = None, verbose: bool = True) -> nn.Module:
        """On resume: the QAT student that Ultralytics' ``load_checkpoint`` restored from last.pt, as it is."""
        if weights is None or not is_qat_model(weights):
            raise InputError("QAT resumes from a QAT checkpoint only (its last.pt)")
        if getattr(weights, "qat_form", "fused") == "training":
            raise InputError(
                "--resume: a --form training run does not resume (its checkpoints hold the fused student); start a "
                "new run from its last.pt with --weights"
            )
        return self.set_model_names_for_load(weights)

    def build_optimizer(self, model: nn.Module, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """Ultralytics' optimizer, with learned ranges moved into a group of their own: no weight decay, their own
        learning rate, stepped in the log domain (:class:`LogDomainSteps`, within the step: before the EMA reads
        them)."""
        optimizer = super().build_optimizer(model, *args, **kwargs)
        ranges = range_parameters(unwrap_model(model))
        if not ranges:
            return optimizer
        ids = {id(p) for p in ranges}
        for group in optimizer.param_groups:  # Ultralytics put them with the decayed weights
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        bias = next(g for g in optimizer.param_groups if g.get("param_group") == "bias")
        lr_ranges = unwrap_model(model).qat_lr_ranges or self.args.lr0  # lr0 is what Ultralytics passes as lr
        settings = {k: v for k, v in bias.items() if k != "params"}
        optimizer.add_param_group(
            {**settings, "params": ranges, "lr": lr_ranges, "weight_decay": 0.0, "param_group": "ranges"}
        )
        LogDomainSteps(ranges).attach(optimizer)
        LOGGER.info(f"optimizer: {len(ranges)} learned ranges in a group of their own (lr={lr_ranges:g}, log domain)")
        return optimizer

    def _setup_train(self) -> None:
        super()._setup_train()
        student = unwrap_model(self.model)
        if self.learned:
            # the EMA averages the ranges like the weights, as a plain ModelOpt model (what is validated and saved);
            # before its first update, which caches the (EMA, model) tensor pairs
            freeze_ranges(self.ema.ema)
            self.ema._pairs = None
        else:
            pin_ranges(self.ema.ema, student)
        if student.distill:  # after the EMA copy: validation keeps the plain detection loss
            teacher = copy.deepcopy(student.fp32_reference).to(self.device)
            student.criterion = FeatureDistillationLoss(student.init_criterion(), student, teacher)
        if not self.resume:
            self.validate_start()

    def save_model(self) -> bool:
        """Ultralytics' checkpoints, of the fused student also when the blocks train in their training form."""
        with ema_fused(self.ema, unwrap_model(self.model)):
            return super().save_model()

    def optimizer_step(self) -> None:
        super().optimizer_step()
        if not self.learned:
            pin_ranges(self.ema.ema, unwrap_model(self.model))

    def final_eval(self) -> None:
        """Ultralytics' final validation of best.pt (saying so when training did not beat the start); with learned
        ranges, report how far best.pt's moved (ranges.csv, ranges.png)."""
        super().final_eval()
        if RANK in {-1, 0} and not self.start_kept() and self.learned and self.best.exists():
            report = write_range_report(load_checkpoint(self.best)[0], self.save_dir)
            if report is not None:
                LOGGER.info(f"QAT: {report[2]} ({report[0].name}, {report[1].name})")


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
    # --form training refuses a QAT checkpoint (its blocks are fused) before the checks of one below
    blocks = training_form_blocks(model, options.weights) if options.form == "training" else {}
    if is_qat_model(model):
        if not isinstance(model, QATDetectionModel):
            raise InputError(
                f"--weights '{options.weights}' is a QAT checkpoint without qarep_det's FP32 reference (made by "
                "another tool); start from its FP32 checkpoint instead"
            )
        if options.recipe_flags:
            flags = ", ".join(f"--{f.replace('_', '-')}" for f in options.recipe_flags)
            raise InputError(f"--weights '{options.weights}' is QAT: its ranges are set; drop {flags}")
        if options.distill and model.fp32_reference is None:
            raise InputError(f"--distill: '{options.weights}' holds no FP32 teacher to distill from")
        model.distill, model.qat_ranges, model.qat_lr_ranges = options.distill, options.ranges, options.lr_ranges
        model.qat_form = options.form
        return model
    fused, recipe = reparameterize_model(model), options.recipe
    check_partial(fused, recipe, options.keep_float)  # before minutes of calibration
    calib = recipe_calibration(options.data, options.imgsz, recipe, batch_size=8)
    main_device = torch_device(device, first=True)  # DDP: the main process calibrates on its own device
    recipe = keep_most_sensitive(fused, calib, recipe, keep_float=options.keep_float, device=main_device)
    student = make_student(
        fused,
        calib,
        recipe,
        device=main_device,
        distill=options.distill,
        ranges=options.ranges,
        lr_ranges=options.lr_ranges,
    )
    student.qat_form = options.form
    if blocks:  # carried to QATTrainer.setup_model, which gives them back to the student after ModelOpt's restore
        student.__dict__[BLOCKS_KEY] = blocks
    return student.cpu()


def _checked_learning(options: QATOptions) -> QATOptions:
    """The options with their optimizer's learning rates filled in; ``InputError`` for a bad choice."""
    if options.optimizer not in LEARNING_RATES:
        raise InputError(f"--optimizer must be one of {', '.join(LEARNING_RATES)}, got {options.optimizer!r}")
    if options.ranges not in RANGES:
        raise InputError(f"--ranges must be one of {', '.join(RANGES)}, got {options.ranges!r}")
    if options.form not in FORMS:
        raise InputError(f"--form must be one of {', '.join(FORMS)}, got {options.form!r}")
    if options.lr_ranges is not None and options.ranges != "learned":
        raise InputError("--lr-ranges applies to --ranges learned only")
    default_lr0, default_lr_ranges = LEARNING_RATES[options.optimizer]
    lr0 = default_lr0 if options.lr0 is None else options.lr0
    lr_ranges = None
    if options.ranges == "learned":
        lr_ranges = default_lr_ranges if options.lr_ranges is None else options.lr_ranges
    for flag, value in (("--lr0", lr0), ("--lr-ranges", lr_ranges)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise InputError(f"{flag} must be > 0, got {value}")
    return replace(options, lr0=lr0, lr_ranges=lr_ranges)


def make_qat_trainer(options: QATOptions) -> QATTrainer:
    """Check every input, calibrate the student (or take the checkpoint's), then build the trainer.

    Raises ``InputError`` with a one-line reason before anything is written; a resumed run is handed to
    :func:`qarep_det.ultralytics.trainer.make_trainer`, which recognises QAT checkpoints (registered above).
    """
    if options.resume:
        trainer = make_trainer(options)
        if not isinstance(trainer, QATTrainer):
            raise InputError(f"--resume: '{trainer.args.resume}' is not a QAT run (resume it with tools/train.py)")
        return trainer
    if options.weights is None or options.data is None:
        raise InputError("--weights and --data are required (unless --resume)")
    if not Path(options.weights).is_file():
        raise InputError(f"--weights '{options.weights}' not found")
    options = _checked_learning(options)
    device = check_run_settings(options)
    check_dataset(Path(options.data))
    overrides = {
        **QAT_RECIPE,
        **run_overrides(options, device),
        "optimizer": options.optimizer,
        "lr0": options.lr0,
        "nbs": options.batch,  # a step per batch: QAT's few epochs need the steps (docs/qat.md, yolo_qarep_s)
        "model": str(Path(options.weights).resolve()),
        "pretrained": False,
    }
    try:
        get_cfg(dict(DEFAULT_CFG_DICT), overrides)  # Ultralytics' own checks, before calibrating or writing
        student = _start_student(options, device)
    except (TypeError, ValueError, SyntaxError, FileNotFoundError) as e:
        raise InputError(one_line(e)) from e
    trainer = QATTrainer(overrides=overrides)
    trainer.model = pack_student(student)
    return trainer
