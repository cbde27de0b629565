"""The input checks every tool shares, each written once so that a bad value gets the same one-line error."""

from __future__ import annotations

from qarep_det.errors import InputError

MODEL_STRIDE = 32  # the largest stride of every detector here; Ultralytics would silently round other sizes up


def check_count(name: str, value: object, minimum: int = 1) -> int:
    """An integer of at least ``minimum`` (not a bool), else ``ValueError`` naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_imgsz(value: object, name: str = "imgsz") -> int:
    """A square input size the detectors take: a positive multiple of their largest stride."""
    check_count(name, value, MODEL_STRIDE)
    if value % MODEL_STRIDE:
        raise InputError(f"{name} must be a multiple of the models' stride {MODEL_STRIDE}, got {value}")
    return value
