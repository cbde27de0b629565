"""One reading of a tool's ``--device`` argument, checked against this machine before any work."""

from __future__ import annotations

import re

import torch

from qarep_det.errors import InputError


def resolve_device(spec: str | torch.device) -> str:
    """``spec`` in Ultralytics' form, or ``ValueError`` in one line: 'auto' ('0' if CUDA is available, else 'cpu'),
    'cpu', 'mps', a CUDA index '0' (also 'cuda' and 'cuda:0'), or indices '0,1,2,3' (DDP)."""
    text = str(spec).strip().lower().replace(" ", "")
    if text == "auto":
        return "0" if torch.cuda.is_available() else "cpu"
    if text in {"cpu", "mps"}:
        if text == "mps" and not torch.backends.mps.is_available():
            raise InputError("device 'mps': MPS is not available on this machine")
        return text
    text = {"cuda": "0"}.get(text, text.removeprefix("cuda:"))
    if not re.fullmatch(r"\d+(,\d+)*", text):
        raise InputError(f"device '{spec}' is not a device: use 'cpu', a CUDA index '0' or indices '0,1,2,3'")
    indices = [int(i) for i in text.split(",")]
    if len(set(indices)) < len(indices):
        raise InputError(f"device '{spec}': a CUDA device is listed twice")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if missing := [i for i in indices if i >= count]:
        seen = f"{count} visible" if count else "CUDA is not available on this machine"
        raise InputError(f"device '{spec}': CUDA device {missing[0]} is not available ({seen})")
    return ",".join(map(str, indices))


def process_count(device: str) -> int:
    """How many processes train on a resolved ``device`` (DDP: one per CUDA index)."""
    return len(device.split(",")) if device not in {"cpu", "mps"} else 1


def torch_device(spec: str | torch.device, first: bool = False) -> torch.device:
    """One torch device for ``spec`` (see :func:`resolve_device`); several CUDA indices are refused unless
    ``first``, which takes the first (the device a DDP run's main process prepares its model on)."""
    device = resolve_device(spec)
    if device in {"cpu", "mps"}:
        return torch.device(device)
    if "," in device and not first:
        raise InputError(f"device '{spec}': one device only here, not a DDP list")
    return torch.device("cuda", int(device.split(",")[0]))
