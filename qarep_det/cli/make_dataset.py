"""Write the synthetic shapes dataset (YOLO labels, data.yaml, COCO val JSON) that the tests and demo train on."""

from __future__ import annotations

from pathlib import Path

from qarep_det.cli.common import tool_parser
from qarep_det.data.synthetic import CLASS_NAMES, make_dataset


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse arguments, write the dataset, print the data.yaml path; returns the exit status."""
    parser = tool_parser(__doc__, prog)
    parser.add_argument("--out", type=Path, default=Path("datasets/synthetic"), help="output folder")
    parser.add_argument("--train", type=int, default=512, help="number of training images")
    parser.add_argument("--val", type=int, default=128, help="number of validation images")
    parser.add_argument("--imgsz", type=int, default=160, help="image side in pixels (>= 32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes identical files")
    parser.add_argument(
        "--classes", type=int, default=len(CLASS_NAMES), help=f"number of shape classes, from {', '.join(CLASS_NAMES)}"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset previously written to --out")
    args = parser.parse_args(argv)
    yaml_path = make_dataset(args.out, args.train, args.val, args.imgsz, args.seed, args.classes, args.overwrite)
    print(yaml_path)
    return 0
