"""'qarep-det export' as a script: the same code and flags (qarep_det/cli/export.py; --help lists them)."""

import sys

from qarep_det.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
