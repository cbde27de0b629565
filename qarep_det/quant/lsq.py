"""Learned quantizer ranges (LSQ, Esser et al., ICLR 2020) for ModelOpt's INT8 fake quantization.

ModelOpt 0.47 cannot train a range (``amax``) itself: its fake-quant backward returns no gradient for amax, the
quantizer reads amax detached, ``learn_amax`` is deprecated and refused, and its own ``lsq`` algorithm serves NVFP4
block scales only. It does offer an extension point, ``register_quant_backend(name, fn)``: a quantizer whose
``backend`` attribute names ``fn`` fake-quantizes with ``fn(inputs, quantizer)`` instead of its own code. This module
is such a backend, plus the switch that turns a quantized model's ranges into parameters:

- forward: ModelOpt's own ``fake_tensor_quant``, called with the arguments ``TensorQuantizer._fake_quantize`` passes
  for integer formats, so the simulated INT8 is ModelOpt's, bit for bit (grid [-128, 127], round half to even,
  all-zero output at amax <= 2^-24). Re-deriving it (``127 / amax``) would not be: torch computes a float divided by
  a tensor as a reciprocal times the float, one ulp off ModelOpt's ``tensor(127.) / amax``;
- backward: LSQ's. With step ``s = amax / 127`` and ``v = x / s``: the input gets gradient 1 inside the grid and 0
  where it clips (ModelOpt's default passes 1 everywhere, which would push clipped values further out while their
  range grows), the step gets ``round(v) - v`` inside and the clamped code outside (LSQ's eq. 3), scaled by LSQ's
  ``g = 1 / sqrt(N * 127)``, N the elements one scale quantizes per image (a weight channel; one input image).
  amax, not s, is the parameter: its gradient is ``127 * g * dL/ds``, so SGD on amax moves s as LSQ's SGD on s.

Outside autograd (``no_grad``, EMA, validation) and during ONNX / TorchScript / torch.export tracing the backend hands
over to ModelOpt's call with ModelOpt's own amax read, so the QDQ export is ModelOpt's, with the learned scales.
:func:`freeze_ranges` undoes :func:`learn_ranges` (buffers, no backend): what is saved is then a plain ModelOpt model
that a process without this module loads.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

BACKEND = "qarep_det_lsq"
AMAX_FLOOR = 1e-6
"""Ranges are kept at or above this after every optimizer step (ModelOpt refuses a negative amax)."""
ZERO_AMAX = 2.0**-24  # ModelOpt quantizes everything to 0 at or below this amax


def _modelopt_fake_quant(inputs: Tensor, quantizer: Any, amax: Tensor) -> Tensor:
    """ModelOpt's integer fake quant, called exactly as ``TensorQuantizer._fake_quantize`` calls it."""
    from modelopt.torch.quantization.tensor_quant import fake_tensor_quant

    axis = quantizer.axis
    return fake_tensor_quant(
        inputs,
        amax,
        quantizer._get_bias(inputs),
        quantizer._num_bits,
        quantizer._unsigned,
        quantizer._narrow_range,
        quantizer._trt_high_precision_dtype,
        quantizer._pass_through_bwd,
        quantizer.block_sizes.get(-1) if quantizer.block_sizes else None,
        axis[0] if isinstance(axis, tuple) else axis,
    )


def int_grid(quantizer: Any) -> tuple[float, float]:
    """ModelOpt's integer grid (qmin, qmax): [-128, 127] for signed 8 bit, [-127, 127] with narrow range."""
    qmax = 2.0 ** (quantizer._num_bits - 1 + int(quantizer._unsigned)) - 1.0
    if quantizer._unsigned:
        return 0.0, qmax
    return (-qmax if quantizer._narrow_range else -qmax - 1.0), qmax


def grad_scale(inputs: Tensor, amax: Tensor, qmax: float, per_image: bool) -> float:
    """LSQ's gradient scale ``1 / sqrt(N * qmax)``, N the elements one scale sees (per image for activations).

    Per image because Ultralytics' loss sums over the images of a batch, as the weight gradients do: the ratio of
    a range's update to a weight's, which LSQ balances with g, does not depend on the batch then.
    """
    n = inputs.numel() // max(amax.numel(), 1)
    if per_image and inputs.dim() > 0 and inputs.shape[0] > 0:
        n //= inputs.shape[0]
    return 1.0 / math.sqrt(max(n, 1) * qmax)


class LSQFakeQuant(torch.autograd.Function):
    """ModelOpt's fake quant forward, LSQ's backward for the input and for amax (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, amax: Tensor, quantizer: Any, scale: float) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x, amax)
        ctx.grid, ctx.scale = int_grid(quantizer), scale
        return _modelopt_fake_quant(x, quantizer, amax.detach())

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # noqa: D102
        x, amax = ctx.saved_tensors
        qmin, qmax = ctx.grid
        a = amax.float()
        dead = a <= ZERO_AMAX  # ModelOpt outputs 0 there: nothing to learn; the input keeps a plain STE
        inverse_step = torch.where(dead, 0.0, torch.full_like(a, qmax) / a)  # as ModelOpt: tensor(qmax) / amax
        xf = x.float()
        v = xf * inverse_step
        # clipped above: x > amax, compared exactly as ModelOpt's own clipping mask does. v > qmax would depend on the
        # rounding of x * (qmax / amax), and max calibration puts one element of every channel exactly at amax
        inside = (v >= qmin) & (xf <= a)
        grad = grad_out.float()
        grad_x = torch.where(inside, grad, 0.0).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_amax = None
        if ctx.needs_input_grad[1]:
            dq_ds = torch.round(v).clamp_(qmin, qmax) - torch.where(inside, v, 0.0)  # LSQ eq. 3
            grad_s = (dq_ds * grad).sum_to_size(a.shape)
            grad_amax = torch.where(dead, 0.0, grad_s * (qmax * ctx.scale)).to(amax.dtype)
        return grad_x, grad_amax, None, None


def lsq_fake_quant(inputs: Tensor, quantizer: Any) -> Tensor:
    """The backend entry point ModelOpt calls: ``fn(inputs, quantizer) -> fake-quantized inputs``."""
    from modelopt.torch.quantization.utils import is_torch_export_mode

    amax = quantizer._amax  # the Parameter itself: quantizer._get_amax returns its detached .data
    tracing = torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or is_torch_export_mode()
    if tracing or not torch.is_grad_enabled() or not amax.requires_grad:
        # ModelOpt's call with ModelOpt's amax read: the ONNX exporter must see amax as a constant (amax.detach()
        # would be traced as aten::detach of a parameter, which ModelOpt's Q/DQ symbolic refuses)
        return _modelopt_fake_quant(inputs, quantizer, quantizer._get_amax(inputs))
    if amax.device != inputs.device:
        amax = amax.to(inputs.device)
    per_image = bool((quantizer.backend_extra_args or {}).get("per_image", False))
    scale = grad_scale(inputs, amax, int_grid(quantizer)[1], per_image)
    return LSQFakeQuant.apply(inputs, amax, quantizer, scale)


def register_backend() -> None:
    """Register :func:`lsq_fake_quant` with ModelOpt under :data:`BACKEND`, once per process."""
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
        is_registered_quant_backend,
        register_quant_backend,
    )

    if not is_registered_quant_backend(BACKEND):
        register_quant_backend(BACKEND, lsq_fake_quant)


def _ranged_quantizers(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """(name, quantizer) of every enabled ModelOpt quantizer that holds a range (kept-float convs hold none)."""
    for name, module in model.named_modules():
        if type(module).__name__ == "TensorQuantizer" and module.is_enabled and hasattr(module, "_amax"):
            yield name, module


def learn_ranges(model: nn.Module) -> list[nn.Parameter]:
    """Make every enabled quantizer's range a trainable parameter read by the LSQ backend; returns them.

    The parameter replaces the ``_amax`` buffer under the same name (same state-dict key, value and float32), so
    ModelOpt's ``amax`` property and setter, its export and Ultralytics' QAT checkpoint code keep working. Call it
    before an optimizer, DDP or an EMA takes hold of the model's tensors. Idempotent.
    """
    register_backend()
    ranges = []
    for name, quantizer in _ranged_quantizers(model):
        if not isinstance(quantizer._amax, nn.Parameter):
            # nn.Module.__setattr__ drops the buffer of that name and registers the parameter
            quantizer._amax = nn.Parameter(quantizer._amax.detach().clone().float())
        quantizer._amax.requires_grad_(True)
        quantizer.backend = BACKEND
        quantizer.backend_extra_args = {"per_image": not name.endswith("weight_quantizer")}
        ranges.append(quantizer._amax)
    return ranges


@torch.no_grad()
def freeze_ranges(model: nn.Module) -> None:
    """Undo :func:`learn_ranges`: ranges back to buffers (same values), ModelOpt's own fake quant."""
    for _, quantizer in _ranged_quantizers(model):
        if isinstance(quantizer._amax, nn.Parameter):
            value = quantizer._amax.detach().clone()
            del quantizer._amax
            quantizer.register_buffer("_amax", value)
        if quantizer.backend == BACKEND:
            quantizer.backend, quantizer.backend_extra_args = None, {}


def range_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned ranges of a model (those :func:`learn_ranges` made parameters)."""
    return [q._amax for _, q in _ranged_quantizers(model) if isinstance(q._amax, nn.Parameter)]


@torch.no_grad()
def clamp_ranges_(ranges: list[Tensor], floor: float = AMAX_FLOOR) -> None:
    """Keep ranges positive (in place): ModelOpt refuses a negative amax."""
    for amax in ranges:
        amax.clamp_(min=floor)


class LogDomainSteps:
    """Makes an optimizer step learned ranges in the log domain: ``amax <- amax * exp(update)``.

    Why: one model's ranges span orders of magnitude, and a clipping calibration needs some of them multiplied several
    times over (docs/qat.md). A step of the same size in amax units either cannot move the large ones or wipes out the
    small ones; SGD and Adam both did (docs/qat.md, learned ranges). TQT (Jain et al., MLSys 2020) trains log thresholds
    for this reason. Any torch optimizer does it with two hooks: before its step the gradient becomes ``dL/dlog(amax) =
    amax * dL/damax`` (the LSQ gradient above, scaled by g); after it, the optimizer's change ``d`` of the parameter is
    applied as ``amax * exp(d)``. Its state (momentum, Adam moments) then lives in log units throughout, also across a
    resume, and amax stays positive (:func:`clamp_ranges_` guards float underflow).
    """

    def __init__(self, ranges: list[nn.Parameter]) -> None:
        self.ranges = ranges
        self.before: list[Tensor] = []

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook into ``optimizer``, whose parameters include the ranges."""
        optimizer.register_step_pre_hook(self._to_log)
        optimizer.register_step_post_hook(self._from_log)

    @torch.no_grad()
    def _to_log(self, *_: Any) -> None:
        self.before = [amax.detach().clone() for amax in self.ranges]
        for amax in self.ranges:
            if amax.grad is not None:
                amax.grad.mul_(amax)

    @torch.no_grad()
    def _from_log(self, *_: Any) -> None:
        for amax, before in zip(self.ranges, self.before, strict=True):
            amax.copy_(before * torch.exp(amax - before))
        clamp_ranges_(self.ranges)
