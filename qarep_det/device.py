"""One reading of a tool's ``--device`` argument, checked against this machine before any work, and of the CPU (its
name and the instruction sets INT8 speed depends on)."""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path

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


INT8_ISA = {
    "avx2": "AVX2",
    "avx512f": "AVX-512F",
    "avx_vnni": "AVX-VNNI",
    "avx512_vnni": "AVX512-VNNI",
    "avx512_bf16": "AVX512-BF16",
    "amx_int8": "AMX-INT8",
    "amx_bf16": "AMX-BF16",
}
"""The /proc/cpuinfo flags that decide what INT8 and low-precision float run on (label as Intel spells it)."""
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # an int8 dot-product instruction: u8 x s8 sums in int32


@dataclass(frozen=True)
class CpuInfo:
    """This CPU's model name and flags, as /proc/cpuinfo states them (``platform.processor()`` and no flags
    elsewhere): INT8 speed depends on them more than on anything a tool does, so timings print them."""

    name: str
    flags: frozenset[str]

    @property
    def int8_isa(self) -> list[str]:
        """The INT8-relevant instruction sets present (:data:`INT8_ISA`), in that order."""
        return [label for flag, label in INT8_ISA.items() if flag in self.flags]

    @property
    def vnni(self) -> bool:
        """Whether it has an int8 dot-product instruction (AVX-VNNI, AVX512-VNNI or AMX); False if unknown."""
        return any(flag in self.flags for flag in VNNI_FLAGS)


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """Read ``cpuinfo`` (the first processor's model name and flags)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return CpuInfo(platform.processor(), frozenset())
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return CpuInfo(fields.get("model name") or platform.processor(), frozenset(fields.get("flags", "").split()))
