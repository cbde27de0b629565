"""The one error type of bad input, so every tool answers it the same way: one line, exit status 2."""

from __future__ import annotations


class InputError(ValueError):
    """A value, file or combination of settings the library cannot work with, said in one line.

    ``field`` names the setting at fault as the library calls it (``calib_images``); the command-line tools turn it into
    their flag (``--calib-images``). A ``ValueError`` so that callers who caught the library's earlier ValueErrors keep
    working. Missing and existing files stay ``FileNotFoundError`` / ``FileExistsError``, which the tools treat as bad
    input too (:data:`INPUT_ERRORS`); any other exception is a fault and keeps its traceback.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


INPUT_ERRORS: tuple[type[Exception], ...] = (InputError, FileNotFoundError, FileExistsError)
"""What a tool reports as bad input (one line, exit status 2)."""


def one_line(e: BaseException) -> str:
    """An exception's message as one line (KeyError quotes its message; Ultralytics' messages span lines)."""
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(text).split()) or type(e).__name__
