"""The QARepVGG paper's ablation ladder on your data: train S0-S4 over seeds, FP32 vs INT8, C1/C2 diagnoses.

  qarep-det ladder --data data.yaml --steps S0 S1 S4 --seeds 0 1 2 --epochs 30 --imgsz 160 --device cpu
  qarep-det ladder --data data.yaml --groups 4 --device 0          # the _g4 models, every step

(python tools/ladder.py takes the same flags.) S0 yolo_repvgg_n with RepVGG's custom L2, S1 the same with weight decay,
S2 yolo_repvgg_noidbn_n, S3 yolo_qarep_nopostbn_n, S4 yolo_qarep_n (QARepVGG). Each (step, seed) trains with
Ultralytics' seed and deterministic mode, is scored FP32 vs INT8 like ptq-eval (one recipe, each --backend) and
diagnosed (BN scales and dead channels, fused-kernel outliers; block output max/std). Writes OUT/ladder.json,
ladder.md and ladder.png; the runs go to OUT/runs/<step>_seed<seed>. Running it again with the same --out resumes:
finished trainings and evaluations are reused, an interrupted training continues from its last epoch, and new steps
or seeds are added to the study.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qarep_det.cli.common import library_noise_hidden, tool_parser
from qarep_det.pipelines.ladder import GROUPS, STEPS, LadderSettings, run_ladder
from qarep_det.quant.backends.base import BACKENDS
from qarep_det.quant.recipe import CALIB_METHODS


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = tool_parser(__doc__, prog)
    parser.add_argument("--data", type=Path, required=True, help="dataset YAML with train and val splits")
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS), help="ladder steps to run")
    parser.add_argument(
        "--groups", type=int, choices=GROUPS, default=1, help="groups of every Rep block but the stem (4: _g4 models)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds of every step")
    parser.add_argument("--epochs", type=int, default=300, help="training epochs")
    parser.add_argument("--imgsz", type=int, default=640, help="train, val and calibration size, a multiple of 32")
    parser.add_argument("--batch", type=int, default=32, help="training batch size")
    parser.add_argument("--device", default="auto", help="'cpu' or a CUDA index; auto: '0' if CUDA is available")
    parser.add_argument("--workers", type=int, default=8, help="dataloader workers (0 on CPU)")
    parser.add_argument("--hyp", type=Path, help="YAML of extra Ultralytics train settings, as train's --hyp")
    parser.add_argument("--calib-images", type=int, default=512, help="calibration images from the train split")
    parser.add_argument("--calib-method", choices=CALIB_METHODS, default="max", help="activation range calibrator")
    parser.add_argument(
        "--backend", nargs="+", choices=BACKENDS, default=["torch"], help="INT8 backends, as ptq-eval's --backend"
    )
    parser.add_argument("--eval-batch", type=int, default=8, help="evaluation and calibration batch size")
    parser.add_argument(
        "--activation-images",
        type=int,
        default=8,
        help="C2: block outputs read on the first N calibration images",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/ladder/exp"), help="study folder; an existing study there resumes"
    )
    return parser


def _progress_line(row: dict[str, Any]) -> None:
    """One line per (step, seed) as it is ready."""
    drops = ", ".join(f"{b} drop {v['drop']:.2f}" for b, v in row["backends"].items())
    fp32 = next(iter(row["backends"].values()))["fp32_map50_95"]
    print(f"ladder: {row['step']} seed {row['seed']}: FP32 mAP50-95 {fp32:.2f}, {drops}", flush=True)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    settings = LadderSettings(
        data=args.data,
        steps=tuple(args.steps),
        groups=args.groups,
        seeds=tuple(args.seeds),
        epochs=args.epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        device=args.device,
        workers=args.workers,
        hyp=args.hyp,
        calib_images=args.calib_images,
        calib_method=args.calib_method,
        backends=tuple(args.backend),
        eval_batch=args.eval_batch,
        activation_images=args.activation_images,
    )
    with library_noise_hidden():
        result = run_ladder(settings, args.out, on_row=_progress_line)
    print(result.md_path.read_text(encoding="utf-8"))
    print(f"results: {result.json_path}, {result.md_path}, {result.png_path}")
    return 0
