"""'qarep-det qat' as a script: the same code and flags (qarep_det/cli/qat.py; --help lists them)."""

import sys

from qarep_det.cli.qat import main

if __name__ == "__main__":
    sys.exit(main())
