"""qarep_det: quantization-friendly re-parameterized (QARepVGG) blocks for YOLO-style detectors.

Importing the package registers our blocks with Ultralytics' YAML parser (and its ``fuse()``), makes the shipped model
YAMLs loadable by name (``YOLO("yolo_qarep_s.yaml")``; :func:`model_yamls` lists them), and does nothing else: no
environment variable, blocked module or written file. Our command-line tools set up their own process (offline
Ultralytics, no telemetry) in ``qarep_det_launcher``, before they import the package.
"""

# torch before ultralytics: ultralytics/__init__.py sets OMP_NUM_THREADS=1 for its dataloader workers when it is
# unset, and torch, if it loaded after that, would run evaluation and quantization on one thread whatever the CPU
# (a user script that imports torch first never sees this)
import torch  # noqa: F401, I001

from qarep_det.ultralytics.registration import register

register()

from qarep_det.models import model_yaml, model_yamls  # noqa: E402
from qarep_det.nn import YAML_MODULES, yaml_module  # noqa: E402
from qarep_det.reparam import OutputDifference, output_difference, reparameterize_model  # noqa: E402
from qarep_det.ultralytics.checkpoint import load_detector  # noqa: E402

globals().update({name: module.cls for name, module in YAML_MODULES.items()})  # the YAML modules, by name

__version__ = "0.2.0"
__all__ = [
    *YAML_MODULES,
    "OutputDifference",
    "load_detector",
    "model_yaml",
    "model_yamls",
    "output_difference",
    "reparameterize_model",
    "yaml_module",
]
