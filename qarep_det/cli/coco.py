"""Make a training-ready COCO 2017 folder (YOLO labels, image lists, coco.yaml) from COCO's official downloads.

  qarep-det coco --images datasets/coco-download --out datasets/coco

--images holds train2017/ and val2017/ (and, by default, annotations/) as COCO's zips unpack them; only the two
instances_*.json of the annotations are read. The images stay where they are (linked); the labels are Ultralytics'
convert_coco of those jsons; the official val json is kept where ptq-eval and Ultralytics' COCO scoring find it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qarep_det.cli.common import tool_parser
from qarep_det.data.coco import prepare_coco


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse arguments, check and write the folder, print a summary per split; returns the exit status."""
    parser = tool_parser(__doc__, prog)
    parser.add_argument("--images", type=Path, required=True, help="folder holding train2017/ and val2017/")
    parser.add_argument(
        "--annotations",
        type=Path,
        help="folder holding instances_train2017.json and instances_val2017.json (default: IMAGES/annotations)",
    )
    parser.add_argument("--out", type=Path, default=Path("datasets/coco"), help="folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        yaml_path, summaries = prepare_coco(
            args.images, args.annotations or args.images / "annotations", args.out, overwrite=args.overwrite
        )
    except OSError as e:  # bad input is InputError (one line, exit 2, nothing written); this is a failed write
        if isinstance(e, (FileNotFoundError, FileExistsError)):
            raise
        print(f"error: writing '{args.out}' failed: {e}", file=sys.stderr)
        return 1
    for summary in summaries:
        print(summary.line())
    if "coco" not in str(yaml_path.parent):
        print(
            "note: Ultralytics' val scores with pycocotools only when the data's path contains 'coco'; "
            "qarep-det ptq-eval does either way"
        )
    print(yaml_path)
    return 0
