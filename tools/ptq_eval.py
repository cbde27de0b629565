"""'qarep-det ptq-eval' as a script: the same code and flags (qarep_det/cli/ptq_eval.py; --help lists them)."""

import sys

from qarep_det.cli.ptq_eval import main

if __name__ == "__main__":
    sys.exit(main())
