"""'qarep-det plant-outlier' as a script: the same code and flags (qarep_det/cli/plant_outlier.py, --help)."""

import sys

from qarep_det_launcher import run_tool  # sets up the process before qarep_det is imported

if __name__ == "__main__":
    sys.exit(run_tool("plant-outlier", prog=sys.argv[0]))
