"""Ultralytics' own QAT (``yolo train model=best.pt quantize=8``) on our blocks: fuse them first, refuse the rest.

Ultralytics' ``prepare_qat`` puts ModelOpt's input and weight quantizers on every conv of the model it trains. On an
unfused Rep block those are its branch convs, each quantized on its own, while the engine runs one fused conv whose
INT8 weight is the quantized *sum* of the branches. Worse, ``BaseModel.fuse()`` at validation and export then
replaces the quantized branches by a fused conv without quantizers, so the exported model runs those blocks in float
(Ultralytics skips its own ``RepConv`` there for that reason). Fusing our blocks before ``prepare_qat`` makes
Ultralytics' QAT calibrate, train, validate and export the graph that is deployed: each block one conv with its own
input and weight quantizers. What cannot work is refused in one line before Ultralytics writes a run folder.

Fused, the QAT convs carry the folded BatchNorm scales, many far smaller than a fresh conv's weights, and Ultralytics'
own hyperparameters (``optimizer=auto``: AdamW at lr 0.001, three warm-up epochs with biases at lr 0.1) rewrite them
in one epoch (yolo_qarep_s: 93.7 mAP50-95 to 0.005). So what the user leaves unset becomes QAT's fine-tuning recipe
(:func:`with_qat_defaults`), the one ``qarep-det qat`` uses, and the trainer keeps the calibrated start as best.pt
until an epoch beats it (``integrations.keep_start``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn
from ultralytics.cfg import MODES, QUANTIZE_ALIASES, TASKS
from ultralytics.utils import DEFAULT_CFG, LOGGER
from ultralytics.utils.patches import torch_load

from qarep_det.errors import InputError
from qarep_det.nn import Reparameterizable, reparameterize_modules
from qarep_det.ultralytics.run_options import QAT_FINE_TUNING, QAT_LR0

QAT_BITS = 8  # Ultralytics' canonical ``quantize`` value for QAT (``8``, ``int8`` and ``w8a8`` all become 8)


def qat_requested(args: Any) -> bool:
    """Whether canonical Ultralytics training arguments ask for its QAT; other ``quantize`` values are not ours."""
    return getattr(args, "quantize", None) == QAT_BITS


def has_fused_blocks(model: nn.Module) -> bool:
    """Whether any block of ours in ``model`` is already fused (a checkpoint written by export or ptq-eval)."""
    return any(isinstance(m, Reparameterizable) and m.fused for m in model.modules())


def check_qat_start(model: str | Path | None, task: str | None = None) -> None:
    """Refuse ``quantize=8`` for what it cannot fine-tune, in one line: a model YAML (nothing trained yet), a
    checkpoint that is fused or already quantization-aware, or a task other than detection. Names Ultralytics would
    resolve itself (a file that is not here) are left to it."""
    where = f"quantize=8 with model={model}"
    if task not in (None, "detect"):
        raise InputError(f"{where}: qarep_det fuses its blocks for QAT in detection only, not task={task}")
    path = Path(str(model)) if model is not None else None
    if path is None or path.suffix in {".yaml", ".yml"}:
        raise InputError(
            f"{where}: QAT fine-tunes a trained detector; train the YAML first, then quantize=8 from its best.pt"
        )
    if path.suffix != ".pt" or not path.is_file():
        return
    checkpoint = torch_load(path, map_location="cpu")
    net = checkpoint.get("ema") if checkpoint.get("ema") is not None else checkpoint.get("model")
    if checkpoint.get("modelopt"):
        raise InputError(
            f"{where}: the checkpoint is quantization-aware already; fine-tune it further with qarep-det qat, "
            "or start quantize=8 from the FP32 checkpoint it came from"
        )
    if isinstance(net, nn.Module) and getattr(net, "task", "detect") != "detect":
        raise InputError(f"{where}: qarep_det fuses its blocks for QAT in detection only, not task={net.task}")
    if isinstance(net, nn.Module) and has_fused_blocks(net):
        raise InputError(
            f"{where}: the checkpoint holds fused blocks (an export or ptq-eval artefact), which Ultralytics would "
            "rebuild unfused from the YAML and load only in part; start from the trained checkpoint, or use qarep-det "
            "qat, which takes fused checkpoints"
        )


def check_yolo_qat(args: list[str]) -> None:
    """:func:`check_qat_start` for ``yolo ARGS`` as Ultralytics' CLI reads them (``quantize=int8`` is 8 too), so that
    the CLI refuses before any trainer exists, whatever the task (only detection comes to our trainer)."""
    pairs = dict(a.split("=", 1) for a in args if "=" in a)
    words = [a for a in args if "=" not in a]
    mode = next((w for w in words if w in MODES), pairs.get("mode"))
    quantize = pairs.get("quantize")
    if mode != "train" or QUANTIZE_ALIASES.get(str(quantize).lower(), quantize) != QAT_BITS:
        return
    if pairs.get("resume", "False").lower() not in {"false", "0", "none"}:
        return
    check_qat_start(pairs.get("model"), next((w for w in words if w in TASKS), pairs.get("task")))


def fuse_for_qat(model: nn.Module) -> int:
    """Fuse our blocks in place before ``prepare_qat`` (see the module docstring); returns how many were fused."""
    fused = reparameterize_modules(model)
    if fused:
        LOGGER.info(f"quantize=8: fused {fused} Rep blocks first, so QAT trains the single convs that are deployed")
    return fused


def with_qat_defaults(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` (the arguments the user gave: Ultralytics' CLI and ``YOLO.train`` hand the trainer exactly those)
    completed with QAT's fine-tuning recipe where they say nothing, logged in one line. A value given always wins.

    The learning rate follows the optimizer: an optimizer named without lr0 gets QAT's lr0 for it (none for one QAT
    has no lr0 for: Ultralytics' then), and lr0 named without an optimizer gets Adam, since Ultralytics'
    ``optimizer=auto`` would ignore it. Unless ``nbs`` is given, the nominal batch is the batch, so every batch is an
    optimizer step: a fine-tuning epoch is short, and Ultralytics' nominal 64 left 128 images at batch 8 two steps.
    """
    defaults = {k: v for k, v in QAT_FINE_TUNING.items() if k not in overrides}
    if "optimizer" in overrides and "lr0" not in overrides:
        by_name = {k.lower(): v for k, v in QAT_LR0.items()}  # Ultralytics reads optimizer names in any case
        lr0 = by_name.get(str(overrides["optimizer"]).lower())
        if lr0 is None:
            del defaults["lr0"]
        else:
            defaults["lr0"] = lr0
    batch = overrides.get("batch", DEFAULT_CFG.batch)
    if "nbs" not in overrides and isinstance(batch, int) and batch >= 1:
        defaults["nbs"] = batch
    if defaults:
        listed = " ".join(f"{k}={v}" for k, v in defaults.items())
        LOGGER.info(f"quantize=8: QAT defaults for the fused graph where not given: {listed} (a value given wins)")
    return {**overrides, **defaults}
