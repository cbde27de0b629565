"""How stable the sensitivity ranking is on fewer images: the ranking ``--keep-float`` and ``--max-drop`` use, on
subsets of M images of the calibration draw, against the ranking on all of them.

  python benchmarks/ranking_stability.py --weights W.pt --data DATA --imgsz 320 --calib-images 512 --out DIR

The simulated model is calibrated once on every calibration image (as ptq_eval does), then each batch gets its own
isolated passes (``isolated_noise``). A subset's figures are the sums of its batches' signal and noise powers, which
is exactly what ranking that subset alone computes (the ranking divides those sums). For each M: every disjoint
subset of M consecutive images of the draw (the first one is the prefix ``--rank-images M`` takes), its overlap with
the full ranking's top 5 and top 10, whether its top K equals the full top K (what ``--keep-float K`` keeps), and
Kendall's tau between the two orders of all convs (``leave_one_out_sweep.agreement``). Writes
``stability.json`` and ``stability.md``.
"""

from __future__ import annotations

import json
import statistics
import time

import torch
from benchmark_args import benchmark_parser
from leave_one_out_sweep import agreement
from tqdm import tqdm

from qarep_det.evaluation.table import markdown_table
from qarep_det.quant.backends.simulated import quantize_torch
from qarep_det.quant.calibration import calibration_set
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.reparam import reparameterize_model
from qarep_det.sensitivity.analysis import isolated_noise, rank_by_noise
from qarep_det.sensitivity.diagnostics import NoisePower
from qarep_det.ultralytics.checkpoint import load_detector

Noise = dict[str, tuple[NoisePower, NoisePower]]


def summed(batches: list[Noise]) -> Noise:
    """The figures of several batches ranked together: signal and noise powers added."""
    total: Noise = {}
    for noise in batches:
        for name, powers in noise.items():
            previous = total.get(name, (NoisePower(), NoisePower()))
            pairs = zip(previous, powers, strict=True)
            total[name] = tuple(NoisePower(a.signal + b.signal, a.noise + b.noise) for a, b in pairs)
    return total


def main() -> None:
    parser = benchmark_parser(__doc__, imgsz=640, calib_images=512, out="runs/benchmarks/ranking_stability")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument("--keep", type=int, nargs="+", default=[1, 2, 4], help="top-K sets compared")
    parser.add_argument("--batch", type=int, default=8, help="images per batch; every size must be a multiple")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if bad := [m for m in args.sizes if m % args.batch or m > args.calib_images]:
        parser.error(f"sizes must be multiples of --batch up to --calib-images: {bad}")

    fused = reparameterize_model(load_detector(args.weights))
    recipe = QuantRecipe(calib_images=args.calib_images, seed=args.seed)
    calib = calibration_set(args.data, args.imgsz, n=args.calib_images, seed=args.seed, batch_size=args.batch)
    start = time.perf_counter()
    qmodel = quantize_torch(fused, calib, recipe)
    calibrate_s = time.perf_counter() - start
    batches: list[Noise] = []
    start = time.perf_counter()
    for batch in tqdm(list(calib), desc="isolated passes", unit="batch"):
        batches.append(isolated_noise(fused, qmodel, [batch], recipe=recipe, progress=False))
    analyse_s = time.perf_counter() - start
    images = sum(b.shape[0] for b in calib)
    reference = rank_by_noise(summed(batches))
    keep = tuple(args.keep)
    sizes = {}
    for m in args.sizes:
        per = m // args.batch
        groups = [batches[i : i + per] for i in range(0, len(batches) - per + 1, per)]
        results = [agreement(rank_by_noise(summed(g)), reference, keep) for g in groups]
        sizes[m] = {
            "subsets": len(results),
            "prefix": results[0],
            **{f"{key}_mean": statistics.fmean(float(r[key]) for r in results) for key in results[0]},
            **{f"{key}_min": min(float(r[key]) for r in results) for key in ("top5", "top10", "tau")},
        }
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "images": images,
        "convs": len(reference),
        "calibrate_s": round(calibrate_s, 1),
        "isolated_s_per_image": round(analyse_s / images, 3),
        "reference_top10": reference[:10],
        "sizes": sizes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stability.json").write_text(json.dumps(report, indent=2) + "\n")
    header = [
        "M",
        "subsets",
        "top-5 overlap, mean (min)",
        "top-10 overlap, mean (min)",
        "Kendall tau, mean (min)",
        *(f"same top {k}" for k in keep),
        "first M (--rank-images): top 5 / top 10 / tau",
    ]
    rows = []
    for m, r in sizes.items():
        p = r["prefix"]
        rows.append(
            [
                str(m),
                str(r["subsets"]),
                f"{r['top5_mean']:.2f} ({r['top5_min']:.1f})",
                f"{r['top10_mean']:.2f} ({r['top10_min']:.1f})",
                f"{r['tau_mean']:.2f} ({r['tau_min']:.2f})",
                *(f"{r[f'same_top{k}_mean']:.0%}" for k in keep),
                f"{p['top5']:.1f} / {p['top10']:.1f} / {p['tau']:.2f}",
            ]
        )
    lines = [
        f"Against the ranking on all {images} images ({len(reference)} convs; isolated passes "
        f"{report['isolated_s_per_image']} s per image, calibration {report['calibrate_s']} s, "
        f"{torch.get_num_threads()} torch threads).",
        "",
        *markdown_table(header, rows, [False, True, True, True, True, *(True for _ in keep), False]),
    ]
    (args.out / "stability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
