"""'qarep-det coco' as a script: the same code and flags (qarep_det/cli/coco.py; --help lists them)."""

import sys

from qarep_det.cli.coco import main

if __name__ == "__main__":
    sys.exit(main())
