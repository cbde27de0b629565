"""Every K, not a bisection: the tuning and val drop of each K convs kept float (first K of the sensitivity ranking),
to see how far from monotone the curve ``ptq_eval --max-drop`` bisects is, and what the bisection misses.

  python benchmarks/max_drop_sweep.py --weights best.pt --data data.yaml --imgsz 160 --calib-images 256 \\
      --tune-images 256 --backend openvino --max-drop 0.3 --out runs/sweep

The same pieces as ptq_eval: the calibration draw, the ranking on its first ``--rank-images``, the tuning set, the
torch FP32 model as the reference of both drops; OpenVINO candidates are NNCF-quantized per K like ptq_eval's, torch
ones switch quantizers off in one calibrated model. Then the bisection is replayed on the measured curve (the
evaluations are deterministic, so it asks what ptq_eval asks) beside the fewest K that meets D. Writes
``sweep.json``, ``sweep.md`` and ``sweep.png``.
"""

from __future__ import annotations

import json

from benchmark_args import benchmark_parser
from matplotlib.figure import Figure
from tqdm import tqdm

from qarep_det.eval.coco import load_ground_truth
from qarep_det.eval.max_drop import search_float_convs
from qarep_det.eval.predict import evaluate_runner
from qarep_det.eval.protocol import EvalProtocol
from qarep_det.eval.ptq import RANK_IMAGES
from qarep_det.eval.tuning import tuning_set
from qarep_det.integrations.checkpoint import load_detector
from qarep_det.integrations.rankings import rank_sensitivity
from qarep_det.quant.calibration import calibration_set
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.runner import torch_runner
from qarep_det.quant.simulated import with_float_layers
from qarep_det.reparam import reparameterize_model


def main() -> None:
    parser = benchmark_parser(__doc__, imgsz=160, calib_images=256)
    parser.add_argument("--rank-images", type=int, default=RANK_IMAGES)
    parser.add_argument("--tune-images", type=int, default=256)
    parser.add_argument("--backend", choices=("torch", "openvino"), default="openvino")
    parser.add_argument("--max-drop", type=float, default=0.3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = QuantRecipe(calib_images=args.calib_images)
    protocol = EvalProtocol(imgsz=args.imgsz)
    fused = reparameterize_model(load_detector(args.weights))
    calib = calibration_set(args.data, args.imgsz, recipe.calib_images, recipe.seed, progress=False)
    val = load_ground_truth(args.data)
    tuning = tuning_set(args.data, args.tune_images, recipe.seed, calib.paths, val.image_files)
    sensitivity = rank_sensitivity(fused, calib, recipe, rank_images=args.rank_images)
    ranking = sensitivity.ranking

    def score(runner, ground_truth) -> float:
        return evaluate_runner(runner, ground_truth, args.out / "dets.json", protocol, progress=False)["map50_95"]

    fp32 = torch_runner(fused)
    fp32_tune, fp32_val = score(fp32, tuning.ground_truth), score(fp32, val)
    if args.backend == "openvino":
        from qarep_det.quant.openvino import convert_openvino, openvino_runner, quantize_openvino

        fp32_ir = convert_openvino(fused, args.imgsz)

        def candidate(k: int):
            kept = sensitivity.keep(recipe, k)
            return openvino_runner(quantize_openvino(fused, calib, args.imgsz, kept, fp32=fp32_ir))
    else:

        def candidate(k: int):
            return torch_runner(with_float_layers(sensitivity.calibrated, sensitivity.keep(recipe, k)))

    curve = []
    for k in tqdm(range(len(ranking) + 1), desc=f"every K on {args.backend}", unit="K"):
        runner = candidate(k)
        curve.append({"k": k, "tune_drop": fp32_tune - score(runner, tuning.ground_truth),
                      "val_drop": fp32_val - score(runner, val)})  # fmt: skip
    tune = [c["tune_drop"] for c in curve]
    # without --refine every candidate is a prefix of the ranking: K = len(names) on the measured curve
    bisection = search_float_convs(ranking, fp32_tune, lambda names: (fp32_tune - tune[len(names)], 0.0), args.max_drop)
    fewest = next((c["k"] for c in curve if c["tune_drop"] <= args.max_drop), None)
    rises = sum(b > a for a, b in zip(tune, tune[1:], strict=False))  # K + 1 worse than K
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "fp32_tune_map50_95": fp32_tune,
        "fp32_val_map50_95": fp32_val,
        "ranking": ranking,
        "curve": curve,
        "bisection_k": bisection.chosen.k,
        "bisection_evaluated": [s.k for s in bisection.steps],
        "fewest_k": fewest,
        "tune_drop_rises": rises,
        "val_drop_at_bisection": curve[bisection.chosen.k]["val_drop"],
        "val_drop_at_fewest": None if fewest is None else curve[fewest]["val_drop"],
    }
    (args.out / "sweep.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"{args.backend}, {len(ranking)} quantized convs, {tuning.images} tuning images, D = {args.max_drop}: "
        f"the bisection (K = {', '.join(map(str, report['bisection_evaluated']))}) answers K = {bisection.chosen.k} "
        f"(tuning drop {tune[bisection.chosen.k]:.2f}, val drop {report['val_drop_at_bisection']:.2f}); the fewest "
        f"K meeting D in the sweep is {fewest}"
        + ("" if fewest is None else f" (tuning {tune[fewest]:.2f}, val {report['val_drop_at_fewest']:.2f})")
        + f"; the tuning drop rises from K to K + 1 at {rises} of {len(ranking)} steps.",
    ]
    (args.out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ks = [c["k"] for c in curve]
    ax.plot(ks, tune, "-o", markersize=3, label="tuning drop")
    ax.plot(ks, [c["val_drop"] for c in curve], "-s", markersize=3, alpha=0.6, label="val drop")
    ax.plot(report["bisection_evaluated"], [tune[k] for k in report["bisection_evaluated"]], "kx", markersize=8,
            label="evaluated by the bisection")  # fmt: skip
    ax.axhline(args.max_drop, color="gray", linestyle="--", label=f"D = {args.max_drop}")
    ax.set_xlabel("K: convs kept float, first K of the sensitivity ranking")
    ax.set_ylabel("mAP50-95 drop against torch FP32 (points)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{args.weights.parent.parent.name}, {args.backend}, {args.imgsz} px: drop for every K", fontsize=10)
    fig.savefig(args.out / "sweep.png", dpi=110)


if __name__ == "__main__":
    main()
