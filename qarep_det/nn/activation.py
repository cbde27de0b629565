"""The activations our modules take by name (``act``, the last optional YAML argument of each of them).

``relu`` is the default and the paper's: QARepVGG's analysis (dead channels, the identity BN) is about ReLU.
``silu`` is what YOLOv7's RepConv and Ultralytics' Conv use, ``lrelu`` (LeakyReLU, slope 0.1) what yolov7-tiny uses
throughout. Fusion never touches the activation (it comes after the fused conv), so every name fuses exactly.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "lrelu": lambda: nn.LeakyReLU(0.1),
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name; ``ValueError`` naming the accepted names otherwise."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"act must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


def positively_homogeneous(act: nn.Module) -> bool:
    """Whether ``act(a * z) == a * act(z)`` for every ``a > 0``: ReLU and LeakyReLU, not SiLU.

    Scaling a producer's output channels by a power of two is then exact in float, which is what planting an
    FP32-invisible INT8 outlier relies on.
    """
    return isinstance(act, (nn.ReLU, nn.LeakyReLU, nn.Identity))
