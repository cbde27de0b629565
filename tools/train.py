"""'qarep-det train' as a script: the same code and flags (qarep_det/cli/train.py; --help lists them)."""

import sys

from qarep_det.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
