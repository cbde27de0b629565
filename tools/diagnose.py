"""'qarep-det diagnose' as a script: the same code and flags (qarep_det/cli/diagnose.py; --help lists them)."""

import sys

from qarep_det.cli.diagnose import main

if __name__ == "__main__":
    sys.exit(main())
