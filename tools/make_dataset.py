"""'qarep-det make-dataset' as a script: the same code and flags (qarep_det/cli/make_dataset.py; --help lists them)."""

import sys

from qarep_det.cli.make_dataset import main

if __name__ == "__main__":
    sys.exit(main())
