"""What every ``tools/`` script shares: an argument parser whose errors are one ``error: ...`` line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


class OneLineErrorParser(argparse.ArgumentParser):
    """Report bad arguments as a single ``error: ...`` line (exit 2), like every other bad input of our tools,
    instead of argparse's usage block followed by the message."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag; the description's usage examples keep their lines."""


def explicit_flags(argv: Sequence[str]) -> set[str]:
    """The destinations of the flags present in ``argv`` (exact long flags only: build parsers with
    ``allow_abbrev=False``), so a tool can tell a flag given on purpose from its default."""
    return {token[2:].split("=", 1)[0].replace("-", "_") for token in argv if token.startswith("--")}
