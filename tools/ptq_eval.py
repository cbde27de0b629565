"""'qarep-det ptq-eval' as a script: the same code and flags (qarep_det/cli/ptq_eval.py; --help lists them)."""

import sys

from qarep_det_launcher import run_tool  # sets up the process before qarep_det is imported

if __name__ == "__main__":
    sys.exit(run_tool("ptq-eval", prog=sys.argv[0]))
