"""Where INT8 accuracy goes, conv by conv, for one or more detectors, with ptq_eval's recipe.

  python tools/diagnose.py --weights runs/qarep_s/weights/best.pt runs/repvgg_s/weights/best.pt --data coco.yaml

Each model is fused and quantized exactly as ptq_eval does (same calibration draw, same quantized convs, same head
treatment); for every quantized conv it measures the weight and input INT8 SQNR, the detector's output SQNR with
only that conv INT8 (isolated) and that conv's SQNR in the fully INT8 model (cumulative), plus the BN scale
factors of the training form. Writes OUT/report.json, OUT/report.md and PNG plots.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import qarep_det  # noqa: F401  (offline Ultralytics, module registration)
from qarep_det.cli import HelpFormatter, OneLineErrorParser, add_recipe_args, recipe_from_args
from qarep_det.device import torch_device
from qarep_det.eval.diagnose import DiagnoseSettings, run_diagnose


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--weights", nargs="+", type=Path, required=True, help="trained checkpoints (.pt)")
    parser.add_argument("--data", type=Path, required=True, help="dataset YAML; calibration images come from train")
    parser.add_argument("--imgsz", type=int, default=640, help="square letterbox size")
    add_recipe_args(parser, 64, "calibration images from the train split (also the analysed ones)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or a CUDA index such as 0")
    parser.add_argument("--batch", type=int, default=8, help="images per forward pass")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/diagnose/exp"), help="output folder (incremented if it exists)"
    )
    parser.add_argument("--exist-ok", action="store_true", help="write into --out even if it exists, replacing files")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ultralytics.utils.files import increment_path

    out = Path(increment_path(args.out, exist_ok=args.exist_ok))
    try:
        recipe = recipe_from_args(args)
        settings = DiagnoseSettings(args.data, recipe, args.imgsz, args.batch, str(torch_device(args.device)))
        report, files = run_diagnose(args.weights, settings, out, overwrite=args.exist_ok)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for m in report["models"]:
        print(
            f"{m['model']}: most harmful conv {m['ranking'][0]} (isolated), {m['cumulative_ranking'][0]} "
            f"(cumulative); {m['calibrate_s'] + m['analyze_s']:.0f} s"
        )
    print(f"report: {files[0]}, {files[1]}; plots: {', '.join(f.name for f in files[2:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
