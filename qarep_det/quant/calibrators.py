"""Histogram calibrators for symmetric INT8 activations: percentile, MSE and entropy (KL), vectorized in torch.

Why not ModelOpt's own ``HistogramCalibrator`` (nvidia-modelopt 0.47): its MSE and entropy searches loop in Python
over every candidate bin and are O(bins^2), and its fixed-width histogram grows whenever a later batch exceeds the
first batch's max, so its cost grows with the data (docs/int8.md). Here the range is known first (a max-calibration
pass, as TensorRT does), each activation gets a 2048-bin histogram of |x| over [0, max], and all candidate ranges are
scored at once, in one vectorized pass per quantizer.

The rules follow TensorRT / pytorch-quantization: candidates start at bin 128; MSE scores the bin centres weighted
by their counts; entropy minimizes KL(P || Q) where P is the histogram clipped at the candidate (outliers folded into
the last bin) and Q is P merged into 128 levels and spread back uniformly over P's non-empty bins. On test
distributions entropy and percentile agree with ModelOpt's implementations; ModelOpt 0.47's histogram MSE is broken
(``_compute_amax_mse`` passes ``num_bits`` positionally into the ``bias`` slot of ``fake_tensor_quant``), while this
module finds the brute-force MSE optimum.
"""

from __future__ import annotations

import torch

from qarep_det.errors import InputError

NUM_BINS = 2048
START_BIN = 128


class AbsHistogram:
    """Running histogram of |x| over the fixed range [0, amax] (amax from a prior max pass)."""

    def __init__(self, amax: float, bins: int = NUM_BINS) -> None:
        if amax <= 0:
            raise ValueError(f"histogram range must be positive, got amax={amax}")
        self.amax = float(amax)
        self.counts = torch.zeros(bins, dtype=torch.float64)

    def collect(self, x: torch.Tensor) -> None:
        """Add a tensor's |values| (clamped into range, so float noise at the max is never dropped)."""
        values = x.detach().abs().float().clamp_(max=self.amax)
        self.counts += torch.histc(values, bins=self.counts.numel(), min=0.0, max=self.amax).double().cpu()

    @property
    def edges(self) -> torch.Tensor:
        """Bin edges, ``bins + 1`` values from 0 to amax."""
        return torch.linspace(0.0, self.amax, self.counts.numel() + 1, dtype=torch.float64)


def percentile_amax(hist: AbsHistogram, percentile: float) -> float:
    """Upper edge of the bin where the cumulative share of |x| reaches ``percentile`` (0-100]."""
    cdf = hist.counts.cumsum(0) / hist.counts.sum()
    idx = int(torch.searchsorted(cdf, torch.tensor(percentile / 100.0, dtype=torch.float64)).clamp(max=len(cdf) - 1))
    return float(hist.edges[idx + 1])


def mse_amax(hist: AbsHistogram, num_bits: int = 8, start_bin: int = START_BIN) -> float:
    """The candidate range (a bin centre) whose symmetric quantization of the histogram has the least MSE."""
    edges = hist.edges.float()
    centres = (edges[1:] + edges[:-1]) / 2
    candidates = centres[start_bin:]
    qmax = 2 ** (num_bits - 1) - 1
    inv_step = (qmax / candidates)[:, None]  # (candidates, 1); all candidates x all centres at once, in place
    quantized = torch.clamp(torch.round(centres[None, :] * inv_step), -qmax - 1, qmax).div_(inv_step)
    errors = quantized.sub_(centres[None, :]).pow_(2) @ hist.counts.float()
    return float(candidates[int(errors.argmin())])


def entropy_amax(hist: AbsHistogram, num_bits: int = 8, start_bin: int = START_BIN) -> float:
    """The clipping range that minimizes KL(P || Q) between the clipped and the quantized distribution.

    Every candidate end bin ``e`` is scored at once from prefix sums: Q is constant inside each of the 128 groups,
    so sum(P log Q) needs only per-group totals, never the (candidates x bins) matrix. Ties go to the widest range.
    """
    counts = hist.counts.clone()
    counts[0] = counts[1]  # as pytorch-quantization: the exact zeros of ReLU outputs must not dominate P
    bins, levels = counts.numel(), 2 ** (num_bits - 1)  # |x| maps onto 128 levels for signed int8
    zero = counts.new_zeros(1)
    prefix = torch.cat([zero, counts.cumsum(0)])  # prefix[k] = counts[:k].sum()
    prefix_nonzero = torch.cat([zero, (counts > 0).double().cumsum(0)])
    prefix_clogc = torch.cat([zero, torch.special.xlogy(counts, counts).cumsum(0)])
    total = prefix[-1]

    ends = torch.arange(max(start_bin, levels), bins + 1)  # candidate e keeps bins [0, e)
    outliers = total - prefix[ends]
    last = counts[ends - 1] + outliers  # P's last bin, with everything clipped folded in
    # group g of candidate e holds bins [starts[g], starts[g+1]) = those with floor(j * levels / e) == g
    starts = (torch.arange(levels + 1)[None, :] * ends[:, None] + levels - 1) // levels
    group_sum = prefix[starts[:, 1:]] - prefix[starts[:, :-1]]
    group_nonzero = prefix_nonzero[starts[:, 1:]] - prefix_nonzero[starts[:, :-1]]
    log_q = torch.log(group_sum / group_nonzero.clamp(min=1)).where(group_sum > 0, 0.0)  # Q per non-empty bin
    p_log_p = prefix_clogc[ends - 1] + torch.special.xlogy(last, last)
    p_log_q = (group_sum * log_q).sum(1) + outliers * log_q[:, -1]  # bin e-1 always sits in the last group
    kl = (p_log_p - p_log_q) / total - torch.log(total) + torch.log(prefix[ends])
    kl = kl.where(counts[ends - 1] > 0, torch.inf)  # clipped mass on an empty bin: Q is 0 where P is not
    best = len(kl) - 1 - int(kl.flip(0).argmin())
    return float(hist.edges[int(ends[best])])


def histogram_amax(hist: AbsHistogram, method: str, percentile: float = 99.99, num_bits: int = 8) -> float:
    """Dispatch by calibration method name (``percentile``, ``mse``, ``entropy``)."""
    if method == "percentile":
        return percentile_amax(hist, percentile)
    if method == "mse":
        return mse_amax(hist, num_bits)
    if method == "entropy":
        return entropy_amax(hist, num_bits)
    raise InputError(f"no histogram calibrator named {method!r}; use percentile, mse or entropy")
