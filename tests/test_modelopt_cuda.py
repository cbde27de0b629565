"""ModelOpt on CUDA: no JIT build of its fake-quant extension, and CUDA tensors take the CPU's pure-torch code.

No GPU here, so a tensor subclass poses as a CUDA tensor (``is_cuda``) and ModelOpt's build entry point is replaced
by one that records the attempt.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("modelopt")

from modelopt.torch.quantization import extensions, tensor_quant  # noqa: E402
from modelopt.torch.utils import cpp_extension  # noqa: E402

from qarep_det.quant.backends.simulated import import_modelopt  # noqa: E402


class PosingAsCuda(torch.Tensor):
    """Takes ModelOpt's CUDA branch (``inputs.is_cuda``) while computing on the CPU."""

    @property
    def is_cuda(self) -> bool:
        return True


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """ModelOpt as in a new process on a GPU machine: extension never tried, CUDA present; returns the names of the
    extensions it then tries to build (each attempt fails, which ModelOpt turns into a warning)."""
    attempts: list[str] = []

    def build(name: str, *args, **kwargs):
        attempts.append(name)
        raise RuntimeError("no nvcc in this test")

    monkeypatch.delattr(extensions.get_cuda_ext, "extension", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")  # else ModelOpt sets it for the build it is about to run
    monkeypatch.setattr(cpp_extension, "load", build)
    return attempts


def test_cuda_fake_quant_runs_the_cpu_code_without_building(builds: list[str]) -> None:
    import_modelopt()
    assert extensions.get_cuda_ext() is None and builds == []  # ModelOpt's "no extension" state, without a build
    x = torch.randn(2, 8, 5, 5) * 3
    for amax in (torch.tensor(2.0), torch.rand(2, 1, 1, 1) + 0.5):  # per-tensor and per-channel
        on_cpu = tensor_quant.FakeTensorQuantFunction.apply(x, amax, None, 8, False, True)
        as_cuda = tensor_quant.FakeTensorQuantFunction.apply(x.as_subclass(PosingAsCuda), amax, None, 8, False, True)
        assert torch.equal(as_cuda.as_subclass(torch.Tensor), on_cpu)
        assert not torch.equal(on_cpu, x)  # it did quantize


def test_an_extension_loaded_before_us_is_kept(builds: list[str]) -> None:
    loaded = object()
    extensions.get_cuda_ext.extension = loaded
    import_modelopt()
    assert extensions.get_cuda_ext() is loaded
