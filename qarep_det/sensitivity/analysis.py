"""Where the INT8 error of a detector comes from, conv by conv: the analysis behind ``tools/diagnose.py`` and
``ptq_eval --keep-float``, so the ranking a report shows is the one that decides what stays float.

The recipe is exactly ptq_eval's: :func:`quantize_torch` on the same calibration set, the convs of
:mod:`qarep_det.quant.scope`. For every quantized conv of the fused model, in module order:

- ``weight_sqnr_db`` / ``weight_max_to_median``: its fused kernel under per-channel INT8 (see ``diagnostics``);
- ``act_amax``: the calibrated input range; ``act_sqnr_db``: its FP32 input against that input fake-quantized by
  its own input quantizer;
- isolated: the detector's output SQNR when only this conv's two quantizers are on, for the boxes and the scores,
  and one ranking figure ``isolated_sqnr_db = -10 log10((Nb / Sb + Ns / Ss) / 2)``: the mean of the two relative
  noise powers, so neither pixel-scale boxes nor 0-1 scores dominate it;
- cumulative: the conv's input and output in the fully INT8 model against FP32 (``cumulative_input_sqnr_db``,
  ``cumulative_sqnr_db``), and ``cumulative_added_sqnr_db``: the noise the conv itself adds there, its INT8 output
  against its float output on the same (already noisy) input. Not the dB drop from input to output: the first conv's
  exact input makes that infinite, and downstream of a broken conv every conv that amplifies the noise it is handed
  would look guilty.

Every SQNR sums signal and noise over all images before dividing. ``ranking`` orders convs by the isolated figure,
``cumulative_ranking`` by the added noise, most harmful first.

Speed: batches outside, convs inside. Per batch one FP32 pass keeps every node's output (:class:`RestartableForward`),
one fully INT8 pass gives the cumulative figures, and each conv's isolated pass recomputes only what lies downstream of
it, with that conv's quantizers toggled on in one quantized copy (never re-quantized): far fewer full passes than one
per conv (docs/diagnose.md, Speed). The ranking alone (:func:`rank_by_noise` of :func:`isolated_noise`, one of the
rankings ``--keep-float`` and ``--max-drop`` choose from, :mod:`qarep_det.sensitivity.rankings`) skips the cumulative
figures and takes a model already calibrated.

Its forward restarts on Ultralytics' graph through the adapter (:mod:`qarep_det.ultralytics.restartable`); QAT's
``--keep-float`` ranks with it too. BN scales, the paper's mechanism,
are read in the training form by :func:`qarep_det.sensitivity.diagnostics.bn_scales`.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm import tqdm

from qarep_det.nn import Reparameterizable
from qarep_det.quant.backends.simulated import quantize_torch
from qarep_det.quant.calibration import CalibrationSet, first_images
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.runner import first_output
from qarep_det.quant.scope import quantized_conv_names
from qarep_det.sensitivity.diagnostics import NoisePower, db, max_to_median, weight_sqnr_db
from qarep_det.ultralytics.restartable import ForwardCache, RestartableForward

FAST_LAYOUT = torch.channels_last  # faster than NCHW on the CPUs measured (docs/diagnose.md, Speed)


@dataclass(frozen=True)
class LayerAnalysis:
    """Everything measured for one quantized conv (SQNRs in dB; inf = no error)."""

    name: str
    block: str
    block_type: str
    weight_sqnr_db: float
    weight_max_to_median: float
    act_amax: float
    act_sqnr_db: float
    isolated_sqnr_db: float
    isolated_boxes_sqnr_db: float
    isolated_scores_sqnr_db: float
    cumulative_input_sqnr_db: float
    cumulative_sqnr_db: float
    cumulative_added_sqnr_db: float


@dataclass(frozen=True)
class ModelAnalysis:
    """The per-conv table of one model, its two rankings and the fully INT8 model's output SQNR."""

    layers: list[LayerAnalysis]
    ranking: list[str]
    cumulative_ranking: list[str]
    int8_output_sqnr_db: dict[str, float]
    images: int
    calibrate_s: float
    analyze_s: float


@dataclass
class _Errors:
    """Accumulators for one conv."""

    act: NoisePower = field(default_factory=NoisePower)
    boxes: NoisePower = field(default_factory=NoisePower)
    scores: NoisePower = field(default_factory=NoisePower)
    cum_in: NoisePower = field(default_factory=NoisePower)
    cum_out: NoisePower = field(default_factory=NoisePower)
    added: NoisePower = field(default_factory=NoisePower)


def relative_detection_noise(boxes: NoisePower, scores: NoisePower) -> float:
    """The mean of the box and score rows' relative noise powers: :func:`detection_noise` in linear units."""
    return (boxes.relative + scores.relative) / 2


def detection_noise(boxes: NoisePower, scores: NoisePower) -> float:
    """The ranking figure from box and score noise: SQNR of the mean of their relative noise powers."""
    return db(relative_detection_noise(boxes, scores))


def add_detection(boxes: NoisePower, scores: NoisePower, reference: torch.Tensor, test: torch.Tensor) -> None:
    """Accumulate the box (first 4 rows) and score rows of ``(B, 4 + nc, A)`` predictions separately."""
    boxes.add(reference[:, :4], test[:, :4])
    scores.add(reference[:, 4:], test[:, 4:])


def enclosing_block(model: nn.Module, conv_name: str) -> tuple[str, str]:
    """Name and class of the block a conv came from: the nearest Rep block / ConvBNReLU (qarep_det.nn) or
    Ultralytics ``Conv``, else the conv itself (e.g. the head's last 1x1 convs)."""
    from ultralytics.nn.modules import Conv

    parts = conv_name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:i])
        module = model.get_submodule(name)
        if isinstance(module, (Reparameterizable, Conv)):
            return name, type(module).__name__
    return conv_name, type(model.get_submodule(conv_name)).__name__


@contextlib.contextmanager
def _recording(convs: dict[str, nn.Module], inputs: dict, outputs: dict) -> Iterator[None]:
    """Keep each conv's input and output of the forward passes run inside."""
    handles = []
    for name, conv in convs.items():
        handles.append(conv.register_forward_pre_hook(lambda _, args, n=name: inputs.__setitem__(n, args[0])))
        handles.append(conv.register_forward_hook(lambda _, __, out, n=name: outputs.__setitem__(n, out)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _comparing(
    qconvs: dict[str, nn.Module], convs: dict[str, nn.Module], inputs: dict, outputs: dict, errors: dict
) -> Iterator[None]:
    """Accumulate each quantized conv's input (before its quantizer) and output against the FP32 model's, and its
    output against its float twin ``convs[name]`` run on the same input (the noise it adds itself)."""

    def after(name: str, e: _Errors):
        def hook(_: nn.Module, args: tuple, out: torch.Tensor) -> None:
            e.cum_out.add(outputs[name], out)
            e.added.add(convs[name](args[0]), out)

        return hook

    handles = []
    for name, conv in qconvs.items():
        e = errors[name]
        handles.append(conv.register_forward_pre_hook(lambda _, args, n=name, e=e: e.cum_in.add(inputs[n], args[0])))
        handles.append(conv.register_forward_hook(after(name, e)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def out_of_place(model: nn.Module) -> nn.Module:
    """Turn in-place activations off (Ultralytics' checkpoint loader turns them on): an in-place ReLU would
    overwrite the conv output a hook just kept."""
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return model


def set_quantizers(conv: nn.Module, on: bool) -> None:
    for quantizer in (conv.input_quantizer, conv.weight_quantizer):
        quantizer.enable() if on else quantizer.disable()


def _isolated(
    graph: RestartableForward, cache: ForwardCache, qmodel: nn.Module, qconvs: dict, errors: dict, bar: tqdm
) -> None:
    """One batch of isolated passes: each conv's quantizers on alone, the forward restarted from its node. The conv
    then sees its exact FP32 input, so its input quantizer's own input and output also give ``act_sqnr_db``."""
    try:
        for conv in qconvs.values():
            set_quantizers(conv, False)
        for name, conv in qconvs.items():
            e = errors[name]
            set_quantizers(conv, True)
            handle = conv.input_quantizer.register_forward_hook(lambda _, args, out, e=e: e.act.add(args[0], out))
            try:
                add_detection(e.boxes, e.scores, cache.output, graph.restart(cache, name, qmodel))
            finally:
                handle.remove()
            set_quantizers(conv, False)
            bar.update()
    finally:
        for conv in qconvs.values():
            set_quantizers(conv, True)


@dataclass
class ConvWalk:
    """What both the full analysis and the ranking alone set up: the FP32 copy in the fast layout, its restartable
    graph, the convs by name in it and in the quantized model, and one accumulator per conv."""

    graph: RestartableForward
    convs: dict[str, nn.Module]
    qconvs: dict[str, nn.Module]
    errors: dict[str, _Errors]

    @classmethod
    def of(cls, fused: nn.Module, qmodel: nn.Module, names: Sequence[str], device: str | torch.device) -> ConvWalk:
        fused = out_of_place(copy.deepcopy(fused).to(device, memory_format=FAST_LAYOUT).eval())
        return cls(
            RestartableForward(fused),
            {n: fused.get_submodule(n) for n in names},
            {n: qmodel.get_submodule(n) for n in names},
            {n: _Errors() for n in names},
        )

    def batches(
        self, images: Sequence[torch.Tensor], device: str | torch.device, progress: bool
    ) -> Iterator[tuple[torch.Tensor, tqdm]]:
        """The images as fast-layout batches, with the conv-pass progress bar; raises if there were none."""
        bar = tqdm(
            total=len(images) * len(self.convs), desc="per-conv INT8 sensitivity", unit="conv", disable=not progress
        )
        if isinstance(images, CalibrationSet):  # its own bar would say "calibrating"; ours counts the analysis
            images = replace(images, progress=False)
        seen = 0
        with torch.no_grad(), bar:
            for batch in images:
                seen += batch.shape[0]
                yield batch.to(device, torch.float32).contiguous(memory_format=FAST_LAYOUT), bar
        if seen == 0:
            raise ValueError("the analysis saw no images: pass a re-iterable calibration set (it is walked twice)")

    def ranking(self) -> list[str]:
        return rank_by_noise({name: (e.boxes, e.scores) for name, e in self.errors.items()})


def analyze(
    fused: nn.Module,
    calib: Sequence[torch.Tensor],
    recipe: QuantRecipe | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    rank_images: int | None = None,
) -> ModelAnalysis:
    """Per-conv INT8 error analysis of a fused detector on the calibration batches (see the module docstring).

    ``calib`` must be re-iterable (a ``CalibrationSet`` or a list): it calibrates first, then its first
    ``rank_images`` images (default: all) are walked once more. ``fused`` itself is not modified.
    """
    recipe = recipe or QuantRecipe()
    start = time.perf_counter()
    names = quantized_conv_names(fused, recipe)
    qmodel = out_of_place(quantize_torch(fused, calib, recipe, device).to(memory_format=FAST_LAYOUT))
    calibrate_s = time.perf_counter() - start
    walk = ConvWalk.of(fused, qmodel, names, device)
    convs, qconvs, errors = walk.convs, walk.qconvs, walk.errors
    out_boxes, out_scores = NoisePower(), NoisePower()
    images = 0
    for x, bar in walk.batches(first_images(calib, rank_images), device, progress):
        images += x.shape[0]
        inputs, outputs = {}, {}
        with _recording(convs, inputs, outputs):
            cache = walk.graph.forward(x)
        with _comparing(qconvs, convs, inputs, outputs, errors):
            add_detection(out_boxes, out_scores, cache.output, first_output(qmodel(x)))
        del outputs
        _isolated(walk.graph, cache, qmodel, qconvs, errors, bar)
    layers = [_layer(walk.graph.model, n, qconvs[n], errors[n]) for n in names]
    return ModelAnalysis(
        layers=layers,
        ranking=walk.ranking(),
        cumulative_ranking=[r.name for r in sorted(layers, key=lambda r: r.cumulative_added_sqnr_db)],
        int8_output_sqnr_db={
            "boxes": out_boxes.sqnr_db,
            "scores": out_scores.sqnr_db,
            "combined": detection_noise(out_boxes, out_scores),
        },
        images=images,
        calibrate_s=calibrate_s,
        analyze_s=time.perf_counter() - start - calibrate_s,
    )


def isolated_noise(
    fused: nn.Module,
    qmodel: nn.Module,
    images: Sequence[torch.Tensor],
    *,
    recipe: QuantRecipe,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, tuple[NoisePower, NoisePower]]:
    """Each quantized conv's isolated box and score noise over ``images`` (the figures :func:`analyze` ranks by,
    computed by the same passes, bit for bit, without the cumulative ones), with ``qmodel`` the fully INT8 model
    ``quantize_torch(fused, ..., recipe)`` already calibrated (e.g. the one ptq_eval's torch backend uses)."""
    names = quantized_conv_names(fused, recipe)
    qmodel = out_of_place(copy.deepcopy(qmodel).to(device, memory_format=FAST_LAYOUT))  # the caller's stays as is
    walk = ConvWalk.of(fused, qmodel, names, device)
    for x, bar in walk.batches(images, device, progress):
        _isolated(walk.graph, walk.graph.forward(x), qmodel, walk.qconvs, walk.errors, bar)
    return {name: (e.boxes, e.scores) for name, e in walk.errors.items()}


def rank_by_noise(noise: dict[str, tuple[NoisePower, NoisePower]]) -> list[str]:
    """Most harmful alone first: the isolated figure (:func:`detection_noise`), ascending; ties keep model order."""
    return sorted(noise, key=lambda name: detection_noise(*noise[name]))


def _layer(fused: nn.Module, name: str, qconv: nn.Module, e: _Errors) -> LayerAnalysis:
    """One row of the table from a conv's weights, calibrated range and accumulated errors."""
    weight = fused.get_submodule(name).weight
    block, block_type = enclosing_block(fused, name)
    return LayerAnalysis(
        name=name,
        block=block,
        block_type=block_type,
        weight_sqnr_db=weight_sqnr_db(weight),
        weight_max_to_median=max_to_median(weight)[0],
        act_amax=float(qconv.input_quantizer.amax),
        act_sqnr_db=e.act.sqnr_db,
        isolated_sqnr_db=detection_noise(e.boxes, e.scores),
        isolated_boxes_sqnr_db=e.boxes.sqnr_db,
        isolated_scores_sqnr_db=e.scores.sqnr_db,
        cumulative_input_sqnr_db=e.cum_in.sqnr_db,
        cumulative_sqnr_db=e.cum_out.sqnr_db,
        cumulative_added_sqnr_db=e.added.sqnr_db,
    )
