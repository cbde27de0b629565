"""Plant an FP32-exact INT8 outlier into a fused detector: a known answer for diagnose and ptq_eval --keep-float.

  qarep-det plant-outlier --weights best.pt --producer model.8.0 --consumer model.8.1 --data DATA --out p.pt

(python tools/plant_outlier.py takes the same flags.)

The busiest FRACTION of the producer block's output channels (largest mean activation on a few calibration images)
are scaled by 2^-EXPONENT and the consumer's matching input weights by 2^+EXPONENT. ReLU is positively homogeneous,
so the FP32 output is unchanged (checked; refused otherwise), while at INT8 the consumer's input scale rounds those
channels away and its weight scales the other channels' weights. The output is an Ultralytics checkpoint of the
fused model in float32; with --unfused, of the training form (BatchNorms scaled instead of fused weights), which QAT and
`qarep-det yolo train ... quantize=8` start from.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import torch

from qarep_det.cli.common import tool_parser
from qarep_det.errors import InputError
from qarep_det.quant.calibration import calibration_set
from qarep_det.reparam import reparameterize_model
from qarep_det.sensitivity.planted import plant_outlier
from qarep_det.ultralytics.checkpoint import load_detector, save_detector
from qarep_det.ultralytics.quantize8 import has_fused_blocks


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = tool_parser(__doc__, prog)
    parser.add_argument("--weights", type=Path, required=True, help="trained checkpoint (.pt), fused or not")
    parser.add_argument("--producer", required=True, help="fused block whose busiest output channels shrink")
    parser.add_argument("--consumer", required=True, help="the block (or conv) that reads the producer's output")
    parser.add_argument("--fraction", type=float, default=0.25, help="share of the producer's channels scaled")
    parser.add_argument("--exponent", type=int, default=12, help="scale by 2^-exponent and 2^+exponent")
    parser.add_argument("--data", type=Path, required=True, help="dataset YAML: train images pick the busiest channels")
    parser.add_argument("--imgsz", type=int, default=640, help="square letterbox size of those images")
    parser.add_argument("--images", type=int, default=8, help="how many train images (seeded draw)")
    parser.add_argument("--seed", type=int, default=0, help="image draw")
    parser.add_argument("--unfused", action="store_true", help="plant into the training form and keep it unfused")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write (.pt)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    if args.out.exists() and not args.overwrite:  # before any work
        raise FileExistsError(f"'{args.out}' exists; pass --overwrite to replace it")
    model = load_detector(args.weights)
    if args.unfused and has_fused_blocks(model):
        raise InputError(f"--unfused needs a training-form checkpoint; '{args.weights}' is fused")
    if not args.unfused:
        model = reparameterize_model(model)
    calib = calibration_set(
        args.data, args.imgsz, n=args.images, seed=args.seed, batch_size=args.images, progress=False
    )
    images = torch.cat(list(calib))
    planted, info = plant_outlier(model, args.producer, args.consumer, images, args.fraction, args.exponent)
    path = save_detector(planted, args.out, images, overwrite=args.overwrite, planted_outlier=asdict(info))
    print(
        f"planted: {len(info.channels)} channels of {info.producer} scaled by 2^-{info.exponent}, {info.consumer} "
        f"inputs by 2^+{info.exponent}; FP32 output change {info.fp32_max_rel_change:.2g} (relative); wrote {path}"
    )
    return 0
