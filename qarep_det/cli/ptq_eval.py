"""COCO mAP at FP32 versus INT8 (post-training quantization), side by side, for one or more detectors.

  qarep-det ptq-eval --weights runs/qarep_s/weights/best.pt runs/repvgg_s/weights/best.pt --data coco.yaml
  qarep-det ptq-eval            # the embedded demo: synthetic data, two briefly trained detectors, CPU

(python tools/ptq_eval.py takes the same flags.)
Each model is re-parameterized (fused), evaluated at FP32, calibrated on seeded train images letterboxed like
evaluation, quantized (INT8 symmetric, per-channel weights, per-tensor activations at every conv input) and
evaluated again with pycocotools. Results go to OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from qarep_det.cli.common import (
    add_output_args,
    add_partial_args,
    add_rank_args,
    add_recipe_args,
    library_noise_hidden,
    output_folder,
    recipe_from_args,
    tool_parser,
)
from qarep_det.cli.demo import DemoSettings, check_demo, run_demo
from qarep_det.device import torch_device
from qarep_det.errors import InputError
from qarep_det.evaluation.table import format_console
from qarep_det.pipelines.ptq import RANK_IMAGES, TUNE_IMAGES, PTQSettings, run_ptq_eval
from qarep_det.quant.backends.base import BACKENDS
from qarep_det.quant.backends.openvino import OPENVINO_ACTIVATIONS, OVERFLOW_FIX
from qarep_det.sensitivity.float_cost import DEFAULT_FLOAT_COST, FLOAT_COST_HELP
from qarep_det.sensitivity.rankings import DEFAULT_RANKING, RANKING_HELP

DEMO = DemoSettings()


def add_int8_args(parser: argparse.ArgumentParser, calib_images: int | None, calib_help: str, batch_help: str) -> None:
    """The flags that decide an INT8 model, which ``export --int8`` takes as ptq-eval does, so the same flags make the
    same model in both: the recipe, which convs stay float and how they are chosen, NNCF's overflow fix, the device
    of the simulated model and the batch. ``calib_images`` is the default of ``--calib-images``."""
    add_recipe_args(parser, calib_images, calib_help)
    partial = add_partial_args(parser)
    partial.add_argument(
        "--max-drop",
        type=float,
        metavar="D",
        help="keep the fewest convs float, in ranking order, for an INT8 mAP50-95 drop of at most D points on the "
        "tuning set, per model and backend (a bisection over K: at most 2 + ceil(log2(convs)) tuning evaluations, "
        "R more with --refine R). The tuning set is never the scored val split, whose drop would then be optimistic, "
        "nor a calibration image",
    )
    parser.add_argument(
        "--tune-images",
        type=int,
        default=TUNE_IMAGES,
        metavar="N",
        help="--max-drop's tuning set: N images of --tune-split that are neither calibration nor val images, the "
        "continuation of the calibration draw's seeded shuffle for train, scored against their YOLO labels",
    )
    parser.add_argument("--tune-split", default="train", help="split of the data YAML to draw the tuning images from")
    parser.add_argument(
        "--refine",
        type=int,
        default=0,
        metavar="R",
        help="--max-drop only: re-rank the first R convs of the ranking by their tuning mAP with each reverted alone "
        "to float (as NNCF's accuracy control ranks, on the first R only), then bisect on that order; R more tuning "
        "evaluations, made only when the fully INT8 model misses D (default 0: the ranking's order)",
    )
    add_rank_args(parser, f"{RANK_IMAGES}, or all if fewer are calibrated")
    parser.add_argument(
        "--rank-by",
        default=DEFAULT_RANKING,
        metavar="NAME",
        help=f"how --keep-float / --max-drop rank the convs, most harmful first: {RANKING_HELP} "
        f"(default: {DEFAULT_RANKING}; how each agrees with the leave-one-out mAP: docs/diagnose.md)",
    )
    parser.add_argument(
        "--float-cost",
        default=DEFAULT_FLOAT_COST,
        metavar="NAME",
        help="what a conv kept float by --keep-float / --max-drop costs, and so which convs go first: "
        f"{FLOAT_COST_HELP} (default: {DEFAULT_FLOAT_COST}; the measurement: docs/diagnose.md)",
    )
    parser.add_argument(
        "--overflow-fix",
        choices=OVERFLOW_FIX,
        default="auto",
        help="openvino: NNCF's overflow fix (7-bit weights, exact int16 sums), for the CPU the IR will run on: on for "
        "CPUs without VNNI/AMX (AVX2, AVX-512F), off for those with (8-bit weights; on them the fix only costs "
        "accuracy); auto: as this CPU needs; onnxruntime-int8 follows it with onnxruntime's reduce_range (7-bit "
        "weights). The rankings of --keep-float / --max-drop see the same weight grid",
    )
    parser.add_argument(
        "--openvino-activations",
        choices=OPENVINO_ACTIVATIONS,
        default="signed",
        help="openvino: the activations' grid. signed: TensorRT's (symmetric, step max/127), so the IR computes what "
        "the simulated and QDQ models do; asymmetric: NNCF's preset MIXED ([min, max] with a zero point: after a "
        "ReLU a step of max/255), the grid of Ultralytics' own INT8 export and as fast, for a model only OpenVINO "
        "will run (docs/int8.md)",
    )
    parser.add_argument(
        "--device", default="cpu", help="device of the FP32 and simulated (torch) INT8 models: cpu or a CUDA index"
    )
    parser.add_argument("--batch", type=int, default=8, help=batch_help)


def int8_settings(
    args: argparse.Namespace, data: Path, backends: tuple[str, ...], imgsz: int, calib_images: int, **more: Any
) -> PTQSettings:
    """The settings the flags of :func:`add_int8_args` describe; ``more``: the tool's own settings."""
    return PTQSettings(
        data=data,
        recipe=recipe_from_args(args, calib_images),
        backends=backends,
        imgsz=imgsz,
        batch=args.batch,
        device=str(torch_device(args.device)),
        keep_float=args.keep_float,
        max_drop=args.max_drop,
        tune_images=args.tune_images,
        tune_split=args.tune_split,
        refine=args.refine,
        rank_images=args.rank_images,
        rank_by=args.rank_by,
        float_cost=args.float_cost,
        overflow_fix=OVERFLOW_FIX[args.overflow_fix],
        asymmetric_activations=args.openvino_activations == "asymmetric",
        **more,
    )


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = tool_parser(__doc__, prog)
    parser.add_argument("--weights", nargs="+", type=Path, help="trained checkpoints (.pt); none: run the demo")
    parser.add_argument("--data", type=Path, help="dataset YAML with train and val splits; none: run the demo")
    parser.add_argument(
        "--fp32-weights",
        type=Path,
        help="the FP32 model of a QAT checkpoint that carries none (Ultralytics' own quantize=8: e.g. the checkpoint "
        "it started from); without it that checkpoint's FP32 columns stay empty (qarep-det qat checkpoints carry one)",
    )
    parser.add_argument("--imgsz", type=int, help=f"square letterbox size (default 640, demo {DEMO.imgsz})")
    add_int8_args(
        parser,
        None,
        f"calibration images from the train split (default 512, demo {DEMO.calib_images})",
        "evaluation and calibration batch size",
    )
    parser.add_argument(
        "--backend",
        nargs="+",
        choices=BACKENDS,
        default=["torch"],
        help="INT8 backends: torch (simulated), openvino (real INT8, CPU), onnxruntime (the torch backend's QDQ ONNX, "
        "CPU; shares its calibration), onnxruntime-int8 (real INT8, CPU: onnxruntime's quantize_static, integer "
        "QLinearConv kernels; --calib-method max only; not for QAT checkpoints)",
    )
    parser.add_argument("--instances-json", type=Path, help="COCO val instances json (default: found beside COCO)")
    add_output_args(parser, "runs/ptq/exp")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    demo = args.weights is None and args.data is None
    if (args.weights is None) != (args.data is None):
        raise InputError("give both --weights and --data, or neither (to run the demo)")
    imgsz = args.imgsz or (DEMO.imgsz if demo else 640)
    calib_images = args.calib_images or (DEMO.calib_images if demo else 512)
    out = output_folder(args)
    # every input is checked before anything is written (the demo writes a dataset and trains)
    settings = int8_settings(
        args,
        args.data or Path(),
        tuple(args.backend),
        imgsz,
        calib_images,
        instances_json=args.instances_json,
        overwrite=args.exist_ok,
        fp32_weights=args.fp32_weights,
    )
    weights = args.weights
    if demo:
        demo_settings = replace(DEMO, imgsz=imgsz)
        check_demo(demo_settings, settings.recipe, settings.keep_float)
        print(f"demo: synthetic data and two briefly trained detectors in {out}")
        data, weights = run_demo(out / "demo", demo_settings)
        settings = replace(settings, data=data)
    with library_noise_hidden():
        rows, json_path, md_path = run_ptq_eval(weights, settings, out)
    print(format_console(rows, settings.protocol))
    plot = json_path.with_name("max_drop.png")
    print(f"results: {json_path}, {md_path}" + (f"; trade-off plot: {plot}" if args.max_drop is not None else ""))
    return 0
