"""Training with Ultralytics' DetectionTrainer: our trainer classes, the training recipe, and the input checks.

The trainer classes live in the package, not in ``tools/train.py``, because Ultralytics' DDP launcher pickles the
trainer *class* by reference into a temp file that fresh worker processes load: unpickling imports this module, hence
``qarep_det``, whose import registers our YAML modules before a worker parses the model YAML. (Importing this module
imports ``qarep_det`` first, which sets the offline environment before Ultralytics is imported.)

``QARepTrainer`` trains with plain weight decay (QARepVGG's recipe); ``CustomL2Trainer`` applies RepVGG's custom L2
on the equivalent kernel of every RepVGGBlock instead. Both replace Ultralytics' AMP check, which downloads YOLO26n,
by the same comparison run on the model being trained.

``make_trainer`` checks everything a user can get wrong (files, dataset layout, labels, device, settings) before the
trainer exists, so bad input fails with one ``TrainInputError`` line and nothing is written.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn
from ultralytics.cfg import get_cfg
from ultralytics.data.utils import img2label_paths
from ultralytics.engine import trainer as engine_trainer
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils import DEFAULT_CFG_DICT, LOGGER
from ultralytics.utils.patches import torch_load
from ultralytics.utils.torch_utils import unwrap_model

from qarep_det.data.dataset import resolve_dataset
from qarep_det.data.images import list_images
from qarep_det.integrations.ultralytics import RegistrationError
from qarep_det.nn import RepVGGBlock
from qarep_det.nn.fusion import bn_scale

# YOLOv6-S's solver (its configs/yolov6s.py) and its train.py default of 15 final epochs without mosaic. The
# optimizer is pinned: Ultralytics' default 'auto' picks MuSGD for a COCO-length run and then ignores lr0.
RECIPE: dict[str, Any] = {
    "optimizer": "SGD",
    "lr0": 0.01,
    "lrf": 0.01,  # final lr = lr0 * lrf
    "cos_lr": True,  # YOLOv6's 'Cosine' schedule (Ultralytics' default is linear)
    "momentum": 0.937,
    "weight_decay": 5e-4,  # Ultralytics scales it by batch * accumulate / 64, as YOLOv6 does
    "warmup_epochs": 3.0,
    "warmup_momentum": 0.8,
    "warmup_bias_lr": 0.1,
    "close_mosaic": 15,
}

# Ultralytics settings that have a TrainOptions field (a tools/train.py flag) of their own: --hyp may not set them.
OPTION_FLAGS: dict[str, str] = {
    "model": "--cfg",
    "data": "--data",
    "epochs": "--epochs",
    "imgsz": "--imgsz",
    "batch": "--batch",
    "device": "--device",
    "workers": "--workers",
    "project": "--project",
    "name": "--name",
    "exist_ok": "--exist-ok",
    "resume": "--resume",
    "pretrained": "--weights",
    "seed": "--seed",
    "save_dir": "--project/--name",
    "task": "(always 'detect')",
    "mode": "(always 'train')",
}

MODEL_STRIDE = 32  # the largest stride of every detector here; Ultralytics would silently round other sizes up


class TrainInputError(ValueError):
    """Bad training input, reported as one line before anything is written."""


@dataclass
class RunOptions:
    """What every training run takes: data, schedule, hardware and where the run goes (tool flags of the same names)."""

    data: Path | None = None
    epochs: int = 300
    imgsz: int = 640
    batch: int = 32
    device: str = "auto"  # '0' if CUDA is available else 'cpu'; on resume, the run's own device
    workers: int = 8
    project: Path = Path("runs/train")
    name: str = "exp"
    exist_ok: bool = False
    resume: Path | bool = False  # True: the newest last.pt under project
    seed: int = 0


@dataclass
class TrainOptions(RunOptions):
    """One training run, as ``tools/train.py`` flags describe it (see that tool's ``--help`` for each field)."""

    cfg: Path | None = None
    weights: Path | None = None
    hyp: Path | Mapping[str, Any] | None = None  # extra Ultralytics settings: a YAML file or a mapping
    rep_l2: str = "plain"  # ignored on resume: the run's own choice is read from its checkpoint


# --- AMP without a download -------------------------------------------------------------------------------------


def amp_matches_fp32(model: nn.Module, dtype: torch.dtype = torch.float16, imgsz: int = 256) -> bool:
    """Whether autocast at ``dtype`` reproduces the FP32 output of ``model`` (a copy, in eval mode) on a fixed input.

    It catches what Ultralytics' check exists for (NaN or garbage from a GPU's half-precision kernels); decoded
    boxes must agree within 0.5 px (Ultralytics' tolerance) plus 1 %, as this model is not trained yet.
    """
    device = next(model.parameters()).device
    probe = copy.deepcopy(unwrap_model(model)).eval()
    x = torch.rand(2, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        ref = _predictions(probe(x)).float()
        with torch.autocast(device.type, dtype=dtype):
            out = _predictions(probe(x)).float()
    return ref.shape == out.shape and bool(torch.isfinite(out).all()) and torch.allclose(out, ref, rtol=0.01, atol=0.5)


def _predictions(output: Tensor | Sequence) -> Tensor:
    """The decoded (boxes, scores) tensor of a detection model's eval-mode output."""
    return output[0] if isinstance(output, (tuple, list)) else output


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
def _offline_amp_check() -> Iterator[None]:
    """Make ``BaseTrainer._setup_train`` call ``check_amp_offline`` where it calls Ultralytics' ``check_amp``."""
    original = getattr(engine_trainer, "check_amp", None)
    if not callable(original):
        raise RegistrationError("ultralytics.engine.trainer.check_amp is gone; the offline AMP check needs updating")
    engine_trainer.check_amp = check_amp_offline
    try:
        yield
    finally:
        engine_trainer.check_amp = original


# --- RepVGG's custom L2 -----------------------------------------------------------------------------------------


def rep_blocks(model: nn.Module) -> list[RepVGGBlock]:
    """The unfused RepVGGBlocks of ``model`` (the blocks RepVGG's custom L2 applies to)."""
    return [m for m in unwrap_model(model).modules() if isinstance(m, RepVGGBlock) and not m.fused]


def _kernels(block: RepVGGBlock) -> tuple[Tensor, Tensor]:
    """The 3x3 and 1x1 conv weights of a block: the parameters the custom L2 replaces weight decay on."""
    return block.branch_3x3[0].weight, block.branch_1x1[0].weight


def _bn_scale(bn: nn.BatchNorm2d) -> Tensor:
    """``gamma / sqrt(var + eps)`` per channel, shaped to broadcast over a kernel; detached: kernels get penalized."""
    return bn_scale(bn).detach().reshape(-1, 1, 1, 1)


def rep_l2_penalty(block: RepVGGBlock) -> Tensor:
    """RepVGG's custom L2 of one block (Ding et al., CVPR 2021): a squared norm of the *equivalent* kernel.

    The 3x3 kernel's ring (non-centre taps) counts as is. At the centre, where the 1x1 branch adds in, the term is
    ``(K3c * t3 + K1 * t1)^2 / (t3^2 + t1^2)`` with ``t = gamma / sqrt(var + eps)`` of each branch's BN: the fused
    centre, normalized so that the penalty equals plain L2 when one branch is absent.
    """
    k3, k1 = _kernels(block)
    t3, t1 = _bn_scale(block.branch_3x3[1]), _bn_scale(block.branch_1x1[1])
    centre = k3[:, :, 1:2, 1:2]
    ring = k3.square().sum() - centre.square().sum()
    equivalent = centre * t3 + k1 * t1
    return ring + (equivalent.square() / (t3.square() + t1.square())).sum()


# --- Trainers -----------------------------------------------------------------------------------------------------


class QARepTrainer(DetectionTrainer):
    """Ultralytics' DetectionTrainer with plain weight decay (QARepVGG's recipe) and an AMP check without download."""

    def _setup_train(self) -> None:
        with _offline_amp_check():
            super()._setup_train()


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
        penalized = {id(w) for block in rep_blocks(model) for w in _kernels(block)}
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
        kernels = [w for block in blocks for w in _kernels(block)]
        with torch.enable_grad():
            grads = torch.autograd.grad(sum(rep_l2_penalty(b) for b in blocks), kernels)
        for w, g in zip(kernels, grads, strict=True):
            if w.grad is None:
                w.grad = 0.5 * decay * g
            else:
                w.grad.add_(g, alpha=0.5 * decay)


TRAINERS: dict[str, type[QARepTrainer]] = {"plain": QARepTrainer, "custom": CustomL2Trainer}


def rep_l2_of(checkpoint: Mapping[str, Any]) -> str:
    """Which ``TRAINERS`` key wrote a resumable checkpoint, read from its optimizer's parameter groups."""
    groups = (checkpoint.get("optimizer") or {}).get("param_groups", [])
    return "custom" if any(g.get("param_group") == "rep_l2" for g in groups) else "plain"


def trainer_of(checkpoint: Mapping[str, Any]) -> type[QARepTrainer]:
    """The trainer class that wrote a resumable checkpoint: QAT (it carries ModelOpt state), else by its L2."""
    if checkpoint.get("modelopt"):
        from qarep_det.integrations.qat import QATTrainer  # the QAT trainer builds on this module

        return QATTrainer
    return TRAINERS[rep_l2_of(checkpoint)]


# --- Input checks -------------------------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    """An exception's message as one line (KeyError quotes its message; Ultralytics' messages span lines)."""
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(text).split()) or type(e).__name__


def resolve_device(device: str) -> str:
    """Check ``device`` against this machine and return it in Ultralytics' form.

    Accepts 'auto' ('0' if CUDA is available else 'cpu'), 'cpu', 'mps', a CUDA index '0', or indices '0,1,2,3' (DDP).
    """
    device = str(device).strip().lower().replace(" ", "")
    if device == "auto":
        return "0" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise TrainInputError("--device mps: MPS is not available on this machine")
        return device
    if not re.fullmatch(r"\d+(,\d+)*", device):
        raise TrainInputError(f"--device '{device}' is not a device: use 'cpu', a CUDA index '0' or indices '0,1,2,3'")
    indices = [int(i) for i in device.split(",")]
    if len(set(indices)) < len(indices):
        raise TrainInputError(f"--device {device}: a CUDA device is listed twice")
    count = torch.cuda.device_count()
    missing = [i for i in indices if i >= count]
    if missing:
        raise TrainInputError(f"--device {device}: CUDA device {missing[0]} is not available ({count} visible)")
    return ",".join(map(str, indices))


def _device_count(device: str) -> int:
    """How many processes train on ``device`` (DDP splits the batch evenly among them)."""
    return len(device.split(",")) if device not in {"cpu", "mps"} else 1


def load_hyp(hyp: Path | Mapping[str, Any] | None) -> dict[str, Any]:
    """Extra Ultralytics settings from a YAML file or mapping, checked for unknown keys and keys flags own."""
    if hyp is None:
        return {}
    if isinstance(hyp, Mapping):
        values: Any = dict(hyp)
    else:
        path = Path(hyp)
        if not path.is_file():
            raise TrainInputError(f"--hyp file '{path}' not found")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise TrainInputError(f"--hyp file '{path}' is not valid YAML: {_one_line(e)}") from e
        if not isinstance(values, dict):
            raise TrainInputError(f"--hyp file '{path}' must map Ultralytics setting names to values")
    unknown = sorted(str(k) for k in values if k not in DEFAULT_CFG_DICT)
    if unknown:
        raise TrainInputError(f"--hyp: unknown Ultralytics setting(s): {', '.join(unknown)}")
    owned = sorted(k for k in values if k in OPTION_FLAGS)
    if owned:
        flags = ", ".join(f"{k} {OPTION_FLAGS[k]}" for k in owned)
        raise TrainInputError(f"--hyp may not set what a flag sets: {flags}")
    return values


def _row_problem(row: list[str], nc: int, single_cls: bool, box_fields: frozenset[int]) -> str | None:
    """Why Ultralytics would reject one label row (it would skip the whole image with a warning), or None."""
    if len(row) not in box_fields and (len(row) < 7 or len(row) % 2 == 0):
        return f"{len(row)} fields, expected 'class x y w h' or a polygon 'class x1 y1 x2 y2 ...'"
    try:
        cls, *coords = map(float, row)
    except ValueError:
        return f"not a number in '{' '.join(row)}'"
    if not (math.isfinite(cls) and cls == int(cls) and (single_cls or 0 <= cls < nc)):
        return f"class {row[0]} is not an integer in 0..{nc - 1} (the dataset has {nc})"
    if not all(-0.01 <= v <= 1.01 for v in (coords[:4] if len(row) in box_fields else coords)):  # NaN fails too
        return f"coordinates must be normalized to 0..1: '{' '.join(row)}'"
    return None


def _check_label_file(path: Path, nc: int, single_cls: bool, box_fields: frozenset[int]) -> None:
    """Raise naming the file and line of the first row Ultralytics would reject."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TrainInputError(f"label file '{path}' cannot be read: {_one_line(e)}") from e
    kinds = set()
    for n, line in enumerate(lines, 1):
        row = line.split()
        if row:
            problem = _row_problem(row, nc, single_cls, box_fields)
            if problem:
                raise TrainInputError(f"label file '{path}' line {n}: {problem}")
            kinds.add(len(row) in box_fields)
    if len(kinds) > 1:
        raise TrainInputError(f"label file '{path}' mixes boxes and polygons")


def check_dataset(data: Path, single_cls: bool = False) -> dict[str, Any]:
    """Check a data YAML as the trainer will read it, and its images and labels; returns Ultralytics' data dict.

    Every label file is read (about 13 s for COCO train2017's 118k files on one core), so that a bad row fails here,
    naming the file and line, instead of Ultralytics skipping its image with a warning.
    """
    data = Path(data)
    if not data.is_file():
        raise TrainInputError(f"data file '{data}' not found")
    try:
        raw = yaml.safe_load(data.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TrainInputError(f"data file '{data}' is not valid YAML: {_one_line(e)}") from e
    if not isinstance(raw, dict):
        raise TrainInputError(f"data file '{data}' is not a YAML mapping")
    for split, aliases in (("train", ("train",)), ("val", ("val", "validation"))):
        if not any(raw.get(k) for k in aliases):
            raise TrainInputError(f"data file '{data}' has no '{split}:' entry ('train' and 'val' are required)")
    try:
        info = resolve_dataset(data)  # resolves paths exactly as the trainer will, never downloading
    except Exception as e:
        raise TrainInputError(f"data file '{data}': {_one_line(e)}") from e
    nkpt, ndim = info.get("kpt_shape") or (0, 0)
    box_fields = frozenset({5, 5 + nkpt * ndim})  # pose labels train a detector on their boxes
    for split in ("train", "val"):
        try:
            images = list_images(info[split])
        except FileNotFoundError as e:
            raise TrainInputError(f"data file '{data}', {split}: {_one_line(e)}") from e
        if not images:
            raise TrainInputError(f"data file '{data}', {split}: no images in {info[split]}")
        LOGGER.info(f"Checking the labels of {len(images)} {split} images...")
        for label in img2label_paths([str(p) for p in images]):
            if os.path.isfile(label):
                _check_label_file(Path(label), info["nc"], single_cls, box_fields)
    return info


def check_model_cfg(cfg: Path, data: Mapping[str, Any], rep_l2: str) -> None:
    """Build the model once (the trainer would fail only after creating the run directory)."""
    cfg = Path(cfg)
    if not cfg.is_file():
        raise TrainInputError(f"model cfg '{cfg}' not found")
    if cfg.suffix not in {".yaml", ".yml"}:
        raise TrainInputError(f"model cfg '{cfg}' must be a model YAML (fine-tune a checkpoint with --weights)")
    try:
        model = DetectionModel(str(cfg), nc=data["nc"], ch=data["channels"], verbose=False)
    except Exception as e:
        raise TrainInputError(f"model cfg '{cfg}': {_one_line(e)}") from e
    if rep_l2 == "custom" and not rep_blocks(model):
        raise TrainInputError(f"--rep-l2 custom acts on RepVGGBlock layers and '{cfg}' has none")


def _positive(flag: str, value: int, minimum: int = 1) -> None:
    """Reject a count below ``minimum`` here rather than deep inside Ultralytics."""
    if not isinstance(value, int) or value < minimum:
        raise TrainInputError(f"{flag} must be an integer >= {minimum}, got {value!r}")


def check_run_settings(options: RunOptions) -> str:
    """Check the settings every new run shares; returns the device in Ultralytics' form."""
    _positive("--epochs", options.epochs)
    _positive("--batch", options.batch)
    _positive("--workers", options.workers, 0)
    _positive("--imgsz", options.imgsz, MODEL_STRIDE)
    if options.imgsz % MODEL_STRIDE:
        raise TrainInputError(f"--imgsz {options.imgsz} must be a multiple of the models' stride {MODEL_STRIDE}")
    device = resolve_device(options.device)
    if options.batch % _device_count(device):
        raise TrainInputError(f"--batch {options.batch} must be a multiple of the number of devices in {device}")
    return device


def run_overrides(options: RunOptions, device: str) -> dict[str, Any]:
    """The Ultralytics settings a new run takes from its shared options (paths resolved)."""
    return {
        "task": "detect",
        "mode": "train",
        "data": str(Path(options.data).resolve()),
        "epochs": options.epochs,
        "imgsz": options.imgsz,
        "batch": options.batch,
        "device": device,
        "workers": options.workers,
        "project": str(Path(options.project).resolve()),  # Ultralytics nests relative ones under its runs_dir
        "name": options.name,
        "exist_ok": options.exist_ok,
        "seed": options.seed,
    }


def _new_run(options: TrainOptions) -> tuple[type[QARepTrainer], dict[str, Any]]:
    """Check a new run's options; return its trainer class and Ultralytics overrides."""
    if options.cfg is None or options.data is None:
        raise TrainInputError("--cfg and --data are required (unless --resume)")
    if options.rep_l2 not in TRAINERS:
        raise TrainInputError(f"--rep-l2 must be one of {', '.join(TRAINERS)}, got {options.rep_l2!r}")
    device = check_run_settings(options)
    if options.weights is not None and not Path(options.weights).is_file():
        raise TrainInputError(f"--weights '{options.weights}' not found")
    hyp = load_hyp(options.hyp)
    data = check_dataset(Path(options.data), single_cls=bool(hyp.get("single_cls")))
    check_model_cfg(Path(options.cfg), data, options.rep_l2)
    overrides = {
        **RECIPE,
        **hyp,
        **run_overrides(options, device),
        "model": str(Path(options.cfg).resolve()),
        "pretrained": str(Path(options.weights).resolve()) if options.weights else False,
    }
    return TRAINERS[options.rep_l2], overrides


def _checkpoint_to_resume(options: TrainOptions) -> Path:
    """The last.pt that ``options.resume`` names, or the newest one under ``options.project``."""
    if options.resume is True:
        project = Path(options.project).resolve()
        runs = sorted(project.glob("*/weights/last.pt"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise TrainInputError(f"--resume: no run with weights/last.pt under '{project}'")
        return runs[-1]
    last = Path(options.resume)
    if not last.is_file():
        raise TrainInputError(f"--resume: checkpoint '{last}' not found")
    return last.resolve()


def _resume(options: TrainOptions) -> tuple[type[QARepTrainer], dict[str, Any]]:
    """Check that a run can resume; return its trainer class and the overrides Ultralytics' resume accepts."""
    last = _checkpoint_to_resume(options)
    try:
        ckpt = torch_load(last, map_location="cpu")
    except Exception as e:
        raise TrainInputError(f"--resume: cannot read checkpoint '{last}': {_one_line(e)}") from e
    args = ckpt.get("train_args") if isinstance(ckpt, dict) else None
    if not args or ckpt.get("optimizer") is None or ckpt.get("epoch", -1) < 0:
        raise TrainInputError(f"--resume: '{last}' holds no training state (a finished run's checkpoints are stripped)")
    if ckpt["epoch"] + 1 >= args["epochs"]:
        raise TrainInputError(f"--resume: '{last}' already finished its {args['epochs']} epochs")
    device = resolve_device(options.device if options.device != "auto" else args.get("device") or "auto")
    if args["batch"] % _device_count(device):
        raise TrainInputError(f"--resume: the run's batch {args['batch']} does not split evenly over {device}")
    check_dataset(Path(options.data or args["data"]), single_cls=bool(args.get("single_cls")))
    overrides = {"model": str(last), "resume": str(last), "device": device, "workers": options.workers}
    if options.data:
        overrides["data"] = str(Path(options.data).resolve())
    return trainer_of(ckpt), overrides


def make_trainer(
    options: TrainOptions, callbacks: Mapping[str, Sequence[Callable[[Any], None]]] | None = None
) -> QARepTrainer:
    """Check every input, then build the trainer (which creates the run directory: 'project/name', or the
    next free 'project/name-N' unless ``exist_ok``). Raises ``TrainInputError`` with a one-line reason.

    ``callbacks`` maps Ultralytics event names to extra callbacks.
    """
    trainer_class, overrides = _resume(options) if options.resume else _new_run(options)
    try:
        get_cfg(dict(DEFAULT_CFG_DICT), overrides)  # Ultralytics' own type and value checks, before anything is written
    except (TypeError, ValueError, SyntaxError) as e:
        raise TrainInputError(_one_line(e)) from e
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


def train_to_end(trainer: QARepTrainer, outputs: str) -> int:
    """Run a tool's training to the end; returns its exit status: 0 done (naming the run and its ``outputs``), 130
    on Ctrl-C, naming the ``--resume`` that continues from the last epoch saved."""
    try:
        trainer.train()
    except KeyboardInterrupt:
        if trainer.last.exists():
            print(f"interrupted: continue with --resume {trainer.last}", file=sys.stderr)
        return 130
    print(f"done: {trainer.save_dir} ({outputs})")
    return 0
