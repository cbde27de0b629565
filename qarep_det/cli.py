"""What every ``tools/`` script shares: an argument parser whose errors are one ``error: ...`` line."""

from __future__ import annotations

import argparse


class OneLineErrorParser(argparse.ArgumentParser):
    """Report bad arguments as a single ``error: ...`` line (exit 2), like every other bad input of our tools,
    instead of argparse's usage block followed by the message."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message}\n")
