"""Which convs a recipe quantizes: one answer shared by every backend, so they cannot drift apart.

Every ``Conv2d`` is quantized (weights and input) except the DFL's constant 1x1 conv, which is part of the box
decode, when ``quantize_head=False`` every conv inside the Ultralytics ``Detect`` module, and the convs the recipe
names in ``float_layers`` (partial quantization). Segment/Pose/OBB heads subclass ``Detect`` and are covered too.
Other layer types stay float, ``ConvTranspose2d`` included (YOLOv6-style necks upsample with it; the recipe as
published quantizes conv inputs only). The same set decides the ModelOpt quantizers that are off, NNCF's ignored
scope, the convs without Q/DQ in the ONNX and the rows of a diagnosis.
"""

from __future__ import annotations

import difflib

from torch import nn

from qarep_det.errors import InputError
from qarep_det.quant.recipe import QuantRecipe


def detect_heads(model: nn.Module) -> dict[str, nn.Module]:
    """Ultralytics ``Detect`` modules (and subclasses) of ``model`` by qualified name."""
    from ultralytics.nn.modules.head import Detect

    return {name: m for name, m in model.named_modules() if isinstance(m, Detect)}


def _head_float_names(model: nn.Module, quantize_head: bool) -> set[str]:
    """The DFL conv(s), and every Detect conv when the head is not quantized."""
    heads = detect_heads(model)
    if not heads:
        raise InputError("model has no Ultralytics Detect head; the INT8 recipe needs one to keep the decode float")
    keep: set[str] = set()
    for head_name, head in heads.items():
        for name, m in head.named_modules():
            if not isinstance(m, nn.Conv2d):
                continue
            in_dfl = name == "dfl" or name.startswith("dfl.")
            if in_dfl or not quantize_head:
                keep.add(f"{head_name}.{name}")
    return keep


def check_float_layers(model: nn.Module, recipe: QuantRecipe) -> None:
    """Raise one ``ValueError`` naming every ``float_layers`` entry that is not a conv the recipe would quantize,
    each with the closest valid names (a block name like ``model.8.1`` gets ``model.8.1.conv`` suggested)."""
    head_float = _head_float_names(model, recipe.quantize_head)
    candidates = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n not in head_float]
    problems = []
    for name in recipe.float_layers:
        if name not in candidates:
            closest = difflib.get_close_matches(name, candidates, n=3, cutoff=0.0)
            problems.append(f"'{name}' (closest: {', '.join(closest)})")
    if problems:
        raise InputError(f"not a quantized conv of this model: {'; '.join(problems)}")


def float_conv_names(model: nn.Module, recipe: QuantRecipe) -> set[str]:
    """Qualified names of the ``Conv2d`` modules that the recipe keeps float; checks ``float_layers`` first."""
    check_float_layers(model, recipe)
    return _head_float_names(model, recipe.quantize_head) | set(recipe.float_layers)


def quantized_conv_names(model: nn.Module, recipe: QuantRecipe) -> list[str]:
    """Qualified names of the ``Conv2d`` modules that the recipe quantizes, in module order."""
    keep = float_conv_names(model, recipe)
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and name not in keep]


def check_partial(model: nn.Module, recipe: QuantRecipe, keep_float: int = 0) -> None:
    """``ValueError`` for named float layers that are not quantized convs, or a K (convs to keep float by
    sensitivity) below 0 or above the number of quantized convs; checked before any calibration."""
    if keep_float < 0:
        raise InputError(f"keep_float must be >= 0, got {keep_float}")
    if keep_float > (n := len(quantized_conv_names(model, recipe))):
        raise InputError(f"cannot keep {keep_float} convs float: the model has {n} quantized convs")
