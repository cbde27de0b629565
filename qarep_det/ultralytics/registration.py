"""Registration with Ultralytics: our module names in its YAMLs, our model YAMLs by name, ``fuse()`` support.

Ultralytics has no registration API. Its ``parse_model`` resolves a YAML name with ``globals()`` of
``ultralytics.nn.tasks`` and scales channels (c1 from the previous layer, c2 by width and max channels)
only for modules in two frozensets that are local to the function. So we wrap ``parse_model``: each of our
layers is first stood in for by a 1x1 ``Conv``, a built-in base module, which makes Ultralytics resolve
c1 and the scaled c2 exactly as for its own layers; we then build our module with those channels and the
depth-scaled repeat count, and put it in the stand-in's place. Everything else (Detect, Concat, the
save list, the scale logic) stays Ultralytics' own. ``BaseModel.fuse`` and ``is_fused`` are wrapped so
that Ultralytics' val and export fuse our blocks too. Ultralytics finds a model YAML given by name (``yolov8s.yaml``)
by searching its own package in ``ultralytics.utils.checks.check_file``; that function is wrapped so our shipped
YAMLs (``qarep_det.models``) are found by name the same way, a path that exists still winning. A YAML written for
YOLOv7 fails on its first YOLOv7-only construct with one line saying what to write instead (:data:`YOLOV7_HINTS`).
``self_test()`` guards all of this, before the first model with our layers is built.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable
from typing import Any

import torch
import ultralytics
from torch import nn
from ultralytics.nn import tasks
from ultralytics.utils import LOGGER, checks
from ultralytics.utils.torch_utils import is_qat

import qarep_det.nn as qnn
from qarep_det.errors import InputError
from qarep_det.models import shipped_name
from qarep_det.nn.registry import YAML_MODULES


class RegistrationError(RuntimeError):
    """Ultralytics' internals no longer behave as this integration expects."""


def _scaled_depth(d: dict[str, Any]) -> float:
    """The depth multiple ``parse_model`` uses: ``depth_multiple``, or the chosen row of ``scales``."""
    scales = d.get("scales")
    if scales:
        return scales[d.get("scale") or next(iter(scales))][0]
    return d.get("depth_multiple", 1.0)


YOLOV7_HINTS: dict[str, str] = {
    "MP": "YOLOv7's MP is a 2x2 max pool: write [-1, 1, nn.MaxPool2d, [2, 2]]",
    "SP": "YOLOv7's SP [k] is a stride-1 max pool (k=3 if omitted): write [-1, 1, nn.MaxPool2d, [k, 1, k // 2]], "
    "e.g. [5, 1, 2]",
    "IDetect": "YOLOv7's anchor-based IDetect has no counterpart here: write [[P3, P4, P5], 1, Detect, [nc]] "
    "(Ultralytics' anchor-free head)",
    "IAuxDetect": "YOLOv7's auxiliary-head IAuxDetect has no counterpart here: write [[P3, P4, P5], 1, Detect, [nc]]",
    "RepConv": "YOLOv7's RepConv [c2, k, s] is QARepBlock [c2, s, g, act] here (RepVGGBlock for the baseline), e.g. "
    "RepConv [256, 3, 1] -> QARepBlock [256, 1, 1, silu] (Ultralytics' own RepConv cannot be built from a YAML)",
}
"""What to write instead of the YOLOv7 modules a YAML taken from YOLOv7 uses (WongKinYiu/yolov7 models/common.py)."""


def _check_layers(d: dict[str, Any]) -> None:
    """Fail early, naming the layer, for a module name neither Ultralytics nor qarep_det knows (with what to write
    instead of a YOLOv7 module) and for YOLOv7's Conv arguments, whose activation Ultralytics reads as a dilation."""
    for i, (_, _, name, args) in enumerate(d["backbone"] + d["head"]):
        if not isinstance(name, str) or name.startswith(("nn.", "torchvision.ops.")):
            continue
        if name in YOLOV7_HINTS:
            raise KeyError(f"layer {i}: {name} is a YOLOv7 module; {YOLOV7_HINTS[name]}")
        if name not in YAML_MODULES and name not in vars(tasks):
            raise KeyError(
                f"layer {i}: unknown module '{name}' (not an Ultralytics module; qarep_det provides: "
                f"{', '.join(YAML_MODULES)})"
            )
        if name == "Conv" and isinstance(args, list) and len(args) == 6 and str(args[5]).startswith("nn."):
            raise InputError(
                f"layer {i} (Conv, args {args}): Ultralytics' Conv takes [c2, k, s, p, g, d, act], so YOLOv7's "
                f"activation would land in the dilation slot; drop it and set the YAML's 'activation: {args[5]}'"
            )


def _yolov7_args_hint(cls: type[nn.Module], args: list) -> str:
    """A hint when a block of ours got YOLOv7 RepConv's ``[c2, k, s]`` (a stride of 3 is its kernel size)."""
    if issubclass(cls, qnn.RepBlock) and len(args) >= 2 and args[1] == 3:
        return f" (YOLOv7's RepConv [c2, k, s]? ours is [c2, s, g, act]: write [{args[0]}, 1, 1, silu])"
    return ""


def _build(i: int, name: str, f: Any, n: int, args: list, stand_in: nn.Module) -> nn.Module:
    """Build our module ``name`` for layer ``i`` with the channels Ultralytics resolved for its stand-in."""
    cls, repeats = YAML_MODULES[name].cls, YAML_MODULES[name].repeats
    c1, c2 = stand_in.conv.in_channels, stand_in.conv.out_channels
    full_args = [c1, c2, n, *args[1:]] if repeats else [c1, c2, *args[1:]]
    try:
        if repeats or n == 1:
            module = cls(*full_args)
        else:  # a base module with n > 1 becomes n copies, as Ultralytics does for its own
            module = nn.Sequential(*(cls(*full_args) for _ in range(n)))
    except (TypeError, ValueError) as e:
        raise InputError(f"layer {i} ({name}, args {args}): {e}{_yolov7_args_hint(cls, args)}") from e
    module.np = sum(p.numel() for p in module.parameters())
    module.i, module.f, module.type = i, f, f"{cls.__module__}.{cls.__name__}"
    module.args = full_args  # shown in the model table, like the arguments Ultralytics prints for its own layers
    return module


def parse_model_with_qarep(parse_model: Callable, d: dict, ch: int, verbose: bool = True):
    """``parse_model`` that also understands our module names (see the module docstring)."""
    _check_layers(d)
    layers_spec = d["backbone"] + d["head"]
    ours = {i: spec for i, spec in enumerate(layers_spec) if spec[2] in YAML_MODULES}
    if not ours:
        return parse_model(d, ch, verbose)
    _self_test_once()
    d = copy.deepcopy(d)
    n_backbone = len(d["backbone"])
    for i, (f, _, name, args) in ours.items():
        if not isinstance(args, list) or not args or not isinstance(args[0], int):
            raise InputError(f"layer {i} ({name}): first argument must be the output channels, got args {args!r}")
        section, j = ("backbone", i) if i < n_backbone else ("head", i - n_backbone)
        d[section][j] = [f, 1, "Conv", [args[0], 1]]
    model, save = parse_model(d, ch, False)
    depth = _scaled_depth(d)
    repeats = [max(round(n * depth), 1) if n > 1 else n for _, n, _, _ in layers_spec]  # checked by self_test()
    layers = list(model)
    for i, (f, _, name, args) in ours.items():
        layers[i] = _build(i, name, f, repeats[i], args, layers[i])
    if verbose:  # the same table parse_model prints; built-in layers show their YAML arguments
        LOGGER.info(f"\n{'':>3}{'from':>20}{'n':>3}{'params':>10}  {'module':<45}{'arguments':<30}")
        for (f, _, _, args), n, m in zip(layers_spec, repeats, layers, strict=True):
            LOGGER.info(f"{m.i:>3}{f!s:>20}{n:>3}{m.np:10.0f}  {m.type:<45}{getattr(m, 'args', args)!s:<30}")
    return nn.Sequential(*layers), save


def _fuse_with_qarep(fuse: Callable) -> Callable:
    """``fuse`` that fuses our blocks first; on a QAT model, blocks still unfused keep their branches, as Ultralytics
    keeps its ``RepConv``: their convs were quantized one by one, and a fused conv would drop those quantizers."""

    @functools.wraps(fuse)
    def wrapper(self, *args, **kwargs):
        if not is_qat(self):
            qnn.reparameterize_modules(self)
        elif kept := sum(isinstance(m, qnn.Reparameterizable) and not m.fused for m in self.modules()):
            LOGGER.warning(
                f"{kept} Rep blocks keep their branches: quantize=8 quantized them branch by branch, which is not the "
                "fused conv an engine runs; 'qarep-det yolo train ... quantize=8' fuses them before QAT"
            )
        return fuse(self, *args, **kwargs)

    wrapper.__qarep_wrapped__ = fuse
    return wrapper


def _is_fused_with_qarep(is_fused: Callable) -> Callable:
    @functools.wraps(is_fused)
    def wrapper(self) -> bool:
        return is_fused(self) and not any(isinstance(m, qnn.Reparameterizable) and not m.fused for m in self.modules())

    wrapper.__qarep_wrapped__ = is_fused
    return wrapper


def _check_file_with_shipped(check_file: Callable) -> Callable:
    @functools.wraps(check_file)
    def wrapper(file: Any, *args: Any, **kwargs: Any) -> Any:
        shipped = shipped_name(file) if isinstance(file, (str, os.PathLike)) else None
        return check_file(str(shipped) if shipped else file, *args, **kwargs)

    wrapper.__qarep_wrapped__ = check_file
    return wrapper


def find_model_yaml(cfg: str | os.PathLike) -> None:
    """Check that a ``--cfg`` names a model YAML Ultralytics will find (a file, one of its own names such as
    ``yolov6s.yaml``, or, once registered, a shipped name of ours), else ``FileNotFoundError`` in one line."""
    try:
        tasks.yaml_model_load(cfg)  # Ultralytics' own lookup, scale suffixes included; reads the YAML only
    except FileNotFoundError:
        raise FileNotFoundError(
            f"model YAML '{cfg}' not found (a file, or a shipped name such as yolo_qarep_s.yaml)"
        ) from None


_SELF_TESTED: list[bool] = []  # one entry once self_test() has started in this process


def _self_test_once() -> None:
    """Run :func:`self_test` before the first model with our layers is built (its own build comes back here and
    passes): the guard runs where it matters, not at ``import qarep_det``, and not again."""
    if not _SELF_TESTED:
        _SELF_TESTED.append(True)
        self_test()


def register() -> None:
    """Install the wrappers (idempotent). Registration is all: :func:`self_test` runs before the first model with our
    layers is built, so importing the package builds nothing."""
    if not hasattr(tasks.parse_model, "__qarep_wrapped__"):
        original = tasks.parse_model
        wrapped = functools.wraps(original)(functools.partial(parse_model_with_qarep, original))
        wrapped.__qarep_wrapped__ = original
        tasks.parse_model = wrapped
    if not hasattr(tasks.BaseModel.fuse, "__qarep_wrapped__"):
        tasks.BaseModel.fuse = _fuse_with_qarep(tasks.BaseModel.fuse)
    if not hasattr(tasks.BaseModel.is_fused, "__qarep_wrapped__"):
        tasks.BaseModel.is_fused = _is_fused_with_qarep(tasks.BaseModel.is_fused)
    if not hasattr(checks.check_file, "__qarep_wrapped__"):
        checks.check_file = _check_file_with_shipped(checks.check_file)


def self_test() -> None:
    """Check on a tiny YAML that our layers get the same c1/c2/repeat scaling as Ultralytics' Conv and C2f, that
    fuse() fuses them, and that a shipped model YAML loads by name.

    Raises ``RegistrationError`` naming the Ultralytics version when its internals changed under us. The tiny model's
    random initialisation runs on a forked RNG, so the user's seeded random state is as it was.
    """
    d = {
        "nc": 2,
        "depth_multiple": 0.33,
        "width_multiple": 0.25,
        "backbone": [
            [-1, 1, "Conv", [64, 3, 2]],
            [-1, 1, "QARepBlock", [128, 2]],
            [-2, 1, "Conv", [128, 3, 2]],
            [-1, 6, "QARepStage", [128]],
            [-2, 6, "C2f", [128]],
        ],
        "head": [],
    }
    try:
        with torch.random.fork_rng(devices=[]):
            model, _ = tasks.parse_model(copy.deepcopy(d), ch=3, verbose=False)
        conv, block, conv2, stage, c2f = model
        ok = (
            isinstance(block, qnn.QARepBlock)
            and (block.c1, block.c2, block.s) == (conv.conv.out_channels, conv2.conv.out_channels, 2)
            and isinstance(stage, qnn.QARepStage)
            and len(stage) == len(c2f.m)
            and stage[0].c1 == conv2.conv.out_channels
            and stage[-1].c2 == c2f.cv2.conv.out_channels
        )
        if ok:
            stand_alone = tasks.DetectionModel.__new__(tasks.DetectionModel)
            nn.Module.__init__(stand_alone)
            stand_alone.model = model
            ok = not stand_alone.is_fused()
            stand_alone.fuse(verbose=False)
            ok = ok and block.fused and all(b.fused for b in stage) and stand_alone.is_fused()
        ok = ok and tasks.yaml_model_load("yolo_qarep_n.yaml")["backbone"][0][2] == "QARepBlock"
    except Exception as e:  # any failure here means the internals moved
        raise RegistrationError(
            f"qarep_det cannot register its modules with ultralytics {ultralytics.__version__}: {e!r}. "
            "Tested with ultralytics 8.4.190; pin that version or report this."
        ) from e
    if not ok:
        raise RegistrationError(
            f"qarep_det cannot register its modules with ultralytics {ultralytics.__version__}: the scaling or "
            "fusion of our layers, or loading a model YAML by name, differs from Ultralytics' own. Tested with "
            "ultralytics 8.4.190."
        )
