"""Where INT8 accuracy goes, conv by conv, for one or more detectors, with ptq_eval's recipe.

  qarep-det diagnose --weights runs/qarep_s/weights/best.pt runs/repvgg_s/weights/best.pt --data coco.yaml

(python tools/diagnose.py takes the same flags.)

Each model is fused and quantized exactly as ptq_eval does (same calibration draw, same quantized convs, same head
treatment); for every quantized conv it measures the weight and input INT8 SQNR, the detector's output SQNR with
only that conv INT8 (isolated) and that conv's SQNR in the fully INT8 model (cumulative), plus the BN scale
factors of the training form. Writes OUT/report.json, OUT/report.md and PNG plots.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qarep_det.cli.common import (
    add_output_args,
    add_rank_args,
    add_recipe_args,
    output_folder,
    recipe_from_args,
    tool_parser,
)
from qarep_det.device import torch_device
from qarep_det.pipelines.diagnose import DiagnoseSettings, run_diagnose


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = tool_parser(__doc__, prog)
    parser.add_argument("--weights", nargs="+", type=Path, required=True, help="trained checkpoints (.pt)")
    parser.add_argument("--data", type=Path, required=True, help="dataset YAML; calibration images come from train")
    parser.add_argument("--imgsz", type=int, default=640, help="square letterbox size")
    add_recipe_args(parser, 64, "calibration images from the train split (also the analysed ones)")
    add_rank_args(parser, "all of them")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or a CUDA index such as 0")
    parser.add_argument("--batch", type=int, default=8, help="images per forward pass")
    add_output_args(parser, "runs/diagnose/exp")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    out = output_folder(args)
    recipe = recipe_from_args(args)
    device = str(torch_device(args.device))
    settings = DiagnoseSettings(args.data, recipe, args.imgsz, args.batch, device, args.rank_images)
    report, files = run_diagnose(args.weights, settings, out, overwrite=args.exist_ok)
    for m in report["models"]:
        print(
            f"{m['model']}: most harmful conv {m['ranking'][0]} (isolated), {m['cumulative_ranking'][0]} "
            f"(cumulative); {m['calibrate_s'] + m['analyze_s']:.0f} s"
        )
    print(f"report: {files[0]}, {files[1]}; plots: {', '.join(f.name for f in files[2:])}")
    return 0
