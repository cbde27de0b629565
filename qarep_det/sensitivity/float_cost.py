"""What a conv kept float costs: ``--float-cost`` of ``ptq_eval --keep-float`` / ``--max-drop``.

A user quantizes for speed, so the cheapest float set that meets a drop is the one whose INT8 model runs fastest,
not the one with the fewest float convs: an early backbone conv at stride 2 does as many multiply-accumulates as
several head convs at stride 32 together, and kept float it runs them at float speed.

- ``count``: every float conv costs the same; the ranking's order, most harmful first (the fewest float convs).
- ``latency``: a conv kept float costs what it adds to the INT8 model's latency, estimated as its multiply-accumulates
  at the model's image size (``Cout * Cin / groups * kh * kw * Hout * Wout``, from one forward pass with hooks,
  :func:`conv_macs`) times the backend's float-minus-INT8 time per multiply-accumulate. That factor is one per
  backend and CPU, so it orders no two convs differently and is not needed to choose: the ranking is re-ordered by
  harm per multiply-accumulate (:func:`by_cost`), and ``--max-drop``'s bisection runs unchanged on that order, so its
  K-th candidate is the cheapest way the greedy knows to win back that much harm (the knapsack's greedy order).
  Whether MACs predict the ms a float set costs on OpenVINO is measured in docs/results.md (``--float-cost``).

The harm is the ranking's own figure in linear units (:class:`~qarep_det.sensitivity.rankings.Sensitivity`); a conv
whose harm is not positive goes after every conv whose harm is, in ranking order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from qarep_det.errors import InputError

FLOAT_COSTS = {
    "latency": "harm per multiply-accumulate at the image size: the fastest INT8 model the search finds",
    "count": "the ranking's order: the fewest float convs",
}
DEFAULT_FLOAT_COST = "latency"  # INT8 is for speed: docs/diagnose.md, "What a float conv costs"
FLOAT_COST_HELP = "; ".join(f"{name}: {what}" for name, what in FLOAT_COSTS.items())


def check_float_cost(name: str) -> str:
    """``name`` if it is a float cost, else one line naming the accepted ones."""
    if name not in FLOAT_COSTS:
        raise InputError(f"unknown float cost {name!r}: choose from {', '.join(FLOAT_COSTS)}", field="float_cost")
    return name


@torch.no_grad()
def conv_macs(model: nn.Module, imgsz: int, names: Iterable[str]) -> dict[str, int]:
    """Multiply-accumulates of each named ``Conv2d`` of ``model`` on one ``imgsz`` x ``imgsz`` image (the letterbox
    every backend runs): its weight's elements (``Cout * Cin / groups * kh * kw``) times its output's ``H * W``, the
    output sizes taken from one forward pass of a blank image with hooks (the model is left as it was)."""
    wanted = list(names)
    convs = {name: model.get_submodule(name) for name in wanted}
    macs: dict[str, int] = {}

    def hook(name: str):
        def record(conv: nn.Conv2d, _: tuple, out: torch.Tensor) -> None:
            macs[name] = conv.weight.numel() * out.shape[-2] * out.shape[-1]

        return record

    handles = [conv.register_forward_hook(hook(name)) for name, conv in convs.items()]
    parameter = next(model.parameters())
    training = model.training
    try:
        model.eval()(torch.zeros(1, 3, imgsz, imgsz, device=parameter.device, dtype=parameter.dtype))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    if missing := [name for name in wanted if name not in macs]:
        raise ValueError(f"{len(missing)} convs did not run in a forward pass, e.g. {missing[0]!r}")
    return {name: macs[name] for name in wanted}


def by_cost(ranking: Sequence[str], harm: Mapping[str, float], costs: Mapping[str, float]) -> list[str]:
    """``ranking`` re-ordered by ``harm / cost``, largest first; ties, and convs whose harm is not positive (their
    ratio counts as 0), keep their ranking order."""
    if bad := [name for name in ranking if not costs[name] > 0]:
        raise ValueError(f"a float conv's cost must be > 0, got {costs[bad[0]]} for {bad[0]!r}")
    return sorted(ranking, key=lambda name: -max(harm[name], 0.0) / costs[name])


def float_cost_row(macs: Mapping[str, int], float_layers: Iterable[str], float_cost: str) -> dict[str, object]:
    """The results.json keys of a ranked row: how its float convs were chosen, and what they cost, the estimate the
    latency order minimises (GMACs kept float, and their share of the quantizable convs' MACs)."""
    kept = sum(macs.get(name, 0) for name in float_layers)
    return {"float_cost": float_cost, "float_gmacs": kept / 1e9, "float_mac_share": kept / sum(macs.values())}
