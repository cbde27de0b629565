"""'qarep-det coco' as a script: the same code and flags (qarep_det/cli/coco.py; --help lists them)."""

import sys

from qarep_det_launcher import run_tool  # sets up the process before qarep_det is imported

if __name__ == "__main__":
    sys.exit(run_tool("coco", prog=sys.argv[0]))
