"""Which convs a recipe quantizes: one answer shared by every backend, so they cannot drift apart.

Every ``Conv2d`` is quantized (weights and input) except the DFL's constant 1x1 conv, which is part of the box
decode, and, when ``quantize_head=False``, every conv inside the Ultralytics ``Detect`` module. Segment/Pose/OBB heads
subclass ``Detect`` and are covered too. Other layer types stay float, ``ConvTranspose2d`` included (YOLOv6-style
necks upsample with it; the recipe as published quantizes conv inputs only).
"""

from __future__ import annotations

from torch import nn

from qarep_det.quant.recipe import QuantRecipe


def detect_heads(model: nn.Module) -> dict[str, nn.Module]:
    """Ultralytics ``Detect`` modules (and subclasses) of ``model`` by qualified name."""
    from ultralytics.nn.modules.head import Detect

    return {name: m for name, m in model.named_modules() if isinstance(m, Detect)}


def float_conv_names(model: nn.Module, recipe: QuantRecipe) -> set[str]:
    """Qualified names of the ``Conv2d`` modules that the recipe keeps float."""
    heads = detect_heads(model)
    if not heads:
        raise ValueError("model has no Ultralytics Detect head; the INT8 recipe needs one to keep the decode float")
    keep: set[str] = set()
    for head_name, head in heads.items():
        for name, m in head.named_modules():
            if not isinstance(m, nn.Conv2d):
                continue
            in_dfl = name == "dfl" or name.startswith("dfl.")
            if in_dfl or not recipe.quantize_head:
                keep.add(f"{head_name}.{name}")
    return keep


def quantized_conv_names(model: nn.Module, recipe: QuantRecipe) -> list[str]:
    """Qualified names of the ``Conv2d`` modules that the recipe quantizes, in module order."""
    keep = float_conv_names(model, recipe)
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and name not in keep]
