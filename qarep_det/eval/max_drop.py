"""``ptq_eval --max-drop D``: the fewest convs kept float, in ranking order, for an INT8 drop of at most D.

K convs kept float means the first K of the model's sensitivity ranking (shared by every backend). Each candidate K
is scored by one evaluation of the tuning set (:mod:`qarep_det.eval.tuning`), its drop measured against the FP32
model on the same images, as the table's drop is.

The search is a bisection over K in [0, L] (L quantized convs): the FP32 evaluation, K = 0 (the fully INT8 model,
done if it meets D), then probes at the midpoint of (lo, hi], where lo is the largest K known to miss D and hi the
smallest K known to meet it (L, every conv float, the FP32 model, at the start: never evaluated). That is at most
``2 + ceil(log2(L))`` tuning evaluations (:func:`evaluation_budget`).

The drop is not monotone in K on real models (docs/diagnose.md, "Choosing K"). Bisection needs no monotonicity to be
correct: it only answers with a K whose drop it measured within D, the K below it measured above D, a boundary of the
measured curve. What non-monotonicity can cost is optimality: a smaller K that also meets D may sit below a probe
that missed. When no evaluated K meets D, the one with the lowest drop is kept, and the shortfall is reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from qarep_det.checks import check_count
from qarep_det.eval.predict import evaluate_runner
from qarep_det.eval.protocol import EvalProtocol
from qarep_det.eval.tuning import TuningSet
from qarep_det.quant.runner import Runner


@dataclass(frozen=True)
class Step:
    """One tuning evaluation: K convs kept float, the tuning mAP50-95 and drop (percent points), and the INT8
    runner's median ms per image on the tuning batches."""

    k: int
    tune_map50_95: float
    tune_drop: float
    int8_ms: float


@dataclass(frozen=True)
class SearchResult:
    """The K chosen and every step that led to it, in evaluation order."""

    max_drop: float
    fp32_tune_map50_95: float
    steps: tuple[Step, ...]
    chosen: Step
    met: bool
    budget: int

    @property
    def evals(self) -> int:
        """Tuning evaluations, the FP32 one included (NNCF counts its FP32 validation too)."""
        return 1 + len(self.steps)

    @property
    def shortfall(self) -> float:
        """How far the kept K's tuning drop is above D; 0 when met."""
        return 0.0 if self.met else self.chosen.tune_drop - self.max_drop

    def row(self) -> dict[str, Any]:
        """The keys a results.json row gets (besides ``float_layers``, which the caller knows)."""
        return {
            "max_drop": self.max_drop,
            "tune_drop": self.chosen.tune_drop,
            "tune_evals": self.evals,
            "shortfall": self.shortfall,
            "fp32_tune_map50_95": self.fp32_tune_map50_95,
            "int8_tune_map50_95": self.chosen.tune_map50_95,
            "tune_steps": [{k: round(v, 2) for k, v in asdict(step).items()} for step in self.steps],  # as the table
        }


def evaluation_budget(convs: int) -> int:
    """The most tuning evaluations a search over ``convs`` quantized convs makes: FP32, K = 0, and a bisection of
    (0, convs]."""
    check_count("number of quantized convs", convs)
    return 2 + math.ceil(math.log2(convs))


def search_float_convs(
    convs: int,
    fp32_tune_map: float,
    evaluate: Callable[[int], tuple[float, float]],
    max_drop: float,
    report: Callable[[str], None] = print,
) -> SearchResult:
    """Bisection for the fewest K in [0, ``convs``] whose tuning drop is at most ``max_drop`` (module docstring).

    ``evaluate(k)`` scores the candidate with the first K convs of the ranking float: ``(tuning mAP50-95, INT8 ms
    per image)``; it is called at most ``evaluation_budget(convs) - 1`` times (the FP32 score is given). ``report``
    gets one line per step as it goes.
    """
    if max_drop < 0:
        raise ValueError(f"the largest drop allowed must be >= 0 mAP50-95 points, got {max_drop}")
    budget = evaluation_budget(convs)
    steps: dict[int, Step] = {}

    def meets(k: int) -> bool:
        tune_map, ms = evaluate(k)
        step = steps[k] = Step(k, tune_map, fp32_tune_map - tune_map, ms)
        ok = step.tune_drop <= max_drop
        report(
            f"  K={k:<3d} tuning mAP50-95 {tune_map:6.2f}  drop {step.tune_drop:+6.2f} "
            f"{'<=' if ok else '> '} {max_drop:g}  ({1 + len(steps)}/{budget} tuning evaluations)"
        )
        return ok

    lo, hi = 0, convs  # lo misses D (once K = 0 was evaluated); hi meets it, or is the unevaluated all-float model
    if not meets(0):
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if meets(mid) else (mid, hi)
    else:
        hi = 0
    met = hi in steps
    chosen = steps[hi] if met else min(steps.values(), key=lambda s: (s.tune_drop, s.k))
    if not met:
        report(
            f"  no K evaluated meets a drop of {max_drop:g} (K={convs}, every conv float, is the FP32 model); "
            f"keeping the lowest drop found: K={chosen.k}, {chosen.tune_drop:.2f}, short by "
            f"{chosen.tune_drop - max_drop:.2f}"
        )
    return SearchResult(max_drop, fp32_tune_map, tuple(steps.values()), chosen, met, budget)


def search_backend(
    candidate: Callable[[int], Runner],
    convs: int,
    tuning: TuningSet,
    fp32_tune_map: float,
    max_drop: float,
    scratch: Path,
    label: str,
    protocol: EvalProtocol,
    batch: int = 8,
    progress: bool = True,
) -> tuple[SearchResult, dict[str, Any]]:
    """The search on one backend, ``candidate(k)`` being its INT8 runner with the first K convs of the ranking
    float, each scored on the tuning set with the evaluation's ``protocol``: the result, and the keys of its
    results.json row."""

    def evaluate(k: int) -> tuple[float, float]:
        result = evaluate_runner(candidate(k), tuning.ground_truth, scratch / "tune.json", protocol, batch, progress)
        return result["map50_95"], result["runner_ms"]

    tqdm.write(
        f"{label}: fewest of {convs} convs float for a drop <= {max_drop:g} on {tuning.describe()}, FP32 "
        f"{fp32_tune_map:.2f}"
    )
    result = search_float_convs(convs, fp32_tune_map, evaluate, max_drop, report=tqdm.write)
    return result, {**result.row(), "tune_images": tuning.images, "tune_split": tuning.split}
