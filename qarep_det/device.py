"""One reading of a tool's ``--device`` argument: ``cpu`` or a CUDA index, checked against this machine."""

from __future__ import annotations

import torch


def torch_device(spec: str | torch.device) -> torch.device:
    """``'cpu'``, ``'0'``, ``'cuda'`` or ``'cuda:0'`` as a torch device that exists here, else ``ValueError``.

    Checked up front so a tool fails with one line before any work, not deep inside its first ``.to(device)``.
    """
    text = str(spec).strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    if text.isdigit():
        text = f"cuda:{text}"
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type != "cuda":
        raise ValueError(f"device '{spec}' is not 'cpu' or a CUDA index such as '0'")
    if not torch.cuda.is_available():
        raise ValueError(f"device '{spec}': CUDA is not available on this machine")
    index, count = device.index or 0, torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"device '{spec}': CUDA device {index} is not available ({count} visible)")
    return torch.device("cuda", index)
