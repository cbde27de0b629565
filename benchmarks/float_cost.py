"""Does ``--float-cost latency``'s estimate predict what a float set costs on OpenVINO? Measured against the estimate.

  python benchmarks/float_cost.py --weights best.pt --data data.yaml --imgsz 320 --overflow-fix on \\
      --rows out_count/results.json out_latency/results.json --out runs/float_cost

The estimate (``qarep_det.sensitivity.float_cost``): a set S of convs kept float adds its multiply-accumulates'
share of the quantized convs' MACs times what all of them gain at INT8, ``int8 + share(S) * (fp32 - int8)``, with
the FP32 and fully INT8 IRs' ms measured here. Float sets timed beside those two: the 5 convs of most MACs, the 5
of fewest (the two ends of the estimate), the ``float_layers`` of each openvino row of ``--rows`` (e.g. the sets
``ptq-eval --max-drop`` chose by count and by latency) and each set of ``--sets`` (e.g. NNCF's selection). Each is
one NNCF quantization of the same fused model on the first ``--calib-images`` of the calibration draw (ranges do not
change the kernels; a few images suffice for timing), all IRs timed at batch 1, ``compile_cpu`` (f32), interleaved
medians of ``--runs``. Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from benchmark_args import add_overflow_fix, benchmark_parser, overflow_fix

from qarep_det.evaluation.table import markdown_table, read_results
from qarep_det.pipelines.benchmark import interleaved_ms
from qarep_det.quant.backends.openvino import convert_openvino, openvino_runner, quantize_openvino
from qarep_det.quant.calibration import recipe_calibration
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.scope import quantized_conv_names
from qarep_det.sensitivity.float_cost import conv_macs
from qarep_det.ultralytics.checkpoint import load_fused


def main() -> None:
    parser = benchmark_parser(__doc__, imgsz=320, calib_images=16, out="runs/benchmarks/float_cost")
    add_overflow_fix(parser)
    parser.add_argument("--rows", nargs="*", type=Path, default=[], help="results.json files whose sets to time")
    parser.add_argument(
        "--sets",
        nargs="*",
        default=[],
        metavar="LABEL=CONV,CONV",
        help="more float sets to time, each named by its convs (e.g. another tool's selection)",
    )
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()

    fused = load_fused(args.weights).fused.eval()
    recipe = QuantRecipe(calib_images=args.calib_images)
    names = quantized_conv_names(fused, recipe)
    macs = conv_macs(fused, args.imgsz, names)
    by_macs = sorted(names, key=lambda name: -macs[name])  # ties in model order
    sets: dict[str, tuple[str, ...]] = {
        "fully INT8": (),
        "5 of most MACs": tuple(by_macs[:5]),
        "5 of fewest MACs": tuple(by_macs[-5:]),
    }
    for path in args.rows:
        for row in read_results(path):
            if row.backend == "openvino":
                cost = "count" if row.rank is None or row.rank.float_cost is None else row.rank.float_cost
                sets[f"{path.parent.name}: {cost}"] = row.float_layers
    for spec in args.sets:
        label, _, convs = spec.partition("=")
        kept = tuple(c for c in convs.split(",") if c)
        if not label or set(kept) - set(names):
            parser.error(f"--sets wants LABEL=CONV,CONV with quantized convs of the model, got {spec!r}")
        sets[label] = kept
    calib = recipe_calibration(args.data, args.imgsz, recipe)
    fp32 = convert_openvino(fused, args.imgsz)
    irs = {"fp32": fp32} | {
        label: quantize_openvino(
            fused,
            calib,
            args.imgsz,
            QuantRecipe(calib_images=args.calib_images, float_layers=kept),
            overflow_fix=overflow_fix(args),
            fp32=fp32,
        )
        for label, kept in sets.items()
    }
    x = torch.zeros(1, 3, args.imgsz, args.imgsz)
    runners = [openvino_runner(ir) for ir in irs.values()]
    ms = dict(zip(irs, interleaved_ms([lambda r=r: r(x) for r in runners], args.runs, warmup=5), strict=True))
    total = sum(macs.values())
    rows = [{"float set": "FP32", "float convs": len(names), "float GMACs": total / 1e9, "estimated ms": None,
             "measured ms": ms["fp32"]}]  # fmt: skip
    for label, kept in sets.items():
        share = sum(macs[name] for name in kept) / total
        estimate = ms["fully INT8"] + share * (ms["fp32"] - ms["fully INT8"])
        rows.append({"float set": label, "float convs": len(kept), "float GMACs": share * total / 1e9,
                     "estimated ms": estimate, "measured ms": ms[label], "float_layers": list(kept)})  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    columns = ["float set", "float convs", "float GMACs", "estimated ms", "measured ms"]
    table = markdown_table(
        columns,
        [
            ["" if r[c] is None else f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in columns]
            for r in rows
        ],
        [False, True, True, True, True],
    )
    (args.out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
