"""Parameters and GFLOPs of model YAMLs in the training form and fused: the model-size tables of docs/results.md.

  python benchmarks/model_size.py [yolo_qarep_n.yaml ...] [--imgsz 640]

Parameters are counted on ``DetectionModel(name)`` (80 classes) and on its ``reparameterize_model`` copy, GFLOPs by
Ultralytics' ``get_flops`` at the image size; nothing here depends on the machine, so the table re-makes exactly.
Without names it measures every shipped YAML.
"""

from __future__ import annotations

import argparse

from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils.torch_utils import get_flops

import qarep_det
from qarep_det.evaluation.table import markdown_table


def size(model: DetectionModel, imgsz: int) -> tuple[str, str]:
    """Parameters in millions and GFLOPs at ``imgsz``, as the docs' tables print them."""
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M", f"{get_flops(model, imgsz):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("yamls", nargs="*", help="model YAMLs, files or shipped names (default: every shipped one)")
    parser.add_argument("--imgsz", type=int, default=640)
    args = parser.parse_args()
    rows = []
    for name in args.yamls or qarep_det.model_yamls():
        model = DetectionModel(name, verbose=False)
        rows.append([name, *size(model, args.imgsz), *size(qarep_det.reparameterize_model(model), args.imgsz)])
    header = ["model", "params (train form)", "GFLOPs (train form)", "params (fused)", "GFLOPs (fused)"]
    print("\n".join(markdown_table(header, rows, [False, True, True, True, True])))


if __name__ == "__main__":
    main()
