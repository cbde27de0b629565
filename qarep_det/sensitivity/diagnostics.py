"""Why a model quantizes well or badly, in numbers: weight SQNR, weight outliers, output SQNR, BN scales. Pure torch.

RepVGG-style fusion can leave one huge tap per output channel (the identity's centre tap, many times its channel's
median: docs/results.md, Where INT8 goes); per-channel INT8 then spends its whole range on that tap and rounds the rest
coarsely. ``max_to_median`` exposes the outlier and ``weight_sqnr_db`` its cost, layer by layer; ``sqnr_db`` on outputs
measures what reaches the detector, and ``NoisePower`` accumulates the same ratio over many batches (signal and noise
summed first, then divided). :func:`bn_scales` reads the paper's mechanism in the training form: ``|gamma| / sqrt(var +
eps)`` per BN of every block of ours (a dead channel under RepVGG's identity BN explodes), with the dead channels
(:func:`dead_channel_mask`) behind it; :func:`fused_kernels` the fused kernel each block deploys, read without fusing:
its largest weight against its median, and per output channel the share of weights INT8 rounds to zero
(:func:`int8_zero_share`), the cost of one dominating tap. Together these are the QARepVGG paper's diagnosis of why
RepVGG quantizes badly (Chu et al., AAAI 2024, section 3), one row per block and branch (its C1, the weights);
:func:`block_outputs` reads its C2, the activations: each block's output variance and max / std on a few images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qarep_det.nn import Reparameterizable, RepBlock
from qarep_det.nn.fusion import bn_scale

BN_OUTLIER_FACTOR = 10.0
"""A BN channel is an outlier when its ``|gamma| / sigma`` exceeds this multiple of its BN's median. A dead channel
(running var -> 0) reaches ``|gamma| / sqrt(eps)``: about 30x a typical channel with Ultralytics' eps 1e-3, the paper's
692 and 1477 with eps 1e-5; healthy trained BNs stay well below the factor (docs/results.md, Where INT8 goes)."""


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(sum ref^2 / sum (ref - test)^2), in dB; inf when identical."""
    reference, test = reference.detach().double().cpu(), test.detach().double().cpu()
    noise = (reference - test).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def db(relative_noise: float) -> float:
    """SQNR in dB of a relative noise power (noise / signal): 0 -> inf, inf -> -inf."""
    if relative_noise == 0:
        return math.inf
    return -10 * math.log10(relative_noise) if math.isfinite(relative_noise) else -math.inf


@dataclass
class NoisePower:
    """Signal and noise power summed over batches, so an SQNR covers a whole image set, not a mean of ratios."""

    signal: float = 0.0
    noise: float = 0.0

    def add(self, reference: torch.Tensor, test: torch.Tensor) -> None:
        """Accumulate ``sum ref^2`` and ``sum (ref - test)^2`` (any device).

        Summed in float32: torch's cascade summation keeps ~1e-7 relative error on 26M values, and it was several
        times faster
        on the 2-core CPU than ``sum(dtype=float64)``, which dominated a diagnosis at 640 px.
        """
        reference, test = reference.detach().float(), test.detach().float()
        self.signal += float(reference.square().sum())
        self.noise += float((reference - test).square_().sum())

    @property
    def relative(self) -> float:
        """Noise over signal power; 0 without noise, inf for noise on a zero signal."""
        if self.noise == 0:
            return 0.0
        return self.noise / self.signal if self.signal > 0 else math.inf

    @property
    def sqnr_db(self) -> float:
        return db(self.relative)


def fake_quant_per_channel(weight: torch.Tensor, num_bits: int = 8) -> torch.Tensor:
    """Symmetric per-output-channel fake quantization with max calibration (step = max|w_c| / 127 for int8).

    Computed as ``round(w * (127 / amax)) / (127 / amax)`` with a tensor 127, the operations of ModelOpt /
    pytorch-quantization, so values near a rounding tie land on the same INT8 code as in the torch backend (a
    Python-int numerator or dividing by the step moved about one weight in 37k by a whole step in a test).
    """
    qmax = 2 ** (num_bits - 1) - 1
    amax = weight.detach().float().abs().flatten(1).amax(1).clamp(min=torch.finfo(torch.float32).tiny)
    inv_step = (amax.new_tensor(float(qmax)) / amax).view(-1, *([1] * (weight.dim() - 1)))
    return (torch.clamp((weight.float() * inv_step).round(), -qmax - 1, qmax) / inv_step).to(weight.dtype)


def weight_sqnr_db(weight: torch.Tensor, num_bits: int = 8) -> float:
    """SQNR of a weight tensor under symmetric per-channel INT8 (a proxy for the conv's output SQNR on iid inputs).

    Gaussian-like weights give ~41 dB; a channel dominated by one tap falls towards 10 log10(12 * 127^2 / fan_in),
    about 25 dB for a 3x3 conv over 64 channels, because every other weight rounds on that tap's coarse grid.
    """
    return sqnr_db(weight, fake_quant_per_channel(weight, num_bits))


def max_to_median(weight: torch.Tensor) -> tuple[float, int]:
    """The largest |weight| over its output channel's median |weight|, and that channel's index."""
    magnitudes = weight.detach().abs().flatten(1)
    channel = int(magnitudes.amax(1).argmax())
    median = float(magnitudes[channel].median())
    return (float(magnitudes[channel].max()) / median if median > 0 else math.inf), channel


def int8_zero_share(weight: torch.Tensor, num_bits: int = 8) -> torch.Tensor:
    """Per output channel, the share of its weights that are non-zero in float and zero at symmetric per-channel
    INT8 with max calibration (:func:`fake_quant_per_channel`): ``|w| < amax / 127 / 2``, ties rounding to even.

    The channel's largest weight sets ``amax``; when one tap dominates (RepVGG's identity centre tap behind a dead
    channel) every weight below half its step is lost, and this share says how many.
    """
    lost = (fake_quant_per_channel(weight.detach(), num_bits) == 0) & (weight.detach() != 0)
    return lost.flatten(1).double().mean(1)


def dead_channel_mask(bn: nn.BatchNorm2d) -> torch.Tensor:
    """The channels a BN has seen (almost) nothing on: running mean square ``running_var + running_mean^2 <= eps``.

    A post-ReLU channel that never fires has running mean 0 and running variance 0, so behind RepVGG's identity BN
    these are the block's dead input channels; their scale ``|gamma| / sqrt(var + eps)`` is then at least
    ``|gamma| / sqrt(2 eps)``, within a factor sqrt(2) of its ceiling ``|gamma| / sqrt(eps)``. Read from the BN's
    running statistics alone: no images needed.
    """
    return (bn.running_var + bn.running_mean.square()).detach() <= bn.eps


@dataclass(frozen=True)
class BNScale:
    """``|gamma| / sqrt(running_var + eps)`` of one BatchNorm of a block of ours, summarised over its channels."""

    block: str
    block_type: str
    branch: str
    max: float
    median: float
    channel: int  # where the max is
    outliers: int  # channels above BN_OUTLIER_FACTOR x median
    outlier: bool  # outliers > 0
    dead_channels: int  # dead_channel_mask(bn).sum(): for the identity branch, the block's dead input channels


def bn_scales(model: nn.Module) -> list[BNScale]:
    """BN scale factors of every training-form block of ours (each block names its BNs by branch: ``branch_bns``),
    in module order; empty for a fused model, which has no BN left."""
    rows = []
    for block_name, block in model.named_modules():
        if not isinstance(block, Reparameterizable):
            continue
        for branch, bn in block.branch_bns().items():
            scale = bn_scale(bn).detach().abs().double().cpu()  # float64 keeps a float64 model's scale exact
            median = float(scale.median())
            outliers = int((scale > BN_OUTLIER_FACTOR * median).sum())
            rows.append(
                BNScale(
                    block=block_name,
                    block_type=type(block).__name__,
                    branch=branch,
                    max=float(scale.max()),
                    median=median,
                    channel=int(scale.argmax()),
                    outliers=outliers,
                    outlier=outliers > 0,
                    dead_channels=int(dead_channel_mask(bn).sum()),
                )
            )
    return rows


@dataclass(frozen=True)
class FusedKernel:
    """The single kernel one block of ours deploys (its ``conv`` once fused), and what per-channel INT8 makes of it."""

    conv: str  # the fused conv's name, ``<block>.conv``: the name a per-conv analysis of the fused model uses
    block: str
    block_type: str
    max_abs: float  # largest |w| of the whole kernel
    median_abs: float  # median |w| of the whole kernel
    max_to_median: float  # max_abs / median_abs; inf for a zero median
    channel_max_to_median: float  # the worst output channel's max |w| over its own median (:func:`max_to_median`)
    channel: int  # that channel
    zero_share: tuple[float, ...]  # per output channel: :func:`int8_zero_share`
    zero_share_max: float
    zero_share_mean: float


@torch.no_grad()
def fused_kernels(model: nn.Module, num_bits: int = 8) -> list[FusedKernel]:
    """The fused kernel of every block of ours, in module order, the same for the training form (computed with the
    block's own fusion algebra, ``fused_kernel_bias``, the model left unchanged) as for the fused model."""
    rows = []
    for name, block in model.named_modules():
        if not isinstance(block, Reparameterizable):
            continue
        kernel = block.conv.weight if block.fused else block.fused_kernel_bias()[0]
        magnitudes = kernel.detach().abs().double().cpu()
        largest, median = float(magnitudes.max()), float(magnitudes.median())
        ratio, channel = max_to_median(kernel)
        share = int8_zero_share(kernel, num_bits).cpu()
        rows.append(
            FusedKernel(
                conv=f"{name}.conv" if name else "conv",
                block=name,
                block_type=type(block).__name__,
                max_abs=largest,
                median_abs=median,
                max_to_median=largest / median if median > 0 else math.inf,
                channel_max_to_median=ratio,
                channel=channel,
                zero_share=tuple(share.tolist()),
                zero_share_max=float(share.max()),
                zero_share_mean=float(share.mean()),
            )
        )
    return rows


@dataclass(frozen=True)
class BlockOutput:
    """The output of one Rep block over a set of images: what the next conv's per-tensor INT8 quantizer receives.

    ``max_to_std`` is how many standard deviations the largest |value| lies out: max calibration spends the INT8
    range on it, so the typical value gets ``127 / max_to_std`` levels per standard deviation (the paper's C2).
    """

    block: str
    block_type: str
    variance: float
    max_abs: float
    max_to_std: float  # inf for a constant output


@torch.no_grad()
def block_outputs(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[BlockOutput]:
    """Variance and max / std of every Rep block's output (after its activation) over ``batches``, in module order.

    Forward hooks on each :class:`~qarep_det.nn.RepBlock` accumulate the sum, the sum of squares (float64) and the
    largest |value| over all batches, so the figures cover the whole image set at once, not a mean over batches.
    Fused and training form give the same figures up to float rounding; the model runs in eval mode on its device.
    """
    device = next(model.parameters()).device
    sums: dict[str, list[float]] = {}

    def accumulate(name: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def hook(_: nn.Module, __: Any, output: torch.Tensor) -> None:
            values = output.detach().double()
            total = sums.setdefault(name, [0.0, 0.0, 0.0, 0.0])
            total[0] += float(values.sum())
            total[1] += float(values.square().sum())
            total[2] += values.numel()
            total[3] = max(total[3], float(values.abs().max()))

        return hook

    blocks = {name: m for name, m in model.named_modules() if isinstance(m, RepBlock)}
    handles = [block.register_forward_hook(accumulate(name)) for name, block in blocks.items()]
    try:
        model.eval()
        for batch in batches:
            model(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for name, (total, squares, count, largest) in sums.items():
        variance = max(squares / count - (total / count) ** 2, 0.0)
        std = math.sqrt(variance)
        rows.append(
            BlockOutput(name, type(blocks[name]).__name__, variance, largest, largest / std if std else math.inf)
        )
    return rows
