"""A QAT checkpoint's fake-quant model against the QDQ ONNX exported from it on onnxruntime, output by output.

  python benchmarks/qat_artefact_gap.py --weights RUN/weights/best.pt --data data.yaml --imgsz 160 --out gap

Ultralytics' val of a QAT best.pt and of its exported ONNX differ by tenths of mAP50-95 on a small val set when a few
detections flip, which says little about where the two disagree. This compares what decides the detections: the
Detect output of the fake-quant model (restored from the checkpoint as Ultralytics' val restores it) and of the ONNX
Ultralytics exports from it, on the same letterboxed train images (the calibration draw). On confident anchors (a
class score above 0.25 in either): the largest box difference and the share of box coordinates more than 0.5 px
apart; over all anchors: the largest class-score difference. Works for checkpoints of ``qarep-det qat`` and of
``qarep-det yolo train ... quantize=8`` alike. Writes ``results.json`` into ``--out``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from benchmark_args import benchmark_parser
from ultralytics import YOLO

import qarep_det  # noqa: F401  (registers our modules before Ultralytics unpickles the checkpoint)
from qarep_det.quant.backends.onnx_qdq import onnx_runner
from qarep_det.quant.calibration import calibration_set
from qarep_det.quant.runner import torch_runner

CONFIDENT = 0.25  # Ultralytics' default predict confidence


def gap(weights: Path, images: torch.Tensor, imgsz: int) -> dict[str, float]:
    """The output differences between ``weights``' fake-quant model and its ONNX export (made in a scratch folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / weights.name
        shutil.copy(weights, copy)
        run_onnx = onnx_runner(YOLO(str(copy)).export(format="onnx", imgsz=imgsz))
        engine = torch.cat([run_onnx(x[None]) for x in images]).numpy()  # a batch-1 graph: image by image
        fake_quant = torch_runner(YOLO(str(copy)).model.float())(images).numpy()
    diff = np.abs(fake_quant - engine)
    confident = np.maximum(fake_quant[:, 4:].max(1), engine[:, 4:].max(1)) > CONFIDENT  # (N, anchors)
    box = diff[:, :4].transpose(0, 2, 1)[confident]  # (confident anchors, 4)
    return {
        "confident_anchors": int(confident.sum()),
        "box_max_px": float(box.max()) if box.size else 0.0,
        "box_share_over_half_px": float((box > 0.5).mean()) if box.size else 0.0,
        "class_score_max": float(diff[:, 4:].max()),
    }


def main() -> None:
    parser = benchmark_parser(__doc__, imgsz=640, calib_images=16, out="runs/benchmarks/qat_artefact_gap")
    parser.add_argument("--more-weights", type=Path, nargs="*", default=[], help="further checkpoints, same images")
    args = parser.parse_args()
    images = torch.cat(list(calibration_set(args.data, args.imgsz, n=args.calib_images, seed=0, progress=False)))
    results = {str(w): gap(w, images, args.imgsz) for w in [args.weights, *args.more_weights]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    for weights, row in results.items():
        print(weights, ", ".join(f"{k} {v:.3g}" for k, v in row.items()))


if __name__ == "__main__":
    main()
