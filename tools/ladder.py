"""'qarep-det ladder' as a script: the same code and flags (qarep_det/cli/ladder.py; --help lists them)."""

import sys

from qarep_det_launcher import run_tool  # sets up the process before qarep_det is imported

if __name__ == "__main__":
    sys.exit(run_tool("ladder", prog=sys.argv[0]))
