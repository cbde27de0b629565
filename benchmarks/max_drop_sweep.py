"""The drop against K, the convs kept float (the first K of an order), measured rather than bisected, for several
orders side by side: how far from monotone the curve ``ptq_eval --max-drop`` bisects is, what the bisection answers
on it, and, scored on a val split large enough to resolve it, how many convs each order truly needs for a drop of D.

  python benchmarks/max_drop_sweep.py --weights best.pt --data data.yaml --imgsz 160 --calib-images 256 \\
      --tune-images 256 --backend openvino --max-drop 0.3 --rank-by fisher revert --out runs/sweep

The same pieces as ptq_eval: the calibration draw, each ``--rank-by`` ranking on its first ``--rank-images`` (on the
backend's weight grid, as ptq_eval ranks), the tuning set, the torch FP32 model as the reference of both drops.
``--order LABEL=FILE`` adds an order of one's own (conv names, one per line, the first kept float first): a
leave-one-out sweep's, or the float convs another tool chose (an order shorter than the model's convs is measured
up to its length). Without ``--ks`` every K is measured and the bisection is replayed on each full-length order's
tuning curve (the evaluations are deterministic, so it asks what ptq_eval asks); ``--ks`` measures only those K
(and each order's full length), no bisection. A candidate with the same float convs as one already measured is not
measured again. The val drop carries its paired standard error (per-image AP50-95): give the data YAML a large val
split (e.g. another seed of ``tools/make_dataset.py``) and the val curve is the truth the tuning curve estimates.

Writes ``sweep.json``, ``sweep.md`` and ``sweep.png`` into ``--out``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

from benchmark_args import add_overflow_fix, benchmark_parser, overflow_fix
from matplotlib.figure import Figure
from tqdm import tqdm

from qarep_det.evaluation.coco import GroundTruth, load_ground_truth, per_image_map50_95
from qarep_det.evaluation.predict import evaluate_runner
from qarep_det.evaluation.protocol import EvalProtocol
from qarep_det.evaluation.table import markdown_table
from qarep_det.pipelines.ptq import RANK_IMAGES
from qarep_det.quant.backends.base import BACKENDS, Job
from qarep_det.quant.calibration import calibration_set
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.runner import Runner, torch_runner
from qarep_det.quant.scope import quantized_conv_names
from qarep_det.reparam import reparameterize_model
from qarep_det.sensitivity.max_drop import search_float_convs
from qarep_det.sensitivity.rankings import RANKINGS, rank_sensitivity
from qarep_det.sensitivity.resolution import Resolution
from qarep_det.sensitivity.tuning import tuning_set
from qarep_det.ultralytics.checkpoint import load_detector


def read_order(spec: str, convs: list[str]) -> tuple[str, list[str]]:
    """``LABEL=FILE`` as (label, conv names); a name that is not a quantized conv of the model, or one given twice,
    is refused."""
    label, _, path = spec.partition("=")
    if not label or not path:
        raise ValueError(f"--order takes LABEL=FILE, got {spec!r}")
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    unknown = [n for n in names if n not in convs]
    if unknown or len(set(names)) != len(names) or not names:
        raise ValueError(
            f"--order {label}: {path} must list distinct quantized convs of this model"
            + (f"; not one: {', '.join(unknown[:3])}" if unknown else "")
        )
    return label, names


class Scorer:
    """Each candidate's tuning and val mAP50-95, measured once per float set, with the paired SE of its val drop."""

    def __init__(self, job: Job, backend: str, tuning: GroundTruth, val: GroundTruth, args, scratch: Path) -> None:
        self.job, self.backend, self.tuning, self.val = job, backend, tuning, val
        self.args, self.scratch = args, scratch
        self.measured: dict[frozenset[str], dict[str, float]] = {}
        self.fp32 = self.score(torch_runner(job.fused))
        self.fp32_val_images = per_image_map50_95(val, scratch / "val.json")

    def score(self, runner: Runner) -> dict[str, float]:
        def one(gt: GroundTruth, name: str) -> float:
            result = evaluate_runner(runner, gt, self.scratch / name, protocol=self.args.protocol, progress=False)
            return result["map50_95"]

        return {"tune": one(self.tuning, "tune.json"), "val": one(self.val, "val.json")}

    def __call__(self, names: list[str]) -> dict[str, float]:
        key = frozenset(names)
        if key not in self.measured:
            recipe = QuantRecipe(calib_images=self.args.calib_images, float_layers=tuple(sorted(names)))
            # a copy of the shared models: each candidate's IR is dropped once scored, not kept for the whole sweep
            candidate = replace(self.job.with_recipe(recipe), shared=dict(self.job.shared))
            mAP = self.score(BACKENDS[self.backend].candidate(candidate, self.scratch))
            se = Resolution.paired(self.fp32_val_images, per_image_map50_95(self.val, self.scratch / "val.json"))
            self.measured[key] = {
                "tune_drop": self.fp32["tune"] - mAP["tune"],
                "val_drop": self.fp32["val"] - mAP["val"],
                "val_se": se.standard_error,
            }
        return self.measured[key]


def sweep_order(order: list[str], full: bool, ks: list[int] | None, score: Scorer, max_drop: float) -> dict:
    """The measured curve of one order, and with every K measured on a full-length order the bisection on it."""
    wanted = range(len(order) + 1) if ks is None else sorted({k for k in ks if k <= len(order)} | {len(order)})
    curve = {k: {"k": k, **score(order[:k])} for k in tqdm(wanted, desc=f"{len(wanted)} K", unit="K", leave=False)}
    result: dict = {"length": len(order), "curve": list(curve.values())}
    if full and ks is None:
        fp32 = score.fp32["tune"]
        search = search_float_convs(
            order,
            fp32_tune_map=fp32,
            evaluate=lambda names: (fp32 - curve[len(names)]["tune_drop"], 0.0),
            max_drop=max_drop,
            report=lambda _: None,
        )
        result["bisection_k"] = search.chosen.k
        result["bisection_evaluated"] = [s.k for s in search.steps]
    result["fewest_k_tune"] = next((c["k"] for c in result["curve"] if c["tune_drop"] <= max_drop), None)
    result["fewest_k_val"] = next((c["k"] for c in result["curve"] if c["val_drop"] <= max_drop), None)
    return result


def main() -> None:
    parser = benchmark_parser(__doc__, imgsz=160, calib_images=256, out="runs/benchmarks/max_drop_sweep")
    parser.add_argument("--rank-images", type=int, default=RANK_IMAGES)
    parser.add_argument("--tune-images", type=int, default=256)
    parser.add_argument("--backend", choices=list(BACKENDS), default="openvino")
    parser.add_argument("--max-drop", type=float, default=0.3)
    parser.add_argument("--rank-by", nargs="+", default=["fisher"], choices=list(RANKINGS))
    parser.add_argument("--order", nargs="+", default=[], metavar="LABEL=FILE", help="orders of one's own")
    parser.add_argument("--ks", nargs="+", type=int, help="measure only these K (default: every K)")
    add_overflow_fix(parser)
    args = parser.parse_args()
    recipe = QuantRecipe(calib_images=args.calib_images)
    fused = reparameterize_model(load_detector(args.weights))
    convs = quantized_conv_names(fused, recipe)
    try:
        extra = dict(read_order(spec, convs) for spec in args.order)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    args.protocol = EvalProtocol(imgsz=args.imgsz)
    calib = calibration_set(args.data, args.imgsz, n=recipe.calib_images, seed=recipe.seed, progress=False)
    val = load_ground_truth(args.data)
    tuning = tuning_set(args.data, args.tune_images, seed=recipe.seed, calibration=calib.paths, scored=val.image_files)
    half_range = BACKENDS[args.backend].half_range(overflow_fix(args))
    orders, calibrated = {}, None
    for name in args.rank_by:
        s = rank_sensitivity(
            fused,
            calib,
            recipe,
            rank_images=args.rank_images,
            rank_by=name,
            half_range=half_range,
            calibrated=calibrated,
        )
        orders[name + (" (half-range weights)" if half_range else "")], calibrated = s.ranking, s.calibrated
    orders |= extra
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qarep_sweep_") as scratch:
        job = Job(
            fused=fused,
            calib=calib,
            recipe=recipe,
            imgsz=args.imgsz,
            device="cpu",
            stem=Path(scratch) / "sweep",
            save=False,
            overwrite=True,
            calibrated=calibrated,
            overflow_fix=overflow_fix(args),
        )
        score = Scorer(job, args.backend, tuning.ground_truth, val, args, Path(scratch))
        results = {
            label: sweep_order(order, len(order) == len(convs), args.ks, score, args.max_drop)
            for label, order in tqdm(orders.items(), desc="orders", unit="order")
        }
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "quantized_convs": len(convs),
        "tune_images": tuning.images,
        "val_images": len(val.image_files),
        "fp32_tune_map50_95": score.fp32["tune"],
        "fp32_val_map50_95": score.fp32["val"],
        "candidates_measured": len(score.measured),
        "orders": {label: {"order": orders[label], **r} for label, r in results.items()},
    }
    (args.out / "sweep.json").write_text(json.dumps(report, indent=2) + "\n")
    write_summary(args, report)
    plot(args, report)


def _cell(curve: list[dict], k: int | None) -> str:
    if k is None:
        return "-"
    c = next(c for c in curve if c["k"] == k)
    return f"{k} ({c['tune_drop']:.2f} / {c['val_drop']:.2f} ± {c['val_se']:.2f})"


def write_summary(args, report: dict) -> None:
    """sweep.md: per order, the bisection's K and the fewest measured K meeting D on tuning and on val."""
    header = ["order", "bisection K (tune / val drop ± SE)", "fewest K, tuning", "fewest K, val", "K measured"]
    cells = [
        [
            label,
            _cell(r["curve"], r.get("bisection_k")),
            _cell(r["curve"], r["fewest_k_tune"]),
            _cell(r["curve"], r["fewest_k_val"]),
            ", ".join(str(c["k"]) for c in r["curve"]),
        ]
        for label, r in report["orders"].items()
    ]
    lines = [
        f"{args.weights.name} at {args.imgsz} px on {args.backend}, {report['quantized_convs']} quantized convs, "
        f"D = {args.max_drop}: {report['tune_images']} tuning images (FP32 {report['fp32_tune_map50_95']:.2f}), "
        f"{report['val_images']} val images (FP32 {report['fp32_val_map50_95']:.2f}); "
        f"{report['candidates_measured']} candidates measured.",
        "",
        *markdown_table(header, cells, [False, True, True, True, False]),
    ]
    (args.out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(args, report: dict) -> None:
    """sweep.png: the val drop (band: +- 1 SE) and the tuning drop (dashed) against K, one colour per order."""
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.add_subplot()
    for i, (label, r) in enumerate(report["orders"].items()):
        color = f"C{i}"
        ks = [c["k"] for c in r["curve"]]
        val = [c["val_drop"] for c in r["curve"]]
        se = [c["val_se"] for c in r["curve"]]
        ax.plot(ks, val, "-o", color=color, markersize=3, label=f"{label}: val drop")
        low, high = [v - s for v, s in zip(val, se, strict=True)], [v + s for v, s in zip(val, se, strict=True)]
        ax.fill_between(ks, low, high, color=color, alpha=0.15)
        ax.plot(ks, [c["tune_drop"] for c in r["curve"]], "--", color=color, alpha=0.6, label=f"{label}: tuning drop")
        if "bisection_k" in r:
            chosen = next(c for c in r["curve"] if c["k"] == r["bisection_k"])
            ax.plot(chosen["k"], chosen["tune_drop"], "x", color=color, markersize=10)
    ax.axhline(args.max_drop, color="gray", linestyle=":", label=f"D = {args.max_drop}")
    bisected = any("bisection_k" in r for r in report["orders"].values())
    ax.set_xlabel(
        "K: convs kept float, the first K of the order"
        + (" (x: the bisection's answer, on the tuning drop)" if bisected else "")
    )
    ax.set_ylabel("mAP50-95 drop against torch FP32 (points)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(
        f"{args.weights.name}, {args.backend}, {args.imgsz} px: {report['tune_images']} tuning, "
        f"{report['val_images']} val images",
        fontsize=10,
    )
    fig.savefig(args.out / "sweep.png", dpi=110)


if __name__ == "__main__":
    main()
