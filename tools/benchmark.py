"""Benchmarks that print ratios measured in one run.

python tools/benchmark.py fusion [--cfg model_yamls/yolo_qarep_s.yaml --imgsz 640 --runs 20]
"""

from __future__ import annotations

import argparse
import sys

import torch

import qarep_det  # noqa: F401  (offline Ultralytics, module registration)
from qarep_det.benchmark import fusion_latency


def fusion(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    t = fusion_latency(args.cfg, args.imgsz, args.runs)
    print(f"fusion latency, {t.cfg}, {t.imgsz}x{t.imgsz}, batch 1, CPU, {args.threads} threads, median of {args.runs}")
    print(f"  unfused {t.unfused_ms:8.1f} ms")
    print(f"  fused   {t.fused_ms:8.1f} ms")
    print(f"  speedup {t.speedup:8.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fusion", help="CPU latency unfused vs fused", formatter_class=parser.formatter_class)
    p.add_argument("--cfg", default="model_yamls/yolo_qarep_s.yaml", help="model YAML")
    p.add_argument("--imgsz", type=int, default=640, help="square input size")
    p.add_argument("--runs", type=int, default=20, help="timed runs per model")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.set_defaults(func=fusion)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
