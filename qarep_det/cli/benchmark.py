"""Benchmarks that print ratios measured in one run.

  qarep-det benchmark fusion [--cfg yolo_qarep_s.yaml --imgsz 640 --runs 20 --device cpu|0]
  qarep-det benchmark train --device 0 --imgsz 640 --batch 64
  qarep-det benchmark int8 --data DATA [--weights best.pt | --cfg yolo_qarep_s.yaml] [--imgsz 640 --batches 1 8
    --anchors quantize_static nncf ultralytics --out DIR]
  qarep-det benchmark consistency --weights best.pt --data DATA

(python tools/benchmark.py takes the same arguments.) Model YAMLs are files or the names of shipped ones.
"""

from __future__ import annotations

import argparse

import torch

from qarep_det.checks import check_count, check_imgsz
from qarep_det.cli.common import tool_parser
from qarep_det.data.dataset import resolve_dataset
from qarep_det.device import torch_device
from qarep_det.pipelines.benchmark import (
    ANCHORS,
    CUDA_GRID,
    INT8_BATCHES,
    PLAIN_CONV_LIMIT,
    FusionTiming,
    fp32_consistency,
    fusion_latency,
    int8_benchmark,
    train_throughput,
)
from qarep_det.quant.backends.openvino import OPENVINO_ACTIVATIONS, OVERFLOW_FIX
from qarep_det.ultralytics.checkpoint import checkpoint_paths
from qarep_det.ultralytics.registration import find_model_yaml

TRAIN_CFGS = ["yolo_qarep_s.yaml", "yolo_repvgg_s.yaml", "yolov8s.yaml"]  # shipped names and Ultralytics' own


def _hardware(device: torch.device, threads: int) -> str:
    """The machine a timing belongs to, for its header line."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} threads"


def _print_cpu_fusion(t: FusionTiming, threads: int, runs: int) -> None:
    print(f"fusion latency, {t.cfg}, {t.imgsz}x{t.imgsz}, batch 1, CPU, {threads} threads, median of {runs}")
    print(f"  unfused {t.unfused_ms:8.1f} ms")
    print(f"  fused   {t.fused_ms:8.1f} ms")
    print(f"  speedup {t.speedup:8.2f}x")
    print("where the time goes (torch profiler, CPU ms per image, profiled after the timing)")
    for group, unfused_ms in t.unfused_ops.items():
        print(f"  {group:<12} unfused {unfused_ms:8.1f}   fused {t.fused_ops[group]:8.1f}")


def format_fusion_grid(timings: list[FusionTiming], *, hardware: str, runs: int, limit: str) -> list[str]:
    """The lines ``benchmark fusion`` prints for a grid of timings (CUDA's precisions and batches, beside the
    ``limit`` model): a header, the column names, one row per timing."""
    t0 = timings[0]
    return [
        f"fusion latency, {t0.cfg}, {t0.imgsz}x{t0.imgsz}, {hardware}, synchronized medians of {runs} interleaved "
        f"runs; fp16 = autocast (AMP); limit = {limit} fused by Ultralytics (the same topology from plain convs)",
        "  dtype  batch  unfused ms  fused ms  speed-up  fused img/s  limit ms  limit img/s  fused/limit",
        *(
            f"  {t.precision:<5}  {t.batch:5d}  {t.unfused_ms:10.2f}  {t.fused_ms:8.2f}  {t.speedup:7.2f}x  "
            f"{t.fused_images_per_s:11.0f}  {t.limit_ms:8.2f}  {t.batch * 1e3 / t.limit_ms:11.0f}  "
            f"{t.fused_ms / t.limit_ms:10.2f}x"
            for t in timings
        ),
    ]


def fusion(args: argparse.Namespace) -> None:
    device = torch_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        (t,) = fusion_latency(args.cfg, args.imgsz, args.runs)
        _print_cpu_fusion(t, args.threads, args.runs)
    else:
        timings = fusion_latency(args.cfg, args.imgsz, args.runs, device=device, grid=CUDA_GRID, limit_cfg=args.limit)
        hardware = _hardware(device, args.threads)
        print("\n".join(format_fusion_grid(timings, hardware=hardware, runs=args.runs, limit=args.limit)))


def train(args: argparse.Namespace) -> None:
    device = torch_device(args.device)
    torch.set_num_threads(args.threads)
    results = train_throughput(args.cfgs, args.imgsz, args.batch, args.steps, device=device)
    step = "forward + loss + backward + SGD step"
    step = f"AMP: fp16 autocast {step}, scaled gradients" if results[0].amp else step
    print(
        f"training throughput, {args.imgsz}x{args.imgsz}, batch {args.batch}, {_hardware(device, args.threads)}, "
        f"median of {args.steps} interleaved steps ({step}, no data loading)"
    )
    base = results[0].images_per_s
    for r in results:
        skips = f"  scaler skipped {r.warmup_skipped} warm-up + {r.skipped} timed steps (not timed)" if r.amp else ""
        print(
            f"  {r.cfg:<36} {r.step_ms:8.0f} ms/step {r.images_per_s:7.2f} img/s  {r.images_per_s / base:5.2f}x{skips}"
        )


def _ratio(fp32_ms: float, ms: float) -> str:
    return f"{fp32_ms / ms:5.2f}x"


def int8(args: argparse.Namespace) -> None:
    r = int8_benchmark(
        args.data,
        weights=args.weights,
        cfg=args.cfg,
        imgsz=args.imgsz,
        calib_images=args.calib_images,
        batches=args.batches,
        runs=args.runs,
        threads=args.threads,
        anchors=args.anchors,
        openvino_activations=args.openvino_activations,
        overflow_fix=OVERFLOW_FIX[args.overflow_fix],
        out_dir=args.out,
    )
    isa = ", ".join(r.cpu.int8_isa) or "none of AVX2, AVX-512, VNNI, AMX"
    vnni = "" if r.cpu.vnni else " (no VNNI/AMX: INT8 convs sum u8 x s8 products in int16, often no faster than FP32)"
    print(f"CPU: {r.cpu.name}; ISA: {isa}{vnni}")
    if r.onednn_cap:
        print(f"OpenVINO's kernels held to {r.onednn_cap} by ONEDNN_MAX_CPU_ISA (onnxruntime's are not)")
    print(f"our OpenVINO and onnxruntime-int8 weights: {'7-bit (overflow fix on)' if r.overflow_fix else '8-bit'}")
    scored = f"mAP50-95 on {r.val_images} val images (ptq-eval's scoring)" if r.val_images else "random weights: no mAP"
    print(
        f"INT8 against FP32, {r.model}, {r.imgsz}x{r.imgsz}, {r.calib_images} calibration images, {r.threads} CPU "
        f"threads, medians of {r.runs} runs of every model interleaved; {scored}"
    )
    batches = sorted(next(iter(r.models)).ms)
    head = "".join(f"  b{b} ms/img  vs FP32" for b in batches)
    print(f"  {'runtime':<16} {'model':<34} {'mAP50-95':>8}  {'int convs':>9}{head}")
    for m in r.models:
        fp32 = r.fp32(m.runtime)
        cells = "".join(f"  {m.ms[b] / b:9.2f}  {_ratio(fp32.ms[b], m.ms[b]) if m.int8 else '':>7}" for b in batches)
        score = "" if m.map50_95 is None else f"{m.map50_95:8.2f}"
        convs = "" if m.integer_convs is None else str(m.integer_convs)
        print(f"  {m.runtime:<16} {m.label:<34} {score:>8}  {convs:>9}{cells}")
    for what, why in r.skipped.items():
        print(f"  {what}: skipped, {why}")
    if args.out:
        print(f"files: {args.out}")


def consistency(args: argparse.Namespace) -> None:
    c = fp32_consistency(args.weights, args.data, args.imgsz, args.batch)
    print(f"FP32 mAP50-95 of {args.weights} at {args.imgsz} px, three routes")
    print(f"  Ultralytics val            {c.ultralytics_val:6.2f}")
    print(f"  ptq_eval route, fused      {c.fused:6.2f}   (vs Ultralytics {c.fused - c.ultralytics_val:+.2f})")
    print(f"  ptq_eval route, unfused    {c.unfused:6.2f}   (fused - unfused {c.fused - c.unfused:+.3f})")


def check_inputs(args: argparse.Namespace) -> None:
    """Every file, size and device a subcommand names, checked before minutes of work (and before anything that
    writes): a bad one fails in one line."""
    for cfg in [*getattr(args, "cfgs", []), *[getattr(args, k) for k in ("cfg", "limit") if hasattr(args, k)]]:
        find_model_yaml(cfg)
    if getattr(args, "weights", None) is not None:
        checkpoint_paths([args.weights])
    if hasattr(args, "data"):
        resolve_dataset(args.data)
    check_imgsz(args.imgsz, "--imgsz")
    for name in ("runs", "steps", "batch", "calib_images", "threads"):
        if hasattr(args, name):
            check_count(f"--{name.replace('_', '-')}", getattr(args, name))
    for batch in getattr(args, "batches", []):
        check_count("--batches", batch)
    if hasattr(args, "device"):
        torch_device(args.device)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = tool_parser(__doc__, prog)
    sub = parser.add_subparsers(dest="command", required=True)
    device_help = "cpu, or a CUDA index such as 0"
    p = sub.add_parser("fusion", help="latency unfused vs fused", formatter_class=parser.formatter_class)
    p.add_argument("--cfg", default="yolo_qarep_s.yaml", help="model YAML (file or shipped name)")
    p.add_argument("--imgsz", type=int, default=640, help="square input size")
    p.add_argument("--runs", type=int, default=20, help="timed runs per model")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument(
        "--device", default="cpu", help=f"{device_help}; CUDA times fp32 and fp16 at batch 1 and 32, and --limit"
    )
    p.add_argument("--limit", default=PLAIN_CONV_LIMIT, help="plain-conv model YAML timed beside them on CUDA")
    p.set_defaults(func=fusion)
    p = sub.add_parser("train", help="training images/s, side by side", formatter_class=parser.formatter_class)
    p.add_argument("--cfgs", nargs="+", default=TRAIN_CFGS, help="model YAMLs (first is the ratio's base)")
    p.add_argument("--imgsz", type=int, default=320, help="square input size")
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--device", default="cpu", help=f"{device_help}; CUDA trains with AMP, as Ultralytics does")
    p.set_defaults(func=train)
    p = sub.add_parser(
        "int8", help="every INT8 file against its FP32 twin: ms and mAP", formatter_class=parser.formatter_class
    )
    p.add_argument("--data", required=True, help="dataset YAML: its train split calibrates, its val split scores")
    p.add_argument("--weights", help="trained checkpoint, scored on the val split (default: --cfg, random weights)")
    p.add_argument("--cfg", default="yolo_qarep_s.yaml", help="model YAML timed without --weights")
    p.add_argument("--imgsz", type=int, default=640, help="square input size")
    p.add_argument("--calib-images", type=int, default=512, help="calibration images")
    p.add_argument("--batches", type=int, nargs="+", default=list(INT8_BATCHES), help="batch sizes timed")
    p.add_argument("--runs", type=int, default=20, help="timed runs per model and batch size")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads of every runtime")
    p.add_argument("--anchors", nargs="*", default=[], choices=ANCHORS, help="what users quantize with instead")
    p.add_argument(
        "--openvino-activations",
        nargs="+",
        default=["signed"],
        choices=OPENVINO_ACTIVATIONS,
        help="our OpenVINO IR on each of these activation grids (ptq-eval's --openvino-activations)",
    )
    p.add_argument(
        "--overflow-fix",
        choices=OVERFLOW_FIX,
        default="auto",
        help="ptq-eval's --overflow-fix for our files (auto: as this CPU, or ONEDNN_MAX_CPU_ISA, needs)",
    )
    p.add_argument("--out", help="folder for the files (default: a temporary folder, removed)")
    p.set_defaults(func=int8)
    p = sub.add_parser("consistency", help="FP32 mAP: Ultralytics val vs ours", formatter_class=parser.formatter_class)
    p.add_argument("--weights", required=True, help="trained checkpoint")
    p.add_argument("--data", required=True, help="dataset YAML")
    p.add_argument("--imgsz", type=int, default=640, help="square input size")
    p.add_argument("--batch", type=int, default=8, help="batch size")
    p.set_defaults(func=consistency)
    args = parser.parse_args(argv)
    check_inputs(args)
    args.func(args)
    return 0
