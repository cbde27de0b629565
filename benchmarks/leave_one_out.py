"""The leave-one-out ground truth of one checkpoint on each backend, and how well each sensitivity ranking predicts it.

  python benchmarks/leave_one_out.py --weights best.pt --data data.yaml --imgsz 160 --calib-images 256 \\
      --tune-images 256 --backends torch openvino onnxruntime --out docs/leave_one_out/yolo_repvgg_n

The checkpoint is loaded and fused, and its calibration and tuning images drawn, as ``ptq_eval --max-drop`` does
(the same seed, the tuning set neither calibration nor val images). Each ranking of
``qarep_det.sensitivity.rankings`` is computed on the first ``--rank-images`` of the draw, after one calibration,
on the reference weight grid and again on NNCF's half-range grid when a backend computes with it (OpenVINO with its
overflow fix; ``--overflow-fix on`` reproduces a CPU without VNNI on any CPU, the arithmetic being exact). Per
backend, every quantized conv is reverted alone from the fully INT8 model, the torch model being the one
calibration the rankings made, and scored on the tuning set (``leave_one_out_sweep.py``: one tuning evaluation per
conv, plus the fully INT8 model's). Each ranking is then compared with each backend's sweep (top-5 / top-10
overlap, the same first conv, Kendall's tau), and so is each backend's sweep with the others'.

Writes into ``--out``: ``loo_<backend>.csv`` (one line per conv: gain, and its place in every ranking),
``agreement.md``, ``results.json`` and ``leave_one_out.png``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from benchmark_args import add_overflow_fix, benchmark_parser, overflow_fix
from leave_one_out_sweep import LeaveOneOut, agreement, leave_one_out, write_csv

from qarep_det.evaluation.coco import load_ground_truth
from qarep_det.evaluation.plots import plot_leave_one_out
from qarep_det.evaluation.predict import evaluate_runner
from qarep_det.evaluation.table import markdown_table
from qarep_det.pipelines.ptq import TUNE_IMAGES, PTQSettings
from qarep_det.quant.backends.base import BACKENDS, Job
from qarep_det.quant.calibration import calibration_set
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.runner import torch_runner
from qarep_det.quant.scope import quantized_conv_names
from qarep_det.reparam import reparameterize_model
from qarep_det.sensitivity.rankings import RANKINGS, rank_sensitivity
from qarep_det.sensitivity.tuning import tuning_set
from qarep_det.ultralytics.checkpoint import load_detector


def agreement_rows(sweeps: dict[str, LeaveOneOut], orders: dict[str, list[str]]) -> list[dict[str, object]]:
    """Per backend, each ranking's agreement with its sweep, then each other backend's sweep as a ranking."""
    rows = []
    for backend, sweep in sweeps.items():
        predictors = dict(orders)
        predictors |= {f"leave-one-out on {other}": o.ranking() for other, o in sweeps.items() if other != backend}
        for name, ranking in predictors.items():
            rows.append({"backend": backend, "ranking": name, **agreement(ranking, sweep.ranking(), same_top=(1,))})
    return rows


def main() -> None:
    parser = benchmark_parser(__doc__, imgsz=160, calib_images=256, out="runs/benchmarks/leave_one_out")
    parser.add_argument("--backends", nargs="+", default=["torch"], choices=list(BACKENDS))
    parser.add_argument("--rankings", nargs="+", default=list(RANKINGS), choices=list(RANKINGS))
    parser.add_argument("--tune-images", type=int, default=TUNE_IMAGES)
    parser.add_argument("--tune-split", default="train")
    parser.add_argument("--rank-images", type=int, help="images of the calibration draw ranked (default: ptq_eval's)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="of the simulated model and the rankings")
    parser.add_argument("--seed", type=int, default=0)
    add_overflow_fix(parser)
    args = parser.parse_args()
    try:  # ptq_eval's own checks and draws; a refusal is one line, and --out is not made
        settings = PTQSettings(
            args.data,
            recipe=QuantRecipe(calib_images=args.calib_images, seed=args.seed),
            backends=tuple(args.backends),
            imgsz=args.imgsz,
            batch=args.batch,
            device=args.device,
            tune_images=args.tune_images,
            tune_split=args.tune_split,
            rank_images=args.rank_images,
        )
        recipe, protocol = settings.recipe, settings.protocol
        fused = reparameterize_model(load_detector(args.weights))
        val = load_ground_truth(args.data)
        calib = calibration_set(args.data, args.imgsz, n=recipe.calib_images, seed=recipe.seed, batch_size=args.batch)
        tuning = tuning_set(
            args.data,
            args.tune_images,
            seed=recipe.seed,
            calibration=calib.paths,
            scored=val.image_files,
            split=args.tune_split,
        )
        # every ranking on the reference weight grid, and again on NNCF's half range if a backend computes with it
        grids = dict.fromkeys([False] + [BACKENDS[b].half_range(overflow_fix(args)) for b in args.backends])
        calibrated = None
        sensitivities = {}
        for half_range in grids:
            for name in args.rankings:
                sensitivities[f"{name} (half-range weights)" if half_range else name] = s = rank_sensitivity(
                    fused,
                    calib,
                    recipe,
                    device=args.device,
                    rank_images=settings.ranked_images,
                    rank_by=name,
                    half_range=half_range,
                    calibrated=calibrated,
                )
                calibrated = s.calibrated
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    names = quantized_conv_names(fused, recipe)
    orders = {name: s.ranking for name, s in sensitivities.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    sweeps: dict[str, LeaveOneOut] = {}
    with tempfile.TemporaryDirectory(prefix="qarep_loo_") as scratch:
        start = time.perf_counter()
        fp32 = evaluate_runner(
            torch_runner(fused, args.device),
            tuning.ground_truth,
            Path(scratch) / "fp32.json",
            protocol=protocol,
            batch=args.batch,
        )["map50_95"]
        fp32_s = time.perf_counter() - start
        job = Job(
            fused=fused.cpu(),
            calib=calib,
            recipe=recipe,
            imgsz=args.imgsz,
            device=args.device,
            stem=Path(scratch) / "loo",
            save=False,
            overwrite=True,
            calibrated=calibrated,
            overflow_fix=overflow_fix(args),
        )
        for backend in args.backends:
            sweeps[backend] = leave_one_out(
                job, backend, names, tuning, protocol, Path(scratch), args.batch, fp32_tune_map=fp32
            )
            write_csv(sweeps[backend], args.out / f"loo_{backend}.csv", orders)

    rows = agreement_rows(sweeps, orders)
    costs = {
        name: {
            "calibrate_s": s.calibrate_s,
            "rank_s": s.rank_s,
            "rank_images": settings.ranked_images,
            "ranking": s.ranking,
        }
        for name, s in sensitivities.items()
    }
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "quantized_convs": len(names),
        "tune_images": tuning.images,
        "fp32_tune_map50_95": fp32,
        "fp32_tune_s": fp32_s,
        "torch_threads": torch.get_num_threads(),
        "rankings": costs,
        "leave_one_out": {backend: sweep.as_dict() for backend, sweep in sweeps.items()},
        "agreement": rows,
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    header = ["backend", "ranking", "top-5 overlap", "top-10 overlap", "same first conv", "Kendall tau", "ranking s"]
    cells = [
        [
            r["backend"],
            r["ranking"],
            f"{r['top5']:.1f}",
            f"{r['top10']:.1f}",
            "yes" if r["same_top1"] else "no",
            f"{r['tau']:.2f}",
            f"{costs[r['ranking']]['rank_s']:.0f}" if r["ranking"] in costs else "-",
        ]
        for r in rows
    ]
    lines = [
        f"{args.weights.name} at {args.imgsz} px: {len(names)} quantized convs; tuning set {tuning.describe()}, FP32 "
        f"{fp32:.2f}; rankings on the first {settings.ranked_images} of {recipe.calib_images} calibration images "
        f"({torch.get_num_threads()} torch threads; ranking s excludes the calibration).",
        "",
        *markdown_table(header, cells, [False, False, True, True, False, True, True]),
        "",
        *(
            f"- leave-one-out on {backend}: fully INT8 {s.int8_tune_map50_95:.2f}, {s.evaluations} tuning evaluations "
            f"in {s.seconds:.0f} s; {sum(r.gain != 0 for r in s.rows)} of {len(s.rows)} convs change the tuning mAP "
            f"(the order of the others is model order); top 5: {', '.join(s.ranking()[:5])}; the sweep against itself "
            f"(its even against its odd tuning images): top-5 overlap {half['top5']:.1f}, top-10 {half['top10']:.1f}, "
            f"Kendall tau {half['tau']:.2f}"
            for backend, s in sweeps.items()
            for half in [report["leave_one_out"][backend]["split_half"]]
        ),  # computed once, for results.json
    ]
    (args.out / "agreement.md").write_text("\n".join(lines) + "\n")
    title = f"{args.weights.name} at {args.imgsz} px: the tuning mAP50-95 won back by reverting one conv alone"
    plot_leave_one_out(report["leave_one_out"], orders, args.out / "leave_one_out.png", title)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
