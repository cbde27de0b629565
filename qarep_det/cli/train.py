"""Train a QARep (or RepVGG) detector with Ultralytics' trainer, offline: on CPU, one GPU, or DDP over several GPUs.

  qarep-det train --cfg yolo_qarep_s.yaml --data coco.yaml --device 0,1,2,3
  qarep-det train --resume runs/train/exp/weights/last.pt

python tools/train.py takes the same flags. --cfg is a model YAML file, or the name of one that ships with
qarep_det (yolo_qarep_{n,s,m}.yaml, yolo_qarepv2_*, yolo_repvgg_*; see qarep_det.model_yamls()).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import qarep_det.qat.trainer  # noqa: F401  (registers the QAT trainer: --resume continues QAT runs too)
from qarep_det.cli.common import add_run_args, tool_parser, train_to_end, unexpected_flags
from qarep_det.errors import InputError
from qarep_det.ultralytics.run_options import RECIPE, TrainOptions
from qarep_det.ultralytics.trainer import TRAINERS, make_trainer

RESUME_FLAGS = {"resume", "device", "workers", "data", "project"}  # what --resume may be given with


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The flags, one per ``TrainOptions`` field."""
    recipe = ", ".join(f"{k}={v}" for k, v in RECIPE.items())
    parser = tool_parser(
        __doc__,
        prog,
        allow_abbrev=False,  # so that the flags given with --resume can be told from defaults
        epilog=textwrap.fill(
            f"Training recipe, after YOLOv6-S (override with --hyp): {recipe}. SGD is pinned because Ultralytics' "
            "'auto' picks MuSGD for long runs and ignores lr0; weight decay is scaled by batch * accumulate / 64 as in "
            "YOLOv6. AMP stays on (Ultralytics' default) on CUDA: its check, which would download YOLO26n, is "
            "replaced by an FP16-vs-FP32 comparison on the model being trained. Runs go to PROJECT/NAME, or "
            "PROJECT/NAME-2, NAME-3, ... when that exists; an existing run is overwritten only with --exist-ok.",
            width=100,
        ),
    )
    parser.add_argument("--cfg", type=Path, help="model YAML file or shipped name, e.g. yolo_qarep_s.yaml (required)")
    parser.add_argument(
        "--data", type=Path, help="dataset YAML in Ultralytics format (required; with --resume only if it moved)"
    )
    parser.add_argument("--epochs", type=int, default=300, help="training epochs")
    parser.add_argument("--imgsz", type=int, default=640, help="square train/val image size, a multiple of 32")
    parser.add_argument("--batch", type=int, default=32, help="total batch size, split evenly over DDP devices")
    parser.add_argument(
        "--device",
        default="auto",
        help="'cpu', a CUDA index '0', or indices '0,1,2,3' for DDP; auto: '0' if CUDA is available else 'cpu', "
        "on --resume the run's own device",
    )
    parser.add_argument("--workers", type=int, default=8, help="dataloader workers per process (0 on CPU)")
    add_run_args(parser, "runs/train")
    parser.add_argument("--weights", type=Path, help="fine-tune: start from this checkpoint's matching weights")
    parser.add_argument("--hyp", type=Path, help="YAML of extra Ultralytics train settings, e.g. 'mixup: 0.1'")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--rep-l2",
        choices=list(TRAINERS),
        default="plain",
        help="plain: weight decay (QARepVGG's recipe); custom: RepVGG's L2 on the equivalent kernel "
        "(RepVGGBlock models only)",
    )
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse arguments, check them, train; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(prog).parse_args(argv)
    if args.resume and (ignored := unexpected_flags(argv, RESUME_FLAGS)):
        raise InputError(f"--resume continues a run with its own settings; drop {ignored}")
    trainer = make_trainer(TrainOptions(**vars(args)))
    return train_to_end(trainer, "weights/best.pt, weights/last.pt, results.csv")
