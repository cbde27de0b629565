"""Quantization-aware fine-tuning (QAT) of a trained detector on Ultralytics' trainer, offline.

  qarep-det qat --weights runs/train/exp/weights/best.pt --data coco.yaml --epochs 10 --device 0
  qarep-det qat --resume runs/qat/exp/weights/last.pt
  qarep-det ptq-eval --weights runs/qat/exp/weights/best.pt --data coco.yaml   # FP32 vs the QAT INT8 model

(python tools/qat.py takes the same flags.)

The checkpoint is fused, quantized with ptq_eval's recipe (ModelOpt, TensorRT's INT8 scheme, the same seeded calibration
draw and head treatment) and fine-tuned, its quantizer ranges learned or frozen (--ranges). best.pt and last.pt are
Ultralytics QAT checkpoints (YOLO(best.pt) gives the INT8 model back) that also carry the FP32 model the run started
from, for ptq_eval and --distill. A QAT checkpoint as --weights starts a new run from it with its own ranges.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from qarep_det.cli.common import (
    add_partial_args,
    add_recipe_args,
    add_run_args,
    explicit_flags,
    recipe_from_args,
    tool_parser,
    train_to_end,
    unexpected_flags,
)
from qarep_det.errors import InputError
from qarep_det.qat.trainer import DEFAULT_RANGES, LEARNING_RATES, QAT_RECIPE, QATOptions, make_qat_trainer
from qarep_det.qat.training_form import DEFAULT_FORM, FORMS
from qarep_det.quant.qat import DISTILL_WEIGHT, RANGES

RESUME_FLAGS = {"resume", "device", "workers", "data", "project"}  # what --resume may be given with
RECIPE_FLAGS = {"calib_images", "calib_method", "percentile", "keep_head_float", "keep_float", "keep_float_layers"}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    recipe = ", ".join(f"{k}={v}" for k, v in QAT_RECIPE.items())
    parser = tool_parser(
        __doc__,
        prog,
        allow_abbrev=False,  # so that explicit flags can be told from defaults
        epilog=textwrap.fill(
            f"Fine-tuning recipe: {recipe}. No warmup (Ultralytics' warmup starts biases at lr 0.1), no mosaic, "
            "FP32 rather than AMP (float16 rounding would add noise the INT8 engine does not have). The EMA's ranges "
            f"are kept equal to the model's. --distill adds {DISTILL_WEIGHT:g} x the mean normalized L2 between the "
            "student's and the FP32 model's Detect inputs to the detection loss.",
            width=100,
        ),
    )
    parser.add_argument("--weights", type=Path, help="trained FP32 checkpoint, or a QAT one to continue from")
    parser.add_argument("--data", type=Path, help="dataset YAML: its train split calibrates and trains")
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    parser.add_argument("--imgsz", type=int, default=640, help="train/val/calibration image size, a multiple of 32")
    parser.add_argument("--batch", type=int, default=32, help="total batch size, split evenly over DDP devices")
    parser.add_argument("--device", default="auto", help="'cpu', '0', or '0,1,...' for DDP; auto: '0' if CUDA")
    parser.add_argument("--workers", type=int, default=8, help="dataloader workers per process")
    defaults = "; ".join(f"{k}: lr0 {lr0:g}, ranges {lr:g}" for k, (lr0, lr) in LEARNING_RATES.items())
    parser.add_argument(
        "--optimizer",
        choices=tuple(LEARNING_RATES),
        default=QAT_RECIPE["optimizer"],
        help=f"Adam by default: a fused model's weights and ranges span orders of magnitude, which SGD's steps do "
        f"not (docs/qat.md); default learning rates: {defaults}",
    )
    parser.add_argument("--lr0", type=float, help="initial learning rate of the weights; default: the optimizer's")
    parser.add_argument(
        "--ranges",
        choices=RANGES,
        default=DEFAULT_RANGES,
        help="quantizer ranges: learned (LSQ's gradients, stepped in the log domain, no weight decay) or frozen at "
        "their calibration. Learned by default: it won back a clipping calibration's drop where frozen ranges "
        "could not, and stayed close to frozen ranges on well-calibrated models (docs/qat.md)",
    )
    parser.add_argument(
        "--lr-ranges", type=float, help="initial learning rate of learned ranges; default: the optimizer's"
    )
    parser.add_argument(
        "--form",
        choices=FORMS,
        default=DEFAULT_FORM,
        help="what trains: the fused convs (fused), or each block's branches and BNs (training: every forward "
        "folds them, BN statistics frozen, into the one kernel that is fake-quantized and run, so the deployed "
        "arithmetic trains in the branch parameterisation; checkpoints hold the fused student; no --resume). "
        "Same calibration and quantizers either way (docs/qat.md)",
    )
    add_recipe_args(parser, 512, "calibration images from the train split")
    add_partial_args(parser)
    parser.add_argument("--distill", action="store_true", help="add feature distillation from the FP32 model")
    add_run_args(parser, "runs/qat")
    return parser


def options_from(args: argparse.Namespace, argv: list[str]) -> QATOptions:
    """Tool flags to options; flags that cannot apply to the run fail here with one line."""
    if args.resume and (ignored := unexpected_flags(argv, RESUME_FLAGS)):
        raise InputError(f"--resume continues a run with its own settings; drop {ignored}")
    fields = {k: v for k, v in vars(args).items() if k in QATOptions.__dataclass_fields__}
    recipe_flags = sorted(explicit_flags(argv) & RECIPE_FLAGS)
    return QATOptions(**fields, recipe=recipe_from_args(args), recipe_flags=recipe_flags)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(prog).parse_args(argv)
    trainer = make_qat_trainer(options_from(args, argv))
    return train_to_end(trainer, "weights/best.pt, weights/last.pt: INT8 QAT checkpoints, results.csv")
