"""The ground truth a sensitivity ranking is judged against: the tuning mAP each quantized conv wins back when it
alone is reverted to float, everything else INT8 (a leave-one-out sweep), on one backend's own INT8 model.

This is what NNCF's accuracy control measures to rank its quantizer groups (the real metric with one group reverted;
``nncf/quantization/algorithms/accuracy_control/ranker.py``), here for every conv on the whole tuning set: one tuning
evaluation per conv, too slow for ``ptq_eval`` but the reference a cheap ranking has to agree with
(:func:`agreement`).
"""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from scipy.stats import kendalltau
from tqdm import tqdm

from qarep_det.evaluation.coco import evaluate_coco
from qarep_det.evaluation.predict import evaluate_runner
from qarep_det.evaluation.protocol import EvalProtocol
from qarep_det.quant.backends.base import BACKENDS, Job
from qarep_det.sensitivity.analysis import enclosing_block
from qarep_det.sensitivity.tuning import TuningSet


@dataclass(frozen=True)
class Reverted:
    """One conv reverted alone: its block, the tuning mAP50-95, the gain over the fully INT8 model (points), and
    the gain on each half of the tuning images (even and odd places), scored from the same detections."""

    name: str
    block: str
    tune_map50_95: float
    gain: float
    half_gains: tuple[float, float]


@dataclass(frozen=True)
class LeaveOneOut:
    """A sweep on one backend: the fully INT8 model's tuning mAP50-95, one row per conv in model order, and what it
    cost (seconds, tuning evaluations = convs + 1). The FP32 tuning mAP, when given, only puts the gains in scale."""

    backend: str
    tune_images: int
    int8_tune_map50_95: float
    rows: tuple[Reverted, ...]
    seconds: float
    fp32_tune_map50_95: float | None = None

    @property
    def evaluations(self) -> int:
        return 1 + len(self.rows)

    def ranking(self, half: int | None = None) -> list[str]:
        """Conv names by gain (on one half of the tuning images if ``half`` is 0 or 1), largest first; equal gains
        in model order."""
        gains = [row.gain if half is None else row.half_gains[half] for row in self.rows]
        order = sorted(range(len(self.rows)), key=lambda i: (-gains[i], i))
        return [self.rows[i].name for i in order]

    def split_half(self) -> dict[str, Any]:
        """The sweep's agreement with itself: its ranking on one half of the tuning images against its ranking on
        the other (:func:`agreement`). No cheap ranking can be expected to agree with the sweep better than the
        sweep agrees with itself (at half the images, so a little worse than on all: a ceiling, not the bound)."""
        return agreement(self.ranking(0), self.ranking(1), same_top=(1,))

    def as_dict(self) -> dict[str, Any]:
        """The sweep as JSON-ready data (what :func:`qarep_det.evaluation.plots.plot_leave_one_out` reads)."""
        return {
            **asdict(self),
            "rows": [asdict(row) for row in self.rows],
            "evaluations": self.evaluations,
            "split_half": self.split_half(),
        }


def leave_one_out(
    job: Job,
    backend: str,
    names: Sequence[str],
    tuning: TuningSet,
    protocol: EvalProtocol,
    scratch: Path,
    batch: int = 8,
    progress: bool = True,
    fp32_tune_map: float | None = None,
) -> LeaveOneOut:
    """The tuning mAP50-95 of ``job``'s INT8 model on ``backend`` (its recipe's float layers float, every other conv
    INT8), then of that model with each of ``names`` reverted to float alone, each scored on ``tuning`` with
    ``protocol``; a progress bar over the convs. Give ``job`` its calibrated simulated model, else the torch and
    onnxruntime candidates calibrate once per conv."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if job.fused is None or job.student is not None:
        raise ValueError("leave-one-out reverts convs of a calibrated FP32 model; a QAT student has none")
    if dupes := sorted(n for n, count in Counter(names).items() if count > 1):
        raise ValueError(f"convs named twice: {', '.join(dupes)}")
    if already := [n for n in names if n in job.recipe.float_layers]:
        raise ValueError(f"already float in the recipe, nothing to revert: {', '.join(already)}")
    start = time.perf_counter()
    ids = tuning.ground_truth.image_ids
    halves = (ids[0::2], ids[1::2])

    def tune_map(candidate: Job) -> tuple[float, float, float]:
        """The tuning mAP50-95 on every image, then on each half (pycocotools on the same detections)."""
        runner = BACKENDS[backend].candidate(candidate, scratch)
        found = scratch / "loo.json"
        scored = evaluate_runner(runner, tuning.ground_truth, found, protocol=protocol, batch=batch, progress=False)
        whole = scored["map50_95"]
        detections = json.loads(found.read_text(encoding="utf-8"))
        maps = []
        for half in halves:
            kept = set(half)
            found.write_text(json.dumps([d for d in detections if d["image_id"] in kept]), encoding="utf-8")
            maps.append(evaluate_coco(tuning.ground_truth, found, half)["map50_95"])
        return whole, *maps

    int8, *int8_halves = tune_map(job)
    rows = []
    bar = tqdm(names, desc=f"leave-one-out on {backend}", unit="conv", disable=not progress)
    for name in bar:
        candidate = job.with_recipe(replace(job.recipe, float_layers=(*job.recipe.float_layers, name)))
        # its own copy of what the checkpoint's jobs share (the FP32 IR): its INT8 IR is dropped after its evaluation
        reverted, *reverted_halves = tune_map(replace(candidate, shared=dict(job.shared)))
        half_gains = (reverted_halves[0] - int8_halves[0], reverted_halves[1] - int8_halves[1])
        rows.append(Reverted(name, enclosing_block(job.fused, name)[0], reverted, reverted - int8, half_gains))
        bar.set_postfix_str(f"INT8 {int8:.2f}, {name} {reverted - int8:+.2f}")
    return LeaveOneOut(backend, tuning.images, int8, tuple(rows), time.perf_counter() - start, fp32_tune_map)


def agreement(ranking: Sequence[str], reference: Sequence[str], same_top: Sequence[int] = ()) -> dict[str, Any]:
    """How well ``ranking`` predicts ``reference`` (two orders of the same convs): the overlap of their top 5 and top
    10 (fractions of min(k, convs)), whether their top-K sets are equal for each K of ``same_top``, and Kendall's tau
    of the two orders (scipy; 1 identical, -1 reversed)."""
    if sorted(ranking) != sorted(reference) or len(set(ranking)) != len(ranking):
        raise ValueError("agreement compares two orders of the same convs, each named once")
    position = {name: i for i, name in enumerate(reference)}

    def overlap(k: int) -> float:
        return len(set(ranking[:k]) & set(reference[:k])) / min(k, len(reference))

    return {
        "top5": overlap(5),
        "top10": overlap(10),
        **{f"same_top{k}": set(ranking[:k]) == set(reference[:k]) for k in same_top},
        "tau": float(kendalltau([position[n] for n in ranking], range(len(ranking))).statistic),
    }


def write_csv(loo: LeaveOneOut, path: Path, rankings: Mapping[str, Sequence[str]] | None = None) -> Path:
    """One line per conv in model order: name, block, tuning mAP50-95 reverted, gain (on all tuning images, then on
    each half), its place in the sweep's own ranking and (1-based) in each named ranking of ``rankings`` (a column
    ``<name>_position`` each)."""
    rankings = {"loo": loo.ranking(), **(rankings or {})}
    places = {key: {name: i + 1 for i, name in enumerate(order)} for key, order in rankings.items()}
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "name",
                "block",
                "tune_map50_95",
                "gain",
                "gain_even_images",
                "gain_odd_images",
                *(f"{key}_position" for key in rankings),
            ]
        )
        for row in loo.rows:
            writer.writerow(
                [
                    row.name,
                    row.block,
                    f"{row.tune_map50_95:.3f}",
                    f"{row.gain:.3f}",
                    *(f"{g:.3f}" for g in row.half_gains),
                    *(places[key].get(row.name, "") for key in rankings),
                ]
            )
    return path
