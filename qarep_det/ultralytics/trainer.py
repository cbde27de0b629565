"""Training with Ultralytics' DetectionTrainer: our trainer classes, and building one for a run.

The trainer classes live in the package, not in a tool script, because Ultralytics' DDP launcher pickles the trainer
*class* by reference into a temp file that fresh worker processes load: unpickling imports this module, hence
``qarep_det``, whose import registers our YAML modules before a worker parses the model YAML.

``QARepTrainer`` trains with plain weight decay (QARepVGG's recipe); ``CustomL2Trainer`` applies RepVGG's custom L2
on the equivalent kernel of every RepVGGBlock instead (``RepVGGBlock.custom_l2``). Both replace Ultralytics' AMP
check, which downloads YOLO26n, by the same comparison on the model being trained (``amp``).

A resumed run must continue with the trainer that wrote it. Trainers say which checkpoints they wrote through
:func:`register_trainer`; ``integrations.qat`` registers ``QATTrainer`` there when it is imported, so this module
needs no import of the QAT trainer (which builds on it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics.cfg import cfg2dict, get_cfg
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG, DEFAULT_CFG_DICT, LOGGER
from ultralytics.utils.patches import torch_load
from ultralytics.utils.torch_utils import unwrap_model

from qarep_det.device import process_count
from qarep_det.errors import InputError, one_line
from qarep_det.nn import RepVGGBlock, reparameterize_modules
from qarep_det.ultralytics.amp import offline_amp_check
from qarep_det.ultralytics.keep_start import KeepsStart
from qarep_det.ultralytics.quantize8 import (
    check_qat_start,
    fuse_for_qat,
    has_fused_blocks,
    qat_requested,
    with_qat_defaults,
)
from qarep_det.ultralytics.run_options import (
    RECIPE,
    TrainOptions,
    check_dataset,
    check_model_cfg,
    check_run_settings,
    checkpoint_to_resume,
    load_hyp,
    run_overrides,
    train_device,
)


class QARepTrainer(KeepsStart, DetectionTrainer):
    """Ultralytics' DetectionTrainer with plain weight decay (QARepVGG's recipe) and an AMP check without download.

    With ``quantize=8`` (Ultralytics' QAT, ``integrations.ultralytics_qat``) our blocks are fused before it quantizes,
    what the user did not set follows QAT's fine-tuning recipe, and the calibrated start is validated as epoch 0 and
    stays best.pt until an epoch beats it.
    """

    start_log = ("quantize=8", "calibrated INT8", "try another optimizer= or lr0=")

    def __init__(self, cfg: Any = DEFAULT_CFG, overrides: dict[str, Any] | None = None, _callbacks: Any = None) -> None:
        args = get_cfg(cfg, overrides)
        if qat_requested(args) and not args.resume:
            check_qat_start(args.model, args.task)  # before Ultralytics writes the run folder
            # what the user gave: Ultralytics' CLI and YOLO.train pass it as overrides over the DEFAULT_CFG namespace;
            # a cfg of one's own (a dict, a YAML file) counts too (a DDP worker's holds every key: nothing is filled)
            overrides = with_qat_defaults({**({} if cfg is DEFAULT_CFG else cfg2dict(cfg)), **(overrides or {})})
        super().__init__(cfg, overrides, _callbacks)

    def keeps_start(self) -> bool:
        """A ``quantize=8`` run validates its calibrated start (:meth:`_setup_train`)."""
        return qat_requested(self.args)

    def setup_model(self) -> dict | None:
        ckpt = super().setup_model()
        if qat_requested(self.args) and not (self.resume and ckpt and ckpt.get("modelopt")):
            fuse_for_qat(self.model)
        return ckpt

    def get_model(self, cfg: Any = None, weights: nn.Module | None = None, verbose: bool = True) -> nn.Module:
        """Ultralytics' model from ``cfg`` with ``weights`` loaded; fused like ``weights`` when they are (a resumed
        ``quantize=8`` run), since loading matches parameter names."""
        if weights is None or not has_fused_blocks(weights):
            return super().get_model(cfg, weights, verbose)
        model = super().get_model(cfg, None, verbose)
        reparameterize_modules(model)
        model.load(weights)
        return model

    def _setup_train(self) -> None:
        with offline_amp_check():
            super()._setup_train()
        if qat_requested(self.args) and not self.resume:
            self.validate_start()


def rep_blocks(model: nn.Module) -> list[RepVGGBlock]:
    """The unfused RepVGGBlocks of ``model`` (the blocks RepVGG's custom L2 applies to)."""
    return [m for m in unwrap_model(model).modules() if isinstance(m, RepVGGBlock) and not m.fused]


class CustomL2Trainer(QARepTrainer):
    """RepVGG's recipe: its custom L2 instead of plain weight decay on the 3x3 and 1x1 kernels of RepVGGBlocks.

    Those kernels move from the decayed parameter group to a ``param_group='rep_l2'`` group without decay. Before each
    optimizer step (after AMP unscaling and gradient clipping, where SGD applies its own decay) their gradients get
    ``decay / 2 * d(penalty)/dW``, ``decay`` being the weight decay Ultralytics applies to the other weights
    (weight_decay * batch * accumulate / 64): on a ring tap that is exactly plain decay.
    """

    def build_optimizer(
        self,
        model: nn.Module,
        name: str = "auto",
        lr: float = 0.001,
        momentum: float = 0.9,
        decay: float = 1e-5,
        iterations: float = 1e5,
    ) -> torch.optim.Optimizer:
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        penalized = {id(w) for block in rep_blocks(model) for w in block.custom_l2_kernels()}
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in penalized]
            if moved:
                group["params"] = [p for p in group["params"] if id(p) not in penalized]
                optimizer.add_param_group(
                    {**group, "params": moved, "weight_decay": 0.0, "param_group": "rep_l2", "rep_l2_decay": decay}
                )
        optimizer.register_step_pre_hook(self._add_penalty_gradient)
        LOGGER.info(f"optimizer: RepVGG custom L2 (decay={decay}) instead of weight decay on {len(penalized)} kernels")
        return optimizer

    def _add_penalty_gradient(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        """Optimizer step pre-hook: add ``decay / 2`` times the custom L2's gradient to the penalized kernels."""
        decay = next(g["rep_l2_decay"] for g in optimizer.param_groups if g.get("param_group") == "rep_l2")
        blocks = [b for b in rep_blocks(self.model) if b.branch_3x3[0].weight.requires_grad]
        if not blocks:
            return
        kernels = [w for block in blocks for w in block.custom_l2_kernels()]
        with torch.enable_grad():
            grads = torch.autograd.grad(sum(b.custom_l2() for b in blocks), kernels)
        for w, g in zip(kernels, grads, strict=True):
            if w.grad is None:
                w.grad = 0.5 * decay * g
            else:
                w.grad.add_(g, alpha=0.5 * decay)


TRAINERS: dict[str, type[QARepTrainer]] = {"plain": QARepTrainer, "custom": CustomL2Trainer}
"""The trainer of a new run by ``--rep-l2`` value."""

_WRITERS: list[tuple[Callable[[Mapping[str, Any]], bool], type[QARepTrainer]]] = []


def register_trainer(cls: type[QARepTrainer], wrote: Callable[[Mapping[str, Any]], bool]) -> None:
    """Make :func:`trainer_of` pick ``cls`` for the resumable checkpoints ``wrote`` recognises."""
    _WRITERS.append((wrote, cls))


def _wrote_custom_l2(checkpoint: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's optimizer has CustomL2Trainer's parameter group."""
    groups = (checkpoint.get("optimizer") or {}).get("param_groups", [])
    return any(g.get("param_group") == "rep_l2" for g in groups)


register_trainer(CustomL2Trainer, _wrote_custom_l2)


def trainer_of(checkpoint: Mapping[str, Any]) -> type[QARepTrainer]:
    """The trainer class that wrote a resumable checkpoint (the last registered that claims it), else QARepTrainer.

    A QAT checkpoint (it carries ModelOpt state) that no registered trainer claims fails in one line, rather than
    resuming as FP32 training.
    """
    for wrote, cls in reversed(_WRITERS):
        if wrote(checkpoint):
            return cls
    if checkpoint.get("modelopt"):
        raise InputError("--resume: a QAT run; resume it with tools/qat.py --resume (qarep-det qat --resume)")
    return QARepTrainer


def _new_run(options: TrainOptions) -> tuple[type[QARepTrainer], dict[str, Any]]:
    """Check a new run's options; return its trainer class and Ultralytics overrides."""
    if options.cfg is None or options.data is None:
        raise InputError("--cfg and --data are required (unless --resume)")
    if options.rep_l2 not in TRAINERS:
        raise InputError(f"--rep-l2 must be one of {', '.join(TRAINERS)}, got {options.rep_l2!r}")
    device = check_run_settings(options)
    if options.weights is not None and not Path(options.weights).is_file():
        raise InputError(f"--weights '{options.weights}' not found")
    hyp = load_hyp(options.hyp)
    data = check_dataset(Path(options.data), single_cls=bool(hyp.get("single_cls")))
    check_model_cfg(Path(options.cfg), data, options.rep_l2)
    cfg = Path(options.cfg)
    overrides = {
        **RECIPE,
        **hyp,
        **run_overrides(options, device),
        "model": str(cfg.resolve()) if cfg.is_file() else str(cfg),  # a shipped YAML's name stays a name
        "pretrained": str(Path(options.weights).resolve()) if options.weights else False,
    }
    return TRAINERS[options.rep_l2], overrides


def _resume(options: TrainOptions) -> tuple[type[QARepTrainer], dict[str, Any]]:
    """Check that a run can resume; return its trainer class and the overrides Ultralytics' resume accepts."""
    last = checkpoint_to_resume(options)
    try:
        ckpt = torch_load(last, map_location="cpu")
    except Exception as e:
        raise InputError(f"--resume: cannot read checkpoint '{last}': {one_line(e)}") from e
    args = ckpt.get("train_args") if isinstance(ckpt, dict) else None
    if not args or ckpt.get("optimizer") is None or ckpt.get("epoch", -1) < 0:
        raise InputError(f"--resume: '{last}' holds no training state (a finished run's checkpoints are stripped)")
    if ckpt["epoch"] + 1 >= args["epochs"]:
        raise InputError(f"--resume: '{last}' already finished its {args['epochs']} epochs")
    device = train_device(options.device if options.device != "auto" else args.get("device") or "auto")
    if args["batch"] % process_count(device):
        raise InputError(f"--resume: the run's batch {args['batch']} does not split evenly over {device}")
    check_dataset(Path(options.data or args["data"]), single_cls=bool(args.get("single_cls")))
    overrides = {"model": str(last), "resume": str(last), "device": device, "workers": options.workers}
    if options.data:
        overrides["data"] = str(Path(options.data).resolve())
    return trainer_of(ckpt), overrides


def make_trainer(
    options: TrainOptions, callbacks: Mapping[str, Sequence[Callable[[Any], None]]] | None = None
) -> QARepTrainer:
    """Check every input, then build the trainer (which creates the run directory: 'project/name', or the
    next free 'project/name-N' unless ``exist_ok``). Raises ``InputError`` with a one-line reason.

    ``callbacks`` maps Ultralytics event names to extra callbacks.
    """
    trainer_class, overrides = _resume(options) if options.resume else _new_run(options)
    try:
        get_cfg(dict(DEFAULT_CFG_DICT), overrides)  # Ultralytics' own type and value checks, before anything is written
    except (TypeError, ValueError, SyntaxError) as e:
        raise InputError(one_line(e)) from e
    trainer = trainer_class(overrides=overrides)
    for event, functions in (callbacks or {}).items():
        for function in functions:
            trainer.add_callback(event, function)
    return trainer


def train(
    options: TrainOptions, callbacks: Mapping[str, Sequence[Callable[[Any], None]]] | None = None
) -> QARepTrainer:
    """Check the inputs and train; returns the finished trainer (``save_dir``, ``best``, ``last``, ``metrics``)."""
    trainer = make_trainer(options, callbacks)
    trainer.train()
    return trainer
