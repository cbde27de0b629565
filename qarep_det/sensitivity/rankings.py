"""Which convs to keep float first: the sensitivity rankings ``ptq_eval --keep-float`` / ``--max-drop`` choose from.

Every ranking scores each quantized conv of a fused detector with the simulated model calibrated once (the INT8
model the torch backend runs), on the first images of the calibration draw, most harmful first:

- ``isolated``: the detector's output noise with only this conv's quantizers on, everything else float
  (:func:`qarep_det.sensitivity.analysis.isolated_noise`, the ranking diagnose reports);
- ``revert``: the output noise of the fully INT8 model with only this conv restored to float: what reverting it
  buys with every interaction in the rest of the INT8 network kept, as NNCF's accuracy control ranks (it then
  validates each candidate on a metric; here one restarted forward per conv and batch measures the output);
- ``fisher``: the loss increase the conv's own quantization error causes to second order, with an empirical Fisher
  (diagonal) for the Hessian: ``sum((dL/dY)^2 * (Yq - Y)^2)`` over its output ``Y``, ``Yq`` being its INT8 output on
  the same FP32 input and ``L`` Ultralytics' detection loss (``v8DetectionLoss``) on the images' own labels. One
  forward and one backward pass per batch score every conv (the score ModelOpt's ``auto_quantize`` ranks
  precisions by, ``modelopt/torch/quantization/algorithms.py``). It needs the calibration images' YOLO labels.

Each ranks the errors of the backend that will run the model: for OpenVINO with NNCF's overflow fix (CPUs without
VNNI) the weights are on its half-range grid (:func:`~qarep_det.quant.backends.simulated.half_range_weights`), which on
such a CPU is where nearly all of OpenVINO's INT8 loss comes from (docs/results.md).
In every ranking a conv's group is its
weight quantizer and its input quantizer; for the stem that input quantizer
is the image input's, which NNCF also counts with the stem. ``fisher`` is the default: the cheapest (one backward
pass per batch against one restarted forward per conv and batch), and the one that kept no more convs float than
NNCF's accuracy control for the same target; how each agrees with the leave-one-out mAP
(``benchmarks/leave_one_out.py``): docs/results.md.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from qarep_det.data.images import load_letterboxed
from qarep_det.data.labels import read_yolo_label
from qarep_det.errors import InputError
from qarep_det.quant.backends.simulated import half_range_weights, quantize_torch
from qarep_det.quant.calibration import CalibrationSet, first_images
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.sensitivity.analysis import (
    FAST_LAYOUT,
    ConvWalk,
    add_detection,
    detection_noise,
    isolated_noise,
    out_of_place,
    rank_by_noise,
    relative_detection_noise,
    set_quantizers,
)
from qarep_det.sensitivity.diagnostics import NoisePower
from qarep_det.sensitivity.float_cost import by_cost

RANKINGS = {
    "isolated": "the detector's output noise with only that conv INT8",
    "revert": "the output noise of the INT8 model with only that conv float",
    "fisher": "the detection loss's increase, from one backward pass (needs the calibration images' labels)",
}
DEFAULT_RANKING = "fisher"  # measured: docs/results.md, "Against NNCF's accuracy control"
RANKING_HELP = "; ".join(f"{name}: {what}" for name, what in RANKINGS.items())


def check_ranking(name: str) -> str:
    """``name`` if it is a ranking, else one line naming the accepted ones."""
    if name not in RANKINGS:
        raise InputError(f"unknown ranking {name!r}: choose from {', '.join(RANKINGS)}")
    return name


def revert_noise(
    fused: nn.Module,
    qmodel: nn.Module,
    images: Sequence[torch.Tensor],
    *,
    recipe: QuantRecipe,
    device: str | torch.device = "cpu",
    progress: bool = True,
    full: tuple[NoisePower, NoisePower] | None = None,
) -> dict[str, tuple[NoisePower, NoisePower]]:
    """Each quantized conv's box and score noise against FP32 when it alone is restored to float in the fully INT8
    ``qmodel`` (calibrated with ``recipe``; not modified): per batch one FP32 pass, one INT8 pass kept restartable,
    and per conv a forward restarted from its node in the INT8 model with its quantizers off. ``full``, if given,
    accumulates the fully INT8 model's box and score noise (what a revert removes noise from), from the same passes."""
    from qarep_det.quant.scope import quantized_conv_names
    from qarep_det.ultralytics.restartable import RestartableForward

    names = quantized_conv_names(fused, recipe)
    qmodel = out_of_place(copy.deepcopy(qmodel).to(device, memory_format=FAST_LAYOUT))
    walk = ConvWalk.of(fused, qmodel, names, device)
    int8_graph = RestartableForward(qmodel)
    for x, bar in walk.batches(images, device, progress):
        reference = walk.graph.forward(x).output
        cache = int8_graph.forward(x)
        if full is not None:
            add_detection(*full, reference, cache.output)
        for name, conv in walk.qconvs.items():
            set_quantizers(conv, False)
            try:
                add_detection(
                    walk.errors[name].boxes,
                    walk.errors[name].scores,
                    reference,
                    int8_graph.restart(cache, name, qmodel),
                )
            finally:
                set_quantizers(conv, True)
            bar.update()
    return {name: (e.boxes, e.scores) for name, e in walk.errors.items()}


def check_labelled(paths: Sequence[Path]) -> None:
    """One line when none of ``paths`` has a YOLO label file: the gradient ranking has no loss to differentiate."""
    from ultralytics.data.utils import img2label_paths

    if not any(Path(label).is_file() for label in img2label_paths([str(p) for p in paths])):
        raise InputError(
            f"--rank-by fisher needs the calibration images' YOLO labels, and none of the {len(paths)} ranked "
            f"images has one (e.g. for '{paths[0]}'); rank by {' or '.join(r for r in RANKINGS if r != 'fisher')}"
        )


def labelled_batches(paths: Sequence[Path], imgsz: int, batch_size: int, nc: int) -> Iterator[dict[str, torch.Tensor]]:
    """The images letterboxed as calibration does, with their labels mapped into the letterbox: batches in the form
    Ultralytics' detection loss reads (``img``, ``cls``, ``bboxes`` normalized xywh, ``batch_idx``)."""
    from ultralytics.data.utils import img2label_paths

    labels = img2label_paths([str(p) for p in paths])
    for start in range(0, len(paths), batch_size):
        images, classes, boxes, index = [], [], [], []
        for path, label in zip(paths[start : start + batch_size], labels[start : start + batch_size], strict=True):
            try:
                chw, (h0, w0), ((rw, rh), (left, top)) = load_letterboxed(path, imgsz)
            except ValueError:  # unreadable: calibration skipped it too, with its warning
                continue
            i = len(images)
            cls, xywh = read_yolo_label(label, nc)
            xywh = xywh * np.array([w0 * rw, h0 * rh, w0 * rw, h0 * rh], dtype=np.float32)
            xywh[:, 0] += left
            xywh[:, 1] += top
            images.append(chw)
            classes.append(cls.astype(np.float32))
            boxes.append(xywh / imgsz)
            index.append(np.full(len(cls), i, dtype=np.float32))
        if not images:
            continue
        yield {
            "img": torch.from_numpy(np.stack(images)),
            "cls": torch.from_numpy(np.concatenate(classes))[:, None],
            "bboxes": torch.from_numpy(np.concatenate(boxes)),
            "batch_idx": torch.from_numpy(np.concatenate(index)),
        }


def fisher_scores(
    fused: nn.Module,
    qmodel: nn.Module,
    paths: Sequence[Path],
    *,
    imgsz: int,
    recipe: QuantRecipe,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, float]:
    """Each quantized conv's ``sum((dL/dY)^2 * (Yq - Y)^2)`` over ``paths`` (module docstring), ``qmodel`` being
    the fully INT8 model calibrated with ``recipe`` (its convs give ``Yq``); neither model is modified."""
    from ultralytics.cfg import get_cfg
    from ultralytics.utils import DEFAULT_CFG

    from qarep_det.quant.scope import quantized_conv_names

    names = quantized_conv_names(fused, recipe)
    model = out_of_place(copy.deepcopy(fused)).to(device).train()  # train mode: the head returns what the loss reads
    model.args = get_cfg(DEFAULT_CFG)  # the loss gains (box, cls, dfl) of Ultralytics' default recipe
    model.criterion = None
    qmodel = copy.deepcopy(qmodel).to(device).eval()
    convs = {n: model.get_submodule(n) for n in names}
    qconvs = {n: qmodel.get_submodule(n) for n in names}
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name: str):
        def hook(_: nn.Module, args: tuple, out: torch.Tensor) -> None:
            out.retain_grad()
            kept[name] = (args[0].detach(), out)

        return hook

    scores = dict.fromkeys(names, 0.0)
    handles = [conv.register_forward_hook(keep(n)) for n, conv in convs.items()]
    bar = tqdm(total=len(paths), desc="per-conv gradient sensitivity", unit="img", disable=not progress)
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        for batch in labelled_batches(paths, imgsz, batch_size, model.model[-1].nc):
            batch = {k: v.to(device) for k, v in batch.items()}
            model.zero_grad(set_to_none=True)
            loss, _ = model.loss(batch)
            loss.sum().backward()
            with torch.no_grad():
                for name, (x, y) in kept.items():
                    scores[name] += float((y.grad.square() * (qconvs[name](x) - y).square()).sum())
            kept.clear()
            bar.update(batch["img"].shape[0])
    finally:
        bar.close()
        for h in handles:
            h.remove()
    return scores


@dataclass(frozen=True)
class Sensitivity:
    """A fully INT8 model calibrated once and its convs ranked, most harmful first: what ``--keep-float`` and
    ``--max-drop`` choose from."""

    calibrated: nn.Module
    ranking: list[str]
    calibrate_s: float
    rank_s: float
    rank_by: str = DEFAULT_RANKING
    half_range: bool = False  # ranked on NNCF's half-range weights (``calibrated`` is always the reference grid)
    harm: Mapping[str, float] = field(default_factory=dict)  # each conv's figure in linear units (:func:`rank`)

    def keep(self, recipe: QuantRecipe, keep_float: int) -> QuantRecipe:
        """``recipe`` with the first ``keep_float`` convs of the ranking added to its float layers."""
        return replace(recipe, float_layers=recipe.float_layers + tuple(self.ranking[:keep_float]))

    def by_cost(self, costs: Mapping[str, float]) -> Sensitivity:
        """This ranking re-ordered by harm per cost (:func:`qarep_det.sensitivity.float_cost.by_cost`): what
        ``--float-cost latency`` keeps float first, with ``costs`` a conv's multiply-accumulates."""
        return replace(self, ranking=by_cost(self.ranking, self.harm, costs))


def rank(
    rank_by: str,
    fused: nn.Module,
    calibrated: nn.Module,
    images: Sequence[torch.Tensor],
    recipe: QuantRecipe,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, float]:
    """Each conv of ``fused``'s harm by ``rank_by``, on ``images`` (for ``fisher`` a :class:`CalibrationSet`: its
    paths give the labels), ``calibrated`` the fully INT8 model; most harmful first (the ranking is the keys' order),
    ties in model order. The harm is linear, so that ``--float-cost latency`` can divide it by a cost: ``isolated``,
    the relative detector-output noise power with only this conv INT8; ``revert``, the relative noise power its revert
    removes from the fully INT8 model's output; ``fisher``, its loss increase."""
    if check_ranking(rank_by) == "isolated":
        noise = isolated_noise(fused, calibrated, images, recipe=recipe, device=device, progress=progress)
        return {name: relative_detection_noise(*noise[name]) for name in rank_by_noise(noise)}
    if rank_by == "revert":  # the highest SQNR once restored is the largest gain; ties keep model order
        full = (NoisePower(), NoisePower())
        noise = revert_noise(fused, calibrated, images, recipe=recipe, device=device, progress=progress, full=full)
        before = relative_detection_noise(*full)
        ranking = sorted(noise, key=lambda name: -detection_noise(*noise[name]))
        return {name: before - relative_detection_noise(*noise[name]) for name in ranking}
    if not isinstance(images, CalibrationSet):
        raise TypeError("the gradient ranking reads labels: pass the calibration set itself")
    check_labelled(images.paths)
    scores = fisher_scores(
        fused,
        calibrated,
        images.paths,
        imgsz=images.imgsz,
        recipe=recipe,
        device=device,
        batch_size=images.batch_size,
        progress=progress,
    )
    return {name: scores[name] for name in sorted(scores, key=lambda name: -scores[name])}


def rank_sensitivity(
    fused: nn.Module,
    calib: Sequence[torch.Tensor],
    recipe: QuantRecipe,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    rank_images: int | None = None,
    rank_by: str = DEFAULT_RANKING,
    half_range: bool = False,
    calibrated: nn.Module | None = None,
) -> Sensitivity:
    """Calibrate ``fused`` on every image of ``calib`` (unless ``calibrated``, that model, is given), then rank its
    convs by ``rank_by`` on the first ``rank_images`` of them (default: all); with ``half_range`` on the weight grid
    of NNCF's overflow fix (:func:`~qarep_det.quant.backends.simulated.half_range_weights`, one bit coarser), which
    OpenVINO computes with on CPUs without VNNI: its errors, not the reference's, decide what to keep float there."""
    check_ranking(rank_by)
    start = time.perf_counter()
    calibrate_s = 0.0  # a calibrated model given: its calibration is counted where it was made
    if calibrated is None:
        calibrated = quantize_torch(fused, calib, recipe, device)
        calibrate_s = time.perf_counter() - start
    images = first_images(calib, rank_images)  # calibration saw all of them; the per-conv passes see these
    ranked = half_range_weights(calibrated) if half_range else calibrated
    harm = rank(rank_by, fused, ranked, images, recipe, device, progress)
    rank_s = time.perf_counter() - start - calibrate_s
    return Sensitivity(calibrated, list(harm), calibrate_s, rank_s, rank_by, half_range, harm)


def keep_most_sensitive(
    fused: nn.Module,
    calib: Sequence[torch.Tensor],
    recipe: QuantRecipe,
    *,
    keep_float: int,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> QuantRecipe:
    """``recipe`` with the ``keep_float`` most sensitive convs (:func:`rank_sensitivity` on all of ``calib``) added
    to its float layers; ``recipe`` itself for 0."""
    if not keep_float:
        return recipe
    return rank_sensitivity(fused, calib, recipe, device=device, progress=progress).keep(recipe, keep_float)
