"""Pure-PyTorch blocks and stages (no Ultralytics import), usable in any model.

The modules a YAML can name are exported from :data:`~qarep_det.nn.registry.YAML_MODULES`, so a new one is added in
one place: its class, decorated with ``@yaml_module``.
"""

from torch import nn

from qarep_det.nn import blocks, stages  # noqa: F401  (defining the classes registers them)
from qarep_det.nn.activation import ACTIVATIONS, make_activation, positively_homogeneous
from qarep_det.nn.blocks import Reparameterizable, RepBlock, ThreeBranchBlock
from qarep_det.nn.registry import YAML_MODULES, YamlModule, yaml_module
from qarep_det.nn.stages import CSPRepStage, RepStage

globals().update({name: module.cls for name, module in YAML_MODULES.items()})


def reparameterize_modules(module: nn.Module) -> int:
    """Fuse every block of ours inside ``module`` in place; returns how many were fused now."""
    pending = [m for m in module.modules() if isinstance(m, Reparameterizable) and not m.fused]
    for m in pending:
        m.reparameterize()
    return len(pending)


__all__ = [
    *YAML_MODULES,
    "ACTIVATIONS",
    "CSPRepStage",
    "RepBlock",
    "Reparameterizable",
    "RepStage",
    "ThreeBranchBlock",
    "YAML_MODULES",
    "YamlModule",
    "make_activation",
    "positively_homogeneous",
    "reparameterize_modules",
    "yaml_module",
]
