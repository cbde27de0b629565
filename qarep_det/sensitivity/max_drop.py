"""``ptq_eval --max-drop D``: the fewest convs kept float, in ranking order, for an INT8 drop of at most D.

K convs kept float means the first K of the model's sensitivity ranking (shared by every backend); with
``--float-cost latency`` that ranking is first re-ordered by harm per multiply-accumulate
(:mod:`~qarep_det.sensitivity.float_cost`), so the search answers the cheapest prefix that meets D rather than the
shortest. Each candidate float set is scored by one evaluation of the tuning set
(:mod:`~qarep_det.sensitivity.tuning`), its drop measured against the FP32 model on the same images, as the table's
drop is.

The search is a bisection over K in [0, L] (L quantized convs): the FP32 evaluation, K = 0 (the fully INT8 model,
done if it meets D), then probes at the midpoint of (lo, hi], where lo is the largest K known to miss D and hi the
smallest K known to meet it (L, every conv float, the FP32 model, at the start: never evaluated). That is at most
``2 + ceil(log2(L))`` tuning evaluations (:func:`evaluation_budget`).

``refine = R`` re-orders the first R candidates by the metric itself before bisecting. NNCF's accuracy control ranks
every quantizer group by the tuning metric with that group alone reverted to float (``nncf/quantization/algorithms/
accuracy_control/ranker.py``): costly (one evaluation per group), but it finds the one conv that wins the drop back
where a cheap proxy ranks it a few places down. Here the cheap ranking still orders the candidates, and the metric
re-orders only its first R: each is evaluated reverted alone (R more evaluations, only when K = 0 misses D), sorted
by its tuning mAP (best first, ties in ranking order) ahead of the rest of the ranking, and the bisection runs on
that order. Its K = 1 is the best single, already measured: when it meets D the answer is that one conv, else the
bisection continues over (1, L]. The bound becomes ``2 + min(R, L) + ceil(log2(L))``.

The drop is not monotone in K on real models (docs/diagnose.md, "Choosing K"). Bisection needs no monotonicity to be
correct: it only answers with a K whose drop it measured within D, the K below it measured above D, a boundary of the
measured curve. What non-monotonicity can cost is optimality: a smaller K that also meets D may sit below a probe
that missed. When no evaluated candidate meets D, the one with the lowest drop is kept, and the shortfall is reported.

A tuning drop is a measurement on a few hundred images. Once K = 0 is evaluated, the FP32 and fully INT8 per-image
AP50-95 give its standard error (:mod:`qarep_det.sensitivity.resolution`), printed beside every step's drop; a D below 2
standard errors is warned about once, with the tuning images that would resolve it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from qarep_det.checks import check_count
from qarep_det.errors import InputError
from qarep_det.evaluation.coco import per_image_map50_95
from qarep_det.evaluation.predict import evaluate_runner
from qarep_det.evaluation.protocol import EvalProtocol
from qarep_det.evaluation.results import Search, TuneStep
from qarep_det.quant.runner import Runner
from qarep_det.sensitivity.resolution import Resolution
from qarep_det.sensitivity.tuning import TuningSet


@dataclass(frozen=True)
class Step:
    """One tuning evaluation: the convs kept float, the tuning mAP50-95 and drop (percent points), and the INT8
    runner's median ms per image on the tuning batches. ``reverted``: a refinement step, its one conv reverted alone
    (out of the bisection's order). ``gmacs``: the float convs' multiply-accumulates (G), the latency estimate
    :mod:`~qarep_det.sensitivity.float_cost` orders by, beside the measured ``int8_ms``; None when not given."""

    names: tuple[str, ...]
    tune_map50_95: float
    tune_drop: float
    int8_ms: float
    reverted: bool = False
    gmacs: float | None = None

    @property
    def k(self) -> int:
        return len(self.names)

    def row(self) -> TuneStep:
        """The step's entry in a results.json row, rounded as the table is; a refinement step names its conv."""
        return TuneStep(
            k=self.k,
            tune_map50_95=round(self.tune_map50_95, 2),
            tune_drop=round(self.tune_drop, 2),
            int8_ms=round(self.int8_ms, 2),
            float_gmacs=None if self.gmacs is None else round(self.gmacs, 4),
            reverted=self.names[0] if self.reverted else None,
        )


@dataclass(frozen=True)
class SearchResult:
    """The float set chosen and every step that led to it, in evaluation order, and how finely the tuning set
    resolves a drop (measured on K = 0)."""

    max_drop: float
    fp32_tune_map50_95: float
    steps: tuple[Step, ...]
    chosen: Step
    met: bool
    budget: int
    resolution: Resolution | None  # None: not estimated (a replay of measured drops, without per-image values)
    refine: int = 0

    @property
    def float_layers(self) -> tuple[str, ...]:
        """The convs the chosen candidate keeps float (with ``refine``, not always a prefix of the ranking)."""
        return self.chosen.names

    @property
    def evals(self) -> int:
        """Tuning evaluations, the FP32 one included (NNCF counts its FP32 validation too)."""
        return 1 + len(self.steps)

    @property
    def shortfall(self) -> float:
        """How far the kept candidate's tuning drop is above D; 0 when met."""
        return 0.0 if self.met else self.chosen.tune_drop - self.max_drop

    @property
    def tune_drop_se(self) -> float | None:
        """The tuning drop's standard error; None when not estimated."""
        return None if self.resolution is None else self.resolution.standard_error

    @property
    def tune_images_needed(self) -> int | None:
        """Tuning images that would resolve D; None when these resolve it (or when none would: D = 0)."""
        noise, d = self.resolution, self.max_drop
        return None if noise is None or noise.resolves(d) else noise.images_needed(d)

    def row(self, *, tune_images: int, tune_split: str, search_s: float) -> Search:
        """The search's fields of a results.json row (``float_layers``, the row's own, is the caller's), searched
        on ``tune_images`` images of ``tune_split`` in ``search_s`` seconds."""
        return Search(
            max_drop=self.max_drop,
            refine=self.refine,
            tune_drop=self.chosen.tune_drop,
            tune_drop_se=self.tune_drop_se,
            tune_images_needed=self.tune_images_needed,
            tune_evals=self.evals,
            shortfall=self.shortfall,
            fp32_tune_map50_95=self.fp32_tune_map50_95,
            int8_tune_map50_95=self.chosen.tune_map50_95,
            tune_steps=tuple(step.row() for step in self.steps),
            tune_images=tune_images,
            tune_split=tune_split,
            search_s=search_s,
        )


def evaluation_budget(convs: int, refine: int = 0) -> int:
    """The most tuning evaluations a search over ``convs`` quantized convs makes: FP32, K = 0, the first ``refine``
    convs reverted alone, and a bisection of (0, convs]."""
    check_count("number of quantized convs", convs)
    check_count("refine", refine, 0)
    return 2 + min(refine, convs) + math.ceil(math.log2(convs))


def search_float_convs(
    ranking: Sequence[str],
    *,
    fp32_tune_map: float,
    evaluate: Callable[[tuple[str, ...]], tuple[float, float]],
    max_drop: float,
    resolution: Callable[[], Resolution] | None = None,
    report: Callable[[str], None] = print,
    refine: int = 0,
    costs: Mapping[str, float] | None = None,
) -> SearchResult:
    """Bisection for the fewest K in [0, L] whose tuning drop is at most ``max_drop``, K counting convs of
    ``ranking`` (the L quantized convs, most harmful first), its first ``refine`` re-ordered by their tuning mAP
    reverted alone (module docstring).

    ``evaluate(names)`` scores the candidate with exactly the convs ``names`` float: ``(tuning mAP50-95, INT8 ms
    per image)``; it is called at most ``evaluation_budget(L, refine) - 1`` times, never twice for one float set (the
    FP32 score is given). ``resolution()``, if given, is asked once, right after K = 0's evaluation: the tuning drop's
    standard error, printed beside each drop; a ``UserWarning`` says when it cannot resolve ``max_drop``. ``report``
    gets one line per step as it goes. ``costs``, if given, are the convs' multiply-accumulates: each step records
    its float set's (G).
    """
    if max_drop < 0:
        raise InputError(f"the largest drop allowed must be >= 0 mAP50-95 points, got {max_drop}")
    convs = len(ranking)
    budget = evaluation_budget(convs, refine)
    steps: list[Step] = []

    def measure(names: Sequence[str], reverted: bool = False) -> Step:
        tune_map, ms = evaluate(tuple(names))
        gmacs = None if costs is None else sum(costs[name] for name in names) / 1e9
        steps.append(Step(tuple(names), tune_map, fp32_tune_map - tune_map, ms, reverted, gmacs))
        return steps[-1]

    def meets(step: Step) -> bool:
        return step.tune_drop <= max_drop

    def said(step: Step) -> Step:
        what = f"{step.names[0]} reverted alone:" if step.reverted else f"K={step.k:<3d}"
        report(
            f"  {what} tuning mAP50-95 {step.tune_map50_95:6.2f}  drop {step.tune_drop:+6.2f}{spread} "
            f"{'<=' if meets(step) else '> '} {max_drop:g}  ({1 + len(steps)}/{budget} tuning evaluations"
            + ("" if step.gmacs is None else f"; {step.gmacs:.3f} GMACs float, {step.int8_ms:.1f} ms")
            + ")"
        )
        return step

    fully_int8 = measure(())
    noise = None if resolution is None else resolution()  # one figure for every step, from FP32 and K = 0 pairs
    spread = "" if noise is None else f" ± {noise.standard_error:.2f}"
    said(fully_int8)
    if noise is not None and not noise.resolves(max_drop):
        _warn_unresolved(noise, max_drop)
    order = list(ranking)
    found = fully_int8 if meets(fully_int8) else None  # the step at hi, once one met D
    lo, hi = 0, (convs if found is None else 0)  # lo misses D; hi meets it, or is the unevaluated all-float model
    if found is None and refine:
        singles = [said(measure(order[i : i + 1], reverted=True)) for i in range(min(refine, convs))]
        best = sorted(singles, key=lambda s: -s.tune_map50_95)  # stable: ties keep ranking order
        order[: len(best)] = [s.names[0] for s in best]
        report(f"  re-ranked by tuning mAP, each reverted alone: {', '.join(order[: len(best)])}")
        if meets(best[0]):  # K = 1 of the new order, already measured
            found, hi = best[0], 1
        else:
            lo = 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        step = said(measure(order[:mid]))
        if meets(step):
            found, hi = step, mid
        else:
            lo = mid
    chosen = found if found is not None else min(steps, key=lambda s: (s.tune_drop, s.k))
    if found is None:
        report(
            f"  no K evaluated meets a drop of {max_drop:g} (K={convs}, every conv float, is the FP32 model); "
            f"keeping the lowest drop found: K={chosen.k}, {chosen.tune_drop:.2f}, short by "
            f"{chosen.tune_drop - max_drop:.2f}"
        )
    return SearchResult(max_drop, fp32_tune_map, tuple(steps), chosen, found is not None, budget, noise, refine)


def _warn_unresolved(resolution: Resolution, max_drop: float) -> None:
    """One ``UserWarning`` line: ``max_drop`` is below 2 standard errors of the tuning drop."""
    needed = resolution.images_needed(max_drop)
    warnings.warn(
        f"--max-drop {max_drop:g} is below what {resolution.images} tuning images resolve (2 standard errors = "
        f"{2 * resolution.standard_error:.2f} mAP50-95); "
        + ("no number of images resolves 0" if needed is None else f"about {needed} images would (--tune-images)"),
        UserWarning,
        stacklevel=2,
    )


def search_backend(
    candidate: Callable[[tuple[str, ...]], Runner],
    *,
    ranking: Sequence[str],
    tuning: TuningSet,
    fp32_tune_map: float,
    fp32_per_image: Sequence[float],
    max_drop: float,
    scratch: Path,
    label: str,
    protocol: EvalProtocol,
    batch: int = 8,
    progress: bool = True,
    refine: int = 0,
    costs: Mapping[str, float] | None = None,
) -> SearchResult:
    """The search on one backend, ``candidate(names)`` being its INT8 runner with the convs ``names`` float, each
    scored on the tuning set with the evaluation's ``protocol`` (``costs``: as :func:`search_float_convs` takes them).
    ``fp32_per_image`` is the FP32 model's AP50-95 of each tuning image
    (:func:`qarep_det.evaluation.coco.per_image_map50_95`), paired with K = 0's for the drop's standard error."""
    detections: dict[tuple[str, ...], Path] = {}  # one file per float set evaluated, K = 0's first

    def evaluate(names: tuple[str, ...]) -> tuple[float, float]:
        path = detections.setdefault(names, scratch / f"tune_{len(detections)}.json")
        result = evaluate_runner(
            candidate(names), tuning.ground_truth, path, protocol=protocol, batch=batch, progress=progress
        )
        return result["map50_95"], result["runner_ms"]

    def resolution() -> Resolution:
        return Resolution.paired(fp32_per_image, per_image_map50_95(tuning.ground_truth, detections[()]))

    tqdm.write(
        f"{label}: fewest of {len(ranking)} convs float for a drop <= {max_drop:g} on {tuning.describe()}, FP32 "
        f"{fp32_tune_map:.2f}" + (f"; the first {refine} re-ranked by their tuning mAP" if refine else "")
    )
    return search_float_convs(
        ranking,
        fp32_tune_map=fp32_tune_map,
        evaluate=evaluate,
        max_drop=max_drop,
        resolution=resolution,
        report=tqdm.write,
        refine=refine,
        costs=costs,
    )
