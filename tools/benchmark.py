"""'qarep-det benchmark' as a script: the same code and flags (qarep_det/cli/benchmark.py; --help lists them)."""

import sys

from qarep_det.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
