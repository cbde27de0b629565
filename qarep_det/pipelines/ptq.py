"""FP32 versus INT8 on a val split: the library behind ``ptq_eval``.

Every checkpoint is loaded and fused once, then: its FP32 model is evaluated; with ``keep_float`` or ``max_drop`` its
convs are ranked (:func:`qarep_det.sensitivity.rankings.rank_sensitivity` by ``rank_by``, on the first
``rank_images`` of the calibration draw, on the weight grid each backend computes with: OpenVINO's is NNCF's half
range where its overflow fix is on), re-ordered by harm per multiply-accumulate with ``float_cost="latency"``
(:mod:`qarep_det.sensitivity.float_cost`); per backend, ``max_drop`` searches the fewest of that order kept
float (:mod:`qarep_det.sensitivity.max_drop`), the backend quantizes (:mod:`qarep_det.quant.backends`) and the INT8
model is evaluated the same way, giving one row per (model, backend). Every model is scored by the same prediction and
pycocotools code under one :class:`EvalProtocol`.

A QAT checkpoint (``qat``) is scored as ``method: qat``: its INT8 model is the fine-tuned student with its weights and
ranges; nothing is calibrated or ranked. Its FP32 model is the one qarep_det's fine-tuning started from; for a
checkpoint of Ultralytics' own ``quantize=8``, ``fp32_weights`` or, without them, unknown (its FP32 columns empty).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from qarep_det.checks import check_count, check_imgsz
from qarep_det.device import torch_device
from qarep_det.errors import InputError
from qarep_det.evaluation.coco import GroundTruth, load_ground_truth, per_image_map50_95
from qarep_det.evaluation.plots import plot_max_drop
from qarep_det.evaluation.predict import evaluate_runner
from qarep_det.evaluation.protocol import EvalProtocol
from qarep_det.evaluation.results import PTQRow, Ranking, Search
from qarep_det.evaluation.table import write_results
from qarep_det.quant.backends.base import BACKENDS, Job, Quantized
from qarep_det.quant.calibration import CalibrationSet, recipe_calibration
from qarep_det.quant.qat import ULTRALYTICS_QAT
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.runner import torch_runner
from qarep_det.quant.scope import check_partial
from qarep_det.sensitivity.float_cost import DEFAULT_FLOAT_COST, check_float_cost, conv_macs, float_cost_row
from qarep_det.sensitivity.max_drop import search_backend
from qarep_det.sensitivity.rankings import (
    DEFAULT_RANKING,
    Sensitivity,
    check_labelled,
    check_ranking,
    rank_sensitivity,
)
from qarep_det.sensitivity.tuning import TuningSet, tuning_set
from qarep_det.ultralytics.checkpoint import FusedCheckpoint, checkpoint_paths, load_fused

UNKNOWN_FP32: dict[str, Any] = {"map50_95": None, "map50": None, "runner_ms": None, "protocol": None}
"""The FP32 evaluation of a QAT checkpoint whose FP32 model nobody gave: its columns stay empty rather than guessed."""
RANK_IMAGES = 32  # ranking images by default (fewer if fewer are calibrated): docs/diagnose.md, "The ranking"
TUNE_IMAGES = 256


@dataclass(frozen=True)
class PTQSettings:
    """Everything a PTQ evaluation depends on besides the checkpoints; stored with the results. The data YAML is
    the one positional field."""

    data: Path
    _: KW_ONLY
    recipe: QuantRecipe = field(default_factory=QuantRecipe)
    backends: tuple[str, ...] = ("torch",)
    imgsz: int = 640
    batch: int = 8
    device: str = "cpu"
    instances_json: Path | None = None
    save_int8: bool = True  # write the INT8 artefacts (QDQ ONNX, OpenVINO IR) into the output folder
    overwrite: bool = False  # replace artefacts left in the output folder by an earlier run
    keep_float: int = 0  # keep the K most sensitive convs float (checked per model: quant.scope.check_partial)
    max_drop: float | None = None  # keep the fewest of the ranking float for a tuning drop <= this (mAP50-95 points)
    tune_images: int = TUNE_IMAGES  # the tuning set of max_drop (see eval/tuning.py)
    tune_split: str = "train"
    refine: int = 0  # max_drop: re-rank the first R convs of the ranking by their tuning mAP, each reverted alone
    rank_images: int | None = None  # images of the calibration draw the ranking runs on (None: RANK_IMAGES or all)
    rank_by: str = DEFAULT_RANKING  # how the convs are ranked (sensitivity/rankings.py)
    float_cost: str = DEFAULT_FLOAT_COST  # what a float conv costs: its MACs (latency) or 1 (count): float_cost.py
    fp32_weights: Path | None = None  # the FP32 model of a QAT checkpoint that does not carry one (Ultralytics')
    overflow_fix: bool | None = None  # OpenVINO: NNCF's overflow fix (7-bit weights); None: on if this CPU lacks VNNI
    asymmetric_activations: bool = False  # OpenVINO: NNCF's preset MIXED grid, not TensorRT's signed one

    def __post_init__(self) -> None:
        if sum(map(bool, (self.keep_float, self.recipe.float_layers, self.max_drop is not None))) > 1:
            raise InputError("keep K convs float, name them, or give a largest drop: one of the three")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise InputError(f"max_drop must be >= 0 mAP50-95 points, got {self.max_drop}")
        if check_count("refine", self.refine, 0) and self.max_drop is None:
            raise InputError("refine re-ranks the candidates of max_drop's search: give max_drop too")
        check_count("tune_images", self.tune_images)
        check_ranking(self.rank_by)
        check_float_cost(self.float_cost)
        if self.rank_images is not None and check_count("rank_images", self.rank_images) > self.recipe.calib_images:
            raise InputError(
                f"rank_images ({self.rank_images}) cannot exceed calib_images ({self.recipe.calib_images}): the "
                "ranked images are the first of the calibration draw"
            )
        if unknown := [b for b in self.backends if b not in BACKENDS]:
            raise InputError(f"unknown backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
        if self.overflow_fix is not None and not {"openvino", "onnxruntime-int8"} & set(self.backends):
            raise InputError(
                "the overflow fix is NNCF's, for the openvino backend (onnxruntime-int8: its 7-bit reduce_range "
                "weights): add one of them to the backends"
            )
        if self.asymmetric_activations and "openvino" not in self.backends:
            raise InputError(
                "asymmetric activations are NNCF's grid, for the openvino backend (onnxruntime-int8's are "
                "asymmetric already): add openvino to the backends"
            )
        for backend in self.backends:
            BACKENDS[backend].check_recipe(self.recipe)
        check_imgsz(self.imgsz)
        check_count("batch", self.batch)
        torch_device(self.device)  # fails now, in one line, rather than at the first .to(device)

    @property
    def protocol(self) -> EvalProtocol:
        return EvalProtocol(imgsz=self.imgsz)

    @property
    def ranked_images(self) -> int:
        return self.rank_images or min(RANK_IMAGES, self.recipe.calib_images)

    @property
    def ranks(self) -> bool:
        """Whether this evaluation needs the sensitivity ranking."""
        return bool(self.keep_float) or self.max_drop is not None


def _rank(
    checkpoint: FusedCheckpoint, settings: PTQSettings, calib: CalibrationSet, progress: bool
) -> dict[str, Sensitivity]:
    """The rank step, per backend: the simulated model calibrated once on every calibration image, ranked on the
    first M on each weight grid the backends compute with (OpenVINO with the overflow fix: NNCF's half range)."""
    grids = {backend: BACKENDS[backend].half_range(settings.overflow_fix) for backend in settings.backends}
    by_grid: dict[bool, Sensitivity] = {}
    for half_range in dict.fromkeys(grids.values()):
        by_grid[half_range] = rank_sensitivity(
            checkpoint.fused,
            calib,
            settings.recipe,
            device=settings.device,
            progress=progress,
            rank_images=settings.ranked_images,
            rank_by=settings.rank_by,
            half_range=half_range,
            calibrated=next(iter(by_grid.values())).calibrated if by_grid else None,
        )
    return {backend: by_grid[half_range] for backend, half_range in grids.items()}


@dataclass(frozen=True)
class FP32Tuning:
    """The FP32 model on the tuning set, once per checkpoint: its mAP50-95, each image's AP50-95 (the search's
    standard error pairs them with K = 0's), and the seconds it took (counted in every backend's search)."""

    map50_95: float
    per_image: list[float]
    seconds: float


def _search(
    job: Job,
    *,
    backend: str,
    sensitivity: Sensitivity,
    tuning: TuningSet,
    fp32_tune: FP32Tuning,
    settings: PTQSettings,
    scratch: Path,
    progress: bool,
    macs: dict[str, int],
) -> tuple[Job, Search]:
    """The search step: the fewest convs of the ranking kept float for ``max_drop`` on ``backend`` (its first
    ``refine`` re-ranked), scored on the tuning set, each step with the MACs it keeps float; the row's job (its
    artefacts named per backend) and the row's search fields."""
    name, start = job.stem.name, time.perf_counter()

    def kept(names: tuple[str, ...]) -> QuantRecipe:
        return replace(job.recipe, float_layers=job.recipe.float_layers + names)

    search = search_backend(
        lambda names: BACKENDS[backend].candidate(job.with_recipe(kept(names)), scratch),
        ranking=sensitivity.ranking,
        tuning=tuning,
        fp32_tune_map=fp32_tune.map50_95,
        fp32_per_image=fp32_tune.per_image,
        max_drop=settings.max_drop,
        scratch=scratch,
        label=f"{name} on {backend}",
        protocol=settings.protocol,
        batch=settings.batch,
        progress=progress,
        refine=settings.refine,
        costs=macs,
    )
    seconds = time.perf_counter() - start + fp32_tune.seconds
    row = search.row(tune_images=tuning.images, tune_split=tuning.split, search_s=seconds)
    return job.with_recipe(kept(search.float_layers), job.stem.with_name(f"{name}_{backend}")), row


@dataclass(frozen=True)
class Choice:
    """How a backend's float convs were chosen: the ranking (``keep_float`` or ``max_drop``) and ``max_drop``'s
    search, each None where not run; the fields a row carries of it."""

    rank: Ranking | None = None
    search: Search | None = None


def _row(
    checkpoint: FusedCheckpoint,
    *,
    backend: str,
    job: Job,
    choice: Choice,
    quantized: Quantized,
    fp32: dict[str, Any],
    int8: dict[str, Any],
    backend_fp32: dict[str, Any] | None,
    quantize_s: float,
) -> PTQRow:
    """The row step: one results.json row from the FP32 and INT8 evaluations of ``job``'s model on ``backend``
    (``backend_fp32``: the backend's own FP32 model's, where it runs one)."""
    student, calib = checkpoint.student, job.calib
    if student is None:  # the images the calibration could read, known once it ran
        method, ranges = "ptq", "calibrated"
        calib_images = len(calib.paths) if calib.readable is None else calib.readable
    elif checkpoint.ours:
        method, ranges, calib_images = "qat", student.qat_ranges, job.recipe.calib_images  # the QAT run's
    else:
        method, ranges, calib_images = "qat (ultralytics)", ULTRALYTICS_QAT["ranges"], None  # 8 of its batches
    return PTQRow(
        model=checkpoint.name,
        params=sum(p.numel() for p in (student if checkpoint.fused is None else checkpoint.fused).parameters()),
        backend=backend,
        calib_method=job.recipe.calib_method,
        method=method,
        ranges=ranges,
        calib_images=calib_images,
        fp32_map50_95=fp32["map50_95"],
        int8_map50_95=int8["map50_95"],
        drop=None if fp32["map50_95"] is None else fp32["map50_95"] - int8["map50_95"],
        fp32_map50=fp32["map50"],
        int8_map50=int8["map50"],
        fp32_ms=fp32["runner_ms"] if backend_fp32 is None else backend_fp32["runner_ms"],
        int8_ms=int8["runner_ms"],
        quantize_head=job.recipe.quantize_head,
        float_layers=job.recipe.float_layers,
        quantize_s=quantize_s,
        weights=str(checkpoint.path),
        protocol=int8["protocol"],
        rank=choice.rank,
        search=choice.search,
        int8_file=None if quantized.int8_file is None else str(quantized.int8_file),
        fp32_file=None if quantized.fp32_file is None else str(quantized.fp32_file),
        fp32_mb=quantized.fp32_mb,
        int8_mb=quantized.int8_mb,
        integer_convs=quantized.integer_convs,
        fp32_backend_map50_95=None if backend_fp32 is None else backend_fp32["map50_95"],
    )


def backend_jobs(
    checkpoint: FusedCheckpoint,
    settings: PTQSettings,
    calib: CalibrationSet,
    *,
    stem: Path,
    scratch: Path,
    progress: bool = True,
    tuning: TuningSet | None = None,
) -> Iterator[tuple[str, Job, Choice]]:
    """Per backend of ``settings``, the job its INT8 model is made from and how it was chosen: the rank step (once
    per checkpoint), then K kept float or the search step. ``ptq_eval`` quantizes and scores each job; ``export
    --int8`` writes the artefact of the same job, so the file it writes is the model ptq_eval scores. Artefacts are
    named from ``stem``; the search's files go to ``scratch``."""
    fused, student = checkpoint.fused, checkpoint.student
    sensitivities: dict[str, Sensitivity] = {}
    if checkpoint.ours:
        recipe = QuantRecipe(**student.qat_recipe)
    elif student is not None:
        recipe = QuantRecipe(calib_method=ULTRALYTICS_QAT["calib_method"])
    else:
        recipe = settings.recipe
        if settings.ranks:
            sensitivities = _rank(checkpoint, settings, calib, progress)
    macs = conv_macs(fused, settings.imgsz, next(iter(sensitivities.values())).ranking) if sensitivities else {}
    job = Job(
        fused=None if fused is None else fused.cpu(),
        calib=calib,
        recipe=recipe,
        imgsz=settings.imgsz,
        device=settings.device,
        stem=stem,
        save=settings.save_int8,
        overwrite=settings.overwrite,
        student=student,
        calibrated=next(iter(sensitivities.values())).calibrated if sensitivities else None,  # one for every grid
        overflow_fix=settings.overflow_fix,
        asymmetric_activations=settings.asymmetric_activations,
    )
    if tuning is not None:
        start = time.perf_counter()
        fp32_tune = FP32Tuning(
            map50_95=evaluate_runner(
                torch_runner(fused, settings.device),
                tuning.ground_truth,
                scratch / "fp32.json",
                protocol=settings.protocol,
                batch=settings.batch,
                progress=progress,
            )["map50_95"],
            per_image=per_image_map50_95(tuning.ground_truth, scratch / "fp32.json"),
            seconds=time.perf_counter() - start,
        )
    for backend in settings.backends:
        chosen, choice, sensitivity = job, Choice(), sensitivities.get(backend)
        if sensitivity is not None:
            if settings.float_cost == "latency":
                sensitivity = sensitivity.by_cost(macs)
            chosen = job.with_recipe(sensitivity.keep(recipe, settings.keep_float))  # K kept float (0 to search)
        if tuning is not None:
            chosen, searched = _search(
                chosen,
                backend=backend,
                sensitivity=sensitivity,
                tuning=tuning,
                fp32_tune=fp32_tune,
                settings=settings,
                scratch=scratch,
                progress=progress,
                macs=macs,
            )
            choice = replace(choice, search=searched)
        if sensitivity is not None:  # with what the convs kept float cost, known once the search chose them
            ranked = Ranking(
                calibrate_s=sensitivity.calibrate_s,
                rank_images=settings.ranked_images,
                rank_by=sensitivity.rank_by,
                rank_s=sensitivity.rank_s,
                rank_half_range=sensitivity.half_range,
                **float_cost_row(macs, chosen.recipe.float_layers, settings.float_cost),
            )
            choice = replace(choice, rank=ranked)
        yield backend, chosen, choice


def evaluate_checkpoint(
    checkpoint: FusedCheckpoint,
    settings: PTQSettings,
    *,
    out_dir: Path,
    ground_truth: GroundTruth,
    calib: CalibrationSet,
    progress: bool = True,
    tuning: TuningSet | None = None,
) -> list[PTQRow]:
    """Rows for one checkpoint: FP32 once, then INT8 for each backend (on the CPU but for the torch backend)."""
    name, fused = checkpoint.name, checkpoint.fused
    score = partial(evaluate_runner, protocol=settings.protocol, batch=settings.batch, progress=progress)
    fp32 = UNKNOWN_FP32
    if fused is not None:
        fp32 = score(torch_runner(fused, settings.device), ground_truth, out_dir / f"{name}_fp32.json")
    rows = []
    with tempfile.TemporaryDirectory(prefix="qarep_ptq_") as scratch:  # runtimes have loaded their files by its end
        stem = (out_dir if settings.save_int8 else Path(scratch)) / name
        jobs = backend_jobs(
            checkpoint, settings, calib, stem=stem, scratch=Path(scratch), progress=progress, tuning=tuning
        )
        for backend, chosen, choice in jobs:
            start = time.perf_counter()
            quantized = BACKENDS[backend].quantize(chosen)
            quantize_s = time.perf_counter() - start  # calibration (unless ranked), quantizing, files
            int8 = score(quantized.runner, ground_truth, out_dir / f"{name}_int8_{backend}.json")
            backend_fp32 = None
            if quantized.fp32_runner is not None:  # the backend's own FP32 model: like-for-like latency
                backend_fp32 = score(quantized.fp32_runner, ground_truth, out_dir / f"{name}_fp32_{backend}.json")
            rows.append(
                _row(
                    checkpoint,
                    backend=backend,
                    job=chosen,
                    choice=choice,
                    quantized=quantized,
                    fp32=fp32,
                    int8=int8,
                    backend_fp32=backend_fp32,
                    quantize_s=quantize_s,
                )
            )
    return rows


def load_checked(path: Path, settings: PTQSettings) -> FusedCheckpoint:
    """One checkpoint loaded and fused, refused if the settings' float convs cannot apply to it."""
    checkpoint = load_fused(path, settings.fp32_weights)
    if checkpoint.student is not None and (no_qat := [b for b in settings.backends if not BACKENDS[b].runs_qat]):
        raise ValueError(
            f"'{path}' is a QAT checkpoint: the {no_qat[0]} backend calibrates its own ranges on an FP32 "
            "model; score it on torch, onnxruntime or openvino"
        )
    if checkpoint.student is not None and settings.overflow_fix and "openvino" in settings.backends:
        raise InputError(
            f"'{path}' is a QAT checkpoint: OpenVINO runs its learned 8-bit weights as they are, and "
            "NNCF's overflow fix needs a calibration; leave --overflow-fix at auto or off"
        )
    if checkpoint.student is not None and settings.asymmetric_activations and "openvino" in settings.backends:
        raise InputError(
            f"'{path}' is a QAT checkpoint: OpenVINO runs the ranges it learned on the signed grid; leave "
            "--openvino-activations at signed"
        )
    if settings.ranks or settings.recipe.float_layers:
        if checkpoint.student is not None:
            raise InputError(f"'{path}' is a QAT checkpoint: its float convs were fixed when it was trained")
        check_partial(checkpoint.fused, settings.recipe, settings.keep_float)
    return checkpoint


def calibration_and_tuning(
    settings: PTQSettings, scored: Sequence[Path], progress: bool = True
) -> tuple[CalibrationSet, TuningSet | None]:
    """The calibration draw from the train split and, with ``max_drop``, the tuning set (never a calibration image
    nor one of the ``scored`` images); one clear error for no train images or no labelled image to rank by."""
    recipe = settings.recipe
    calib = recipe_calibration(settings.data, settings.imgsz, recipe, batch_size=settings.batch, progress=progress)
    if settings.ranks and settings.rank_by == "fisher":
        check_labelled(calib.paths[: settings.ranked_images])
    tuning = None
    if settings.max_drop is not None:
        tuning = tuning_set(
            settings.data,
            settings.tune_images,
            seed=recipe.seed,
            calibration=calib.paths,
            scored=scored,
            split=settings.tune_split,
        )
    return calib, tuning


def run_ptq_eval(
    weights: Sequence[str | os.PathLike], settings: PTQSettings, out_dir: str | os.PathLike, progress: bool = True
) -> tuple[list[PTQRow], Path, Path]:
    """Evaluate every checkpoint at FP32 and INT8; writes ``results.json`` and ``results.md`` into ``out_dir``, and
    with ``max_drop`` the trade-off plot ``max_drop.png``.

    Inputs are checked before any model runs and before ``out_dir`` is made: missing weights, the val split and its
    ground truth, unreadable checkpoints, unknown float layers or too large a ``keep_float``, no train images for
    calibration (or tuning) fail with one clear error. Returns the rows and the two result paths.
    """
    paths = checkpoint_paths(weights)
    if settings.fp32_weights is not None:
        checkpoint_paths([settings.fp32_weights])  # missing: one line now, not after the ground truth
    ground_truth = load_ground_truth(settings.data, instances_json=settings.instances_json)
    checkpoints = [load_checked(path, settings) for path in paths]
    calib, tuning = calibration_and_tuning(settings, ground_truth.image_files, progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        row
        for checkpoint in checkpoints
        for row in evaluate_checkpoint(
            checkpoint, settings, out_dir=out, ground_truth=ground_truth, calib=calib, progress=progress, tuning=tuning
        )
    ]
    json_path, md_path = write_results(rows, out, settings.protocol)
    if tuning is not None:
        plot_max_drop(rows, out / "max_drop.png")
    return rows, json_path, md_path
