"""'qarep-det plant-outlier' as a script: the same code and flags (qarep_det/cli/plant_outlier.py, --help)."""

import sys

from qarep_det.cli.plant_outlier import main

if __name__ == "__main__":
    sys.exit(main())
