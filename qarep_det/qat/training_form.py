"""QAT of the training form: the blocks keep their branches and BatchNorms, and train the deployed arithmetic.

``qarep-det qat --form fused`` fine-tunes the fused student: each block one conv whose weight and bias are parameters
(the folded BN scales included). ``--form training`` starts from the very same calibrated student (same calibration
draw, ranges, scope and kept-float convs) and gives every block of ours (:class:`~qarep_det.nn.Reparameterizable`)
its branches back: the block's quantized conv becomes an :class:`EquivalentConv`, which computes the block's
equivalent 3x3 kernel and bias on every forward, with the fusion's own differentiable algebra
(``fused_kernel_bias``), fake-quantizes that kernel per output channel and the block's input per tensor with the
conv's own ModelOpt quantizers (frozen or learned ranges alike), and runs one conv. So what trains is exactly what is
deployed, parameterised as the branches: gradients reach the branch kernels and the BN affine parameters (the idea
behind RepOpt, and behind Ultralytics keeping BN unfused in its QAT).

BatchNorm statistics are frozen: the kernel folds each BN with its running statistics, as fusion does, and no BN ever
runs as a module, so its statistics never update (the usual QAT practice: batch statistics would make the trained
arithmetic differ from the deployed one). Convs that are not our blocks (Ultralytics' Conv in the neck and head) stay
as in the fused QAT: one quantized conv with BN folded.

Checkpoints hold the fused student (:func:`fused_student`: each block's conv weight is its equivalent kernel, its
quantizers the very ones trained), so ptq-eval, ``YOLO(best.pt)`` and the exporters read them as any QAT checkpoint.
The branches never reach a checkpoint; a run of this form therefore cannot ``--resume`` (its last.pt starts a new run
as ``--weights``, in the fused form).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qarep_det.errors import InputError
from qarep_det.nn import Reparameterizable

FORMS = ("fused", "training")
"""What ``qarep-det qat --form`` trains: the fused graph's parameters, or the blocks' branches and BNs."""
DEFAULT_FORM = "fused"

BLOCKS_KEY = "qat_training_form"  # where the packed student carries the unfused blocks until setup_model


def unfused_blocks(model: nn.Module) -> dict[str, Reparameterizable]:
    """The blocks of ours that still have their branches, by module name (the same names fusion keeps)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Reparameterizable) and not m.fused}


def training_form_blocks(model: nn.Module, weights: Path | str) -> dict[str, Reparameterizable]:
    """The unfused blocks a training-form run trains, from the FP32 checkpoint ``weights`` (loaded as ``model``);
    ``InputError`` where there are none: a QAT or fused checkpoint, or a detector without blocks of ours."""
    if any(type(m).__name__ == "TensorQuantizer" for m in model.modules()):
        raise InputError(
            f"--form training: '{weights}' is a QAT checkpoint, whose blocks are fused; start from its FP32 "
            "checkpoint, or continue it with --form fused"
        )
    blocks = unfused_blocks(model)
    if not blocks:
        raise InputError(
            f"--form training: '{weights}' has no unfused rep blocks to train in their training form (a fused "
            "checkpoint, or a detector without QARep/RepVGG blocks); use --form fused"
        )
    return blocks


class EquivalentConv(nn.Module):
    """A fused block's quantized conv, computed from the block's branches on every forward (module docstring).

    It holds the branches (``block``, the unfused block; only its ``fused_kernel_bias`` runs) and the quantized conv's
    three quantizers under their own names, so state-dict keys, learned ranges and the EMA's pinned ranges read as in
    the fused student. The quantized conv itself stays outside the module tree (its weight and bias are not trained):
    :meth:`to_fused` writes the equivalent kernel and bias into it for a checkpoint.
    """

    def __init__(self, quantized: nn.Conv2d, block: Reparameterizable) -> None:
        super().__init__()
        self.block = block.requires_grad_(True)
        self.input_quantizer = quantized.input_quantizer
        self.weight_quantizer = quantized.weight_quantizer
        self.output_quantizer = quantized.output_quantizer
        self.__dict__["quantized"] = quantized  # shares the quantizers; deepcopy keeps them shared

    def forward(self, x: Tensor) -> Tensor:
        """What ModelOpt's quantized conv computes (input, weight and output quantizer around one conv), with the
        equivalent kernel and bias as weight and bias."""
        kernel, bias = self.block.fused_kernel_bias()
        conv = self.quantized
        x, kernel = self.input_quantizer(x), self.weight_quantizer(kernel)
        y = F.conv2d(x, kernel, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return self.output_quantizer(y)

    @torch.no_grad()
    def to_fused(self) -> nn.Conv2d:
        """The quantized conv with the equivalent kernel and bias written in: the fused student's conv."""
        kernel, bias = self.block.fused_kernel_bias()
        conv = self.quantized.to(kernel.device)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        return conv


def to_training_form(student: nn.Module, blocks: dict[str, Reparameterizable]) -> int:
    """Give the fused student's blocks their branches back, in place: each named block's quantized conv becomes an
    :class:`EquivalentConv` over the unfused block of that name. Returns how many."""
    for name, block in blocks.items():
        fused = student.get_submodule(name)
        fused.conv = EquivalentConv(fused.conv, block)
    return len(blocks)


def has_training_form(model: nn.Module) -> bool:
    """Whether ``model`` trains in the training form (holds :class:`EquivalentConv` modules)."""
    return any(isinstance(m, EquivalentConv) for m in model.modules())


def fused_student(model: nn.Module) -> nn.Module:
    """A copy of a training-form student in the fused student's form: what its checkpoints hold."""
    fused = copy.deepcopy(model)
    for parent in [m for m in fused.modules() if isinstance(getattr(m, "conv", None), EquivalentConv)]:
        parent.conv = parent.conv.to_fused()
    return fused


@contextlib.contextmanager
def ema_fused(ema: Any, live: nn.Module | None = None) -> Iterator[None]:
    """Within the block, ``ema.ema`` (Ultralytics' ModelEMA) is its fused student, e.g. for writing a checkpoint.

    Ultralytics' ``save_model`` repairs a non-finite EMA tensor by copying the live model's tensor of the same key,
    which the fused copy no longer shares with the training-form live model. So the repair is made here, before the
    conversion, from ``live`` (the training-form model being trained); a tensor non-finite in both is zeroed in the
    fused copy, as Ultralytics' own fallback zeroes it in the checkpoint."""
    model = ema.ema
    if not has_training_form(model):
        yield
        return
    if live is not None:
        live_state = live.state_dict()
        for key, value in model.state_dict().items():
            if value.is_floating_point() and not value.isfinite().all() and live_state[key].isfinite().all():
                value.copy_(live_state[key])
    fused = fused_student(model)
    with torch.no_grad():
        for value in fused.state_dict().values():
            if value.is_floating_point():
                torch.nan_to_num_(value, nan=0.0, posinf=0.0, neginf=0.0)
    ema.ema = fused
    try:
        yield
    finally:
        ema.ema = model
