"""The evaluation protocol: the settings a mAP number depends on, kept next to every number it produced.

Published COCO numbers differ by protocol (Ultralytics val: conf 0.001, NMS IoU 0.7, max_det 300; YOLOv6's
eval: conf 0.03, IoU 0.65), so a result table is meaningless without it. Torch-free, so tables can import it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalProtocol:
    """Pre- and post-processing of one evaluation, passed whole to :func:`~qarep_det.evaluation.predict.predict`;
    defaults are Ultralytics val's."""

    imgsz: int = 640
    conf: float = 0.001
    iou: float = 0.7
    max_det: int = 300
    multi_label: bool = True

    def describe(self) -> str:
        """One line for table footers and logs."""
        labels = "multi-label" if self.multi_label else "best class per box"
        return (
            f"{self.imgsz} px letterbox, conf {self.conf:g}, NMS IoU {self.iou:g}, max_det {self.max_det}, "
            f"{labels}; pycocotools bbox mAP (maxDets 100), in percent"
        )
