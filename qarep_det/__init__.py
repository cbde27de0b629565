"""qarep_det: quantization-friendly re-parameterized (QARepVGG) blocks for YOLO-style detectors.

Importing the package keeps Ultralytics offline and registers our blocks with its YAML parser.
"""

from qarep_det.integrations.offline import configure_offline

configure_offline()  # must run before anything imports ultralytics

from qarep_det.integrations.ultralytics import register  # noqa: E402

register()

from qarep_det.nn import (  # noqa: E402
    ConvBNReLU,
    QARepBlock,
    QARepCSPStage,
    QARepStage,
    RepVGGBlock,
    RepVGGCSPStage,
    RepVGGStage,
    SimSPPF,
)
from qarep_det.reparam import OutputDifference, output_difference, reparameterize_model  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "ConvBNReLU",
    "OutputDifference",
    "QARepBlock",
    "QARepCSPStage",
    "QARepStage",
    "RepVGGBlock",
    "RepVGGCSPStage",
    "RepVGGStage",
    "SimSPPF",
    "output_difference",
    "reparameterize_model",
]
