"""Benchmarks that print ratios measured in one run.

python tools/benchmark.py fusion [--cfg model_yamls/yolo_qarep_s.yaml --imgsz 640 --runs 20]
"""

from __future__ import annotations

import argparse
import sys

import torch

import qarep_det  # noqa: F401  (offline Ultralytics, module registration)
from qarep_det.benchmark import fp32_consistency, fusion_latency, openvino_int8, train_throughput
from qarep_det.cli import OneLineErrorParser

TRAIN_CFGS = ["model_yamls/yolo_qarep_s.yaml", "model_yamls/yolo_repvgg_s.yaml", "yolov8s.yaml"]


def fusion(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    t = fusion_latency(args.cfg, args.imgsz, args.runs)
    print(f"fusion latency, {t.cfg}, {t.imgsz}x{t.imgsz}, batch 1, CPU, {args.threads} threads, median of {args.runs}")
    print(f"  unfused {t.unfused_ms:8.1f} ms")
    print(f"  fused   {t.fused_ms:8.1f} ms")
    print(f"  speedup {t.speedup:8.2f}x")
    print("where the time goes (torch profiler, CPU ms per image, profiled after the timing)")
    for group, unfused_ms in t.unfused_ops.items():
        print(f"  {group:<12} unfused {unfused_ms:8.1f}   fused {t.fused_ops[group]:8.1f}")


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    results = train_throughput(args.cfgs, args.imgsz, args.batch, args.steps)
    print(
        f"training throughput, {args.imgsz}x{args.imgsz}, batch {args.batch}, CPU, {args.threads} threads, "
        f"median of {args.steps} interleaved steps (forward + loss + backward + SGD step, no data loading)"
    )
    base = results[0].images_per_s
    for r in results:
        print(f"  {r.cfg:<36} {r.step_ms:8.0f} ms/step {r.images_per_s:7.2f} img/s  {r.images_per_s / base:5.2f}x")


def _kernels(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} x {kernel}" for kernel, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def int8(args: argparse.Namespace) -> None:
    r = openvino_int8(args.cfg, args.data, args.imgsz, args.calib_images, args.runs)
    print(f"OpenVINO FP32 vs NNCF INT8, {r.cfg}, {r.imgsz}x{r.imgsz}, batch 1, CPU, median of {args.runs} interleaved")
    print(f"  latency  FP32 {r.fp32_ms:8.1f} ms   INT8 {r.int8_ms:8.1f} ms   speed-up {r.fp32_ms / r.int8_ms:5.2f}x")
    print(f"  IR size  FP32 {r.fp32_mb:8.1f} MB   INT8 {r.int8_mb:8.1f} MB   ratio {r.int8_mb / r.fp32_mb:5.2f}")
    print(f"  calibration of {r.calib_images} images: {r.calib_s:.1f} s")
    print(f"  FP32 convs run as: {_kernels(r.fp32_kernels)}")
    print(f"  INT8 convs run as: {_kernels(r.int8_kernels)}")
    vnni = "yes" if r.vnni else "no: INT8 convs use u8 x s8 -> int16 multiply-adds, often no faster than FP32"
    print(f"  CPU int8 dot-product instruction (VNNI/AMX): {vnni}")


def consistency(args: argparse.Namespace) -> None:
    c = fp32_consistency(args.weights, args.data, args.imgsz, args.batch)
    print(f"FP32 mAP50-95 of {args.weights} at {args.imgsz} px, three routes")
    print(f"  Ultralytics val            {c.ultralytics_val:6.2f}")
    print(f"  ptq_eval route, fused      {c.fused:6.2f}   (vs Ultralytics {c.fused - c.ultralytics_val:+.2f})")
    print(f"  ptq_eval route, unfused    {c.unfused:6.2f}   (fused - unfused {c.fused - c.unfused:+.3f})")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fusion", help="CPU latency unfused vs fused", formatter_class=parser.formatter_class)
    p.add_argument("--cfg", default="model_yamls/yolo_qarep_s.yaml", help="model YAML")
    p.add_argument("--imgsz", type=int, default=640, help="square input size")
    p.add_argument("--runs", type=int, default=20, help="timed runs per model")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.set_defaults(func=fusion)
    p = sub.add_parser("train", help="training images/s, side by side", formatter_class=parser.formatter_class)
    p.add_argument("--cfgs", nargs="+", default=TRAIN_CFGS, help="model YAMLs (first is the ratio's base)")
    p.add_argument("--imgsz", type=int, default=320, help="square input size")
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.set_defaults(func=train)
    p = sub.add_parser("int8", help="OpenVINO FP32 vs INT8 latency and size", formatter_class=parser.formatter_class)
    p.add_argument("--cfg", default="model_yamls/yolo_qarep_s.yaml", help="model YAML")
    p.add_argument("--data", required=True, help="dataset YAML whose train split calibrates")
    p.add_argument("--imgsz", type=int, default=640, help="square input size")
    p.add_argument("--calib-images", type=int, default=512, help="calibration images")
    p.add_argument("--runs", type=int, default=20, help="timed runs per model")
    p.set_defaults(func=int8)
    p = sub.add_parser("consistency", help="FP32 mAP: Ultralytics val vs ours", formatter_class=parser.formatter_class)
    p.add_argument("--weights", required=True, help="trained checkpoint")
    p.add_argument("--data", required=True, help="dataset YAML")
    p.add_argument("--imgsz", type=int, default=640, help="square input size")
    p.add_argument("--batch", type=int, default=8, help="batch size")
    p.set_defaults(func=consistency)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
