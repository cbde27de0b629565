"""qarep_det: quantization-friendly re-parameterized (QARepVGG) blocks for YOLO-style detectors.

Importing the package keeps Ultralytics offline, registers our blocks with its YAML parser and makes the shipped
model YAMLs loadable by name (``YOLO("yolo_qarep_s.yaml")``; :func:`model_yamls` lists them).
"""

# torch before ultralytics: ultralytics/__init__.py sets OMP_NUM_THREADS=1 for its dataloader workers when it is
# unset, and torch, if it loaded after that, would run evaluation and quantization on one thread whatever the CPU
# (a user script that imports torch first never sees this; our tools import us first)
import torch  # noqa: F401, I001

from qarep_det.integrations.offline import configure_offline

configure_offline()  # must run before anything imports ultralytics

from qarep_det.integrations.ultralytics import register  # noqa: E402

register()

from qarep_det.models import model_yaml, model_yamls  # noqa: E402
from qarep_det.nn import YAML_MODULES, yaml_module  # noqa: E402
from qarep_det.reparam import OutputDifference, output_difference, reparameterize_model  # noqa: E402

globals().update({name: module.cls for name, module in YAML_MODULES.items()})  # the YAML modules, by name

__version__ = "0.2.0"
__all__ = [
    *YAML_MODULES,
    "OutputDifference",
    "model_yaml",
    "model_yamls",
    "output_difference",
    "reparameterize_model",
    "yaml_module",
]
