"""A library's INFO lines silenced for the span of one call, its warnings kept: Ultralytics and NNCF log a line per
step or per op that says nothing to our users, and their own verbosity settings are global."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet(logger: logging.Logger, level: int = logging.WARNING) -> Iterator[None]:
    """Raise ``logger``'s level to ``level`` inside the block and restore it after, whatever happens."""
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)
