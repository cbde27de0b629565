"""``ptq_eval --max-drop`` beside NNCF's ``quantize_with_accuracy_control`` on one checkpoint: the same model, the
same calibration and tuning images, the same INT8 recipe, the same mAP50-95 target, OpenVINO.

  python benchmarks/accuracy_control.py --weights best.pt --data data.yaml --imgsz 160 --calib-images 256 \\
      --tune-images 256 --max-drop 0.3 --out runs/accuracy_control

- ours: ``run_ptq_eval(..., backends=("openvino",), max_drop=D, rank_by=R, refine=--refine)``, the tool itself, once
  per ``--rank-by R`` given (NNCF runs once); its wall time is the torch
  calibration and the ranking (the isolated passes) plus the search (the FP32 tuning evaluation, then one NNCF
  quantization and one tuning evaluation per candidate tried, with ``--refine`` the first convs reverted alone);
- NNCF: ``nncf.quantize_with_accuracy_control`` with ptq_eval's NNCF arguments (``nncf_arguments``: preset, subset
  size, ignored scope, bias correction off, overflow fix, range estimator) and a validation function that returns
  the project's mAP50-95 on the same tuning set (``predict`` + ``evaluate_coco``) and, on whole-set calls,
  each image's AP50-95 (NNCF's "metric mode": it then ranks by calling it, so a counting wrapper sees every
  evaluation). The recipe's signed activation grid is applied inside NNCF's quantize step (a patch of its private
  ``quantize_impl``, checked afterwards: every activation FakeQuantize signed), else accuracy control would evaluate
  NNCF's unsigned grid. NNCF 3.4 switches silently to its logits mode if the first call raises, so the metric
  never raises (0 on images without boxes);
- both final IRs: float convs read from the IR (no FakeQuantize at the input, no int8 weights), val drop on the
  whole val split against the same torch FP32 mAP, tuning drop, and batch-1 latency (``compile_cpu``, f32,
  interleaved medians). Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from collections import Counter
from pathlib import Path

import torch
from benchmark_args import add_overflow_fix, benchmark_parser, overflow_fix

from qarep_det.evaluation.coco import GroundTruth, evaluate_coco, load_ground_truth, per_image_map50_95
from qarep_det.evaluation.predict import evaluate_runner, predict
from qarep_det.evaluation.protocol import EvalProtocol
from qarep_det.evaluation.table import markdown_table
from qarep_det.pipelines.benchmark import interleaved_ms
from qarep_det.pipelines.ptq import PTQSettings, run_ptq_eval
from qarep_det.quant.backends.openvino import (
    SingleImages,
    compile_cpu,
    conv_ops_by_module,
    convert_openvino,
    force_signed_activations,
    nncf_arguments,
    openvino_runner,
)
from qarep_det.quant.calibration import calibration_set
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.runner import torch_runner
from qarep_det.quant.scope import quantized_conv_names
from qarep_det.reparam import reparameterize_model
from qarep_det.sensitivity.rankings import DEFAULT_RANKING, RANKINGS
from qarep_det.sensitivity.resolution import Resolution
from qarep_det.sensitivity.tuning import TuningSet, tuning_set
from qarep_det.ultralytics.checkpoint import load_detector


class TuningMetric:
    """NNCF's ``validation_fn``: our mAP50-95 on tuning images, plus per-image AP50-95 on whole-set calls (NNCF 3.4
    reads per-item values only from its FP32 and fully INT8 validations, both on the whole set, to choose its ranking
    subset); counts every call and the images it ran."""

    def __init__(self, tuning: TuningSet, protocol: EvalProtocol, scratch: Path) -> None:
        self.gt, self.protocol, self.out = tuning.ground_truth, protocol, scratch / "nncf_tune.json"
        self.calls: list[int] = []
        self.seconds = 0.0

    def __call__(self, compiled, items) -> tuple[float, list[float] | None]:
        start = time.perf_counter()
        files = [Path(item) for item in items]
        ids = [self.gt.image_id(f) for f in files]
        predict(
            openvino_runner(compiled),
            files,
            self.out,
            self.protocol,
            image_id_fn=self.gt.image_id,
            category_id_fn=self.gt.category_id,
            progress=False,
        )
        subset = GroundTruth(files, ids, self.gt.category_ids, self.gt.annotations)
        try:
            metric = evaluate_coco(subset, self.out)["map50_95"]
        except ValueError:  # no labelled box on these images: must not raise (see the module docstring)
            metric = 0.0
        per_image = per_image_map50_95(subset, self.out) if len(files) == len(self.gt.image_files) else None
        self.calls.append(len(files))
        self.seconds += time.perf_counter() - start
        return float(metric), per_image


@contextlib.contextmanager
def signed_activations_in_nncf():
    """The recipe's signed activation grid applied to the model NNCF's accuracy control quantizes, before it is
    evaluated: ``quantize_impl`` is looked up as a module global when called (nncf 3.4; a private function)."""
    import nncf.openvino.quantization.quantize_model as nncf_ov

    original = nncf_ov.quantize_impl

    def signed(*args, **kwargs):
        model = original(*args, **kwargs)
        force_signed_activations(model)
        return model

    nncf_ov.quantize_impl = signed
    try:
        yield
    finally:
        nncf_ov.quantize_impl = original


def _int8_weights(conv) -> bool:
    """Whether a conv's weight comes from int8 codes: an i8 Constant up its Convert/Subtract/Multiply chain."""
    node = conv.input_value(1).get_node()
    while node.get_type_name() != "Constant":
        if node.get_type_name() == "FakeQuantize":
            return True
        node = node.input_value(0).get_node()
    return node.get_element_type().get_type_name() == "i8"


def float_convs(ov_model, candidates: list[str]) -> list[str]:
    """The ``candidates`` (convs the recipe quantizes) that are float in an IR: no FakeQuantize feeding any of their
    ops, no int8 weights."""
    ops = conv_ops_by_module(ov_model)
    return [
        name
        for name in candidates
        if not any(
            op.input_value(0).get_node().get_type_name() == "FakeQuantize" or _int8_weights(op) for op in ops[name]
        )
    ]


def run_nncf(
    fused,
    calib,
    fp32_ir,
    recipe,
    metric: TuningMetric,
    tuning: TuningSet,
    max_drop: float,
    ranking: int,
    fix: bool | None = None,
):
    """NNCF's accuracy control with ptq_eval's arguments (``fix``: its overflow fix); returns the IR and its cost."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    shared, advanced = nncf_arguments(fused, fp32_ir, recipe, fix)
    restorer = AdvancedAccuracyRestorerParameters(ranking_subset_size=ranking, num_ranking_workers=1)
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    nncf_logger = logging.getLogger("nncf")
    nncf_logger.addHandler(handler)
    start = time.perf_counter()
    try:
        with signed_activations_in_nncf():
            model = nncf.quantize_with_accuracy_control(
                fp32_ir.clone(),
                nncf.Dataset(SingleImages(calib)),
                nncf.Dataset([str(f) for f in tuning.ground_truth.image_files]),
                metric,
                max_drop=max_drop,
                drop_type=nncf.DropType.ABSOLUTE,
                advanced_quantization_parameters=advanced,
                advanced_accuracy_restorer_parameters=restorer,
                **shared,
            )
    finally:
        nncf_logger.removeHandler(handler)
    wall = time.perf_counter() - start
    lows = [
        op.input_value(1).get_node().get_data()
        for op in model.get_ordered_ops()
        if op.get_type_name() == "FakeQuantize" and op.get_attributes()["levels"] == 256
    ]
    if unsigned := [low for low in lows if low.size == 1 and low.min() >= 0]:  # activations: one range each
        raise RuntimeError(f"the signed-activation patch did not reach {len(unsigned)} FakeQuantize ops (nncf moved?)")
    lines = log.getvalue().splitlines()
    return model, {
        "wall_s": wall,
        "tune_evals": len(metric.calls),
        "tune_images_run": sum(metric.calls),
        "calls_by_images": dict(Counter(metric.calls)),
        "validation_s": metric.seconds,
        "ranking_subset_size": ranking,
        "reached": not any("could not achieve" in line for line in lines),
        "log": [line for line in lines if "evert" in line or "ccuracy drop" in line or "Metric of" in line],
    }


def main() -> None:
    parser = benchmark_parser(__doc__, imgsz=160, calib_images=256, out="runs/benchmarks/accuracy_control")
    parser.add_argument("--tune-images", type=int, default=256)
    parser.add_argument("--max-drop", type=float, default=0.3, help="mAP50-95 points, absolute")
    parser.add_argument(
        "--ranking-subset",
        type=int,
        nargs="+",
        help="NNCF's ranking_subset_size, one run each (default: NNCF's own, min(tuning images, calibration images))",
    )
    parser.add_argument("--latency-runs", type=int, default=100)
    parser.add_argument(
        "--refine",
        type=int,
        default=0,
        metavar="R",
        help="ptq_eval's --refine: its first R convs re-ranked by their tuning mAP",
    )
    parser.add_argument(
        "--rank-by",
        nargs="+",
        default=[DEFAULT_RANKING],
        choices=list(RANKINGS),
        help="ptq_eval's rankings, one run of ours each (NNCF runs once)",
    )
    add_overflow_fix(parser)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = QuantRecipe(calib_images=args.calib_images)
    protocol = EvalProtocol(imgsz=args.imgsz)

    # ours: the tool itself
    ours, ours_total_s = {}, {}
    for rank_by in args.rank_by:
        settings = PTQSettings(
            args.data,
            recipe=recipe,
            backends=("openvino",),
            imgsz=args.imgsz,
            max_drop=args.max_drop,
            tune_images=args.tune_images,
            overwrite=True,
            rank_by=rank_by,
            refine=args.refine,
            overflow_fix=overflow_fix(args),
        )
        start = time.perf_counter()
        (ours[rank_by],), _, _ = run_ptq_eval([args.weights], settings, args.out / f"ptq_eval_{rank_by}")
        ours_total_s[rank_by] = time.perf_counter() - start
    first = ours[args.rank_by[0]]

    # the same model, calibration, tuning and val images for NNCF
    fused = reparameterize_model(load_detector(args.weights))
    calib = calibration_set(args.data, args.imgsz, n=recipe.calib_images, seed=recipe.seed, progress=False)
    val = load_ground_truth(args.data)
    tuning = tuning_set(args.data, args.tune_images, seed=recipe.seed, calibration=calib.paths, scored=val.image_files)
    fp32_ir = convert_openvino(fused, args.imgsz)
    nncf = {}
    for subset in args.ranking_subset or [min(recipe.calib_images, tuning.images)]:  # the default: NNCF's own
        metric = TuningMetric(tuning, protocol, args.out)
        nncf[subset] = run_nncf(
            fused, calib, fp32_ir, recipe, metric, tuning, args.max_drop, subset, overflow_fix(args)
        )

    # both final IRs measured the same way
    import openvino as ov

    ours_irs = {rank_by: ov.Core().read_model(row.int8_file) for rank_by, row in ours.items()}
    candidates = quantized_conv_names(fused, recipe)

    def scored(ir, ground_truth: GroundTruth, tag: str) -> float:
        runner = openvino_runner(compile_cpu(ir))
        result = evaluate_runner(runner, ground_truth, args.out / f"{tag}.json", protocol=protocol, progress=False)
        return result["map50_95"]

    fp32_tune = evaluate_runner(
        torch_runner(fused), tuning.ground_truth, args.out / "fp32_tune.json", protocol=protocol, progress=False
    )["map50_95"]
    fp32_val = first.fp32_map50_95  # the torch FP32 mAP ptq_eval scored on val, the reference of all drops
    fp32_val_images = per_image_map50_95(val, args.out / f"ptq_eval_{args.rank_by[0]}" / f"{first.model}_fp32.json")

    def val_se(tag: str) -> float:
        """The val drop's paired standard error (eval/resolution.py), from the val detections ``scored`` wrote."""
        return Resolution.paired(fp32_val_images, per_image_map50_95(val, args.out / f"{tag}.json")).standard_error

    x = torch.rand(1, 3, args.imgsz, args.imgsz)
    irs = {"fp32": fp32_ir, **ours_irs, **{subset: ir for subset, (ir, _) in nncf.items()}}
    runners = [openvino_runner(compile_cpu(ir)) for ir in irs.values()]
    latency = dict(
        zip(irs, interleaved_ms([lambda r=r: r(x) for r in runners], args.latency_runs, warmup=5), strict=True)
    )
    rows = {
        f"NNCF accuracy control (ranking subset {subset})": {
            "float_convs": float_convs(ir, candidates),
            **cost,
            "tune_drop": fp32_tune - scored(ir, tuning.ground_truth, f"nncf{subset}_tune"),
            "val_drop": fp32_val - scored(ir, val, f"nncf{subset}_val"),
            "val_drop_se": val_se(f"nncf{subset}_val"),
            "int8_ms_b1": latency[subset],
        }
        for subset, (ir, cost) in nncf.items()
    }
    rows |= {
        f"ptq_eval --max-drop --rank-by {rank_by}" + (f" --refine {args.refine}" if args.refine else ""): {
            "float_convs": float_convs(ours_irs[rank_by], candidates),
            "float_layers": list(row.float_layers),
            "wall_s": row.rank.calibrate_s + row.rank.rank_s + row.search.search_s,
            "ptq_eval_total_s": ours_total_s[rank_by],
            "tune_evals": row.search.tune_evals,
            "tune_images_run": row.search.tune_evals * tuning.images,
            "refine": row.search.refine,
            "tune_steps": row.to_json()["tune_steps"],
            "tune_drop_se": row.search.tune_drop_se,
            "calibrate_s": row.rank.calibrate_s,
            "rank_s": row.rank.rank_s,
            "search_s": row.search.search_s,
            "tune_drop": fp32_tune - scored(ours_irs[rank_by], tuning.ground_truth, f"ours_{rank_by}_tune"),
            "val_drop": fp32_val - scored(ours_irs[rank_by], val, f"ours_{rank_by}_val"),
            "val_drop_se": val_se(f"ours_{rank_by}_val"),
            "int8_ms_b1": latency[rank_by],
        }
        for rank_by, row in ours.items()
    }
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "quantized_convs": len(candidates),
        "tune_images": tuning.images,
        "val_images": len(val.image_files),
        "fp32_tune_map50_95": fp32_tune,
        "fp32_val_map50_95": fp32_val,
        "fp32_ms_b1": latency["fp32"],
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    header = [
        "",
        "float convs",
        "tuning evals (images run)",
        "wall time",
        "tune drop",
        "val drop ± SE",
        "INT8 ms, batch 1",
    ]
    cells = [
        [
            name,
            str(len(r["float_convs"])),
            f"{r['tune_evals']} ({r['tune_images_run']})",
            f"{r['wall_s']:.0f} s",
            f"{r['tune_drop']:.2f}",
            f"{r['val_drop']:.2f} ± {r['val_drop_se']:.2f}",
            f"{r['int8_ms_b1']:.2f}",
        ]
        for name, r in rows.items()
    ]
    lines = [
        *markdown_table(header, cells, [False, *[True] * 6]),
        "",
        f"FP32: tuning {fp32_tune:.2f}, val {fp32_val:.2f}, {latency['fp32']:.2f} ms batch 1; "
        f"{len(candidates)} quantized convs; target reached by NNCF: "
        f"{', '.join(str(cost['reached']) for _, cost in nncf.values())}",
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
