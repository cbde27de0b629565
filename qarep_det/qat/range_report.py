"""Learned ranges against the calibrated ones they started from: ``ranges.csv``, ``ranges.png`` and one log line.

Written into a learned-ranges QAT run's directory, beside Ultralytics' ``results.csv`` and ``results.png``, for the
model the run hands back (best.pt). Matplotlib's object API with the Agg canvas, as :mod:`qarep_det.evaluation.plots`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from qarep_det.quant.qat import QATDetectionModel, range_moves

TOP = 3  # ranges named in the summary line
FINE_TICKS = (0.5, 0.8, 0.9, 1.0, 1.1, 1.25, 2.0)  # ratios marked on the log axis: small moves
COARSE_TICKS = (0.01, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0, 100.0)  # wider ones


def _ratio(value: float) -> str:
    return f"x{value:.2f}"


def summary(rows: Sequence[dict[str, Any]]) -> str:
    """One line: how far the input and the weight ranges moved, and the inputs that moved most."""
    parts = []
    for quantizer in ("input", "weight"):
        ratios = [r["ratio"] for r in rows if r["quantizer"] == quantizer and math.isfinite(r["ratio"])]
        lows = [r["ratio_min"] for r in rows if r["quantizer"] == quantizer and math.isfinite(r["ratio_min"])]
        highs = [r["ratio_max"] for r in rows if r["quantizer"] == quantizer and math.isfinite(r["ratio_max"])]
        if ratios:
            ratios.sort()
            parts.append(
                f"{len(ratios)} {quantizer} ranges {_ratio(min(lows))}..{_ratio(max(highs))} "
                f"(median {_ratio(ratios[len(ratios) // 2])})"
            )
    inputs = [r for r in rows if r["quantizer"] == "input" and math.isfinite(r["ratio"]) and r["ratio"] > 0]
    inputs.sort(key=lambda r: -abs(math.log(r["ratio"])))
    most = ", ".join(f"{r['conv'].removeprefix('model.')} {_ratio(r['ratio'])}" for r in inputs[:TOP])
    return "learned / calibrated: " + "; ".join(parts) + (f"; inputs that moved most: {most}" if most else "")


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Ratio learned / calibrated per quantized conv (log axis), inputs and weights (median, channel min-max)."""
    names = list(dict.fromkeys(r["conv"] for r in rows))
    fig = Figure(figsize=(max(8.0, 2.5 + 0.16 * len(names)), 5.0), layout="constrained")
    ax = fig.add_subplot()
    for quantizer, colour in (("input", "tab:blue"), ("weight", "tab:orange")):
        chosen = [r for r in rows if r["quantizer"] == quantizer]
        x = [names.index(r["conv"]) for r in chosen]
        ratio = [r["ratio"] for r in chosen]
        low = [max(r["ratio"] - r["ratio_min"], 0.0) for r in chosen]
        high = [max(r["ratio_max"] - r["ratio"], 0.0) for r in chosen]
        label = "input (per tensor)" if quantizer == "input" else "weight (per channel: median, min-max)"
        ax.errorbar(x, ratio, yerr=[low, high], fmt="o", ms=3, color=colour, elinewidth=0.8, label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    smallest, largest = min(r["ratio_min"] for r in rows), max(r["ratio_max"] for r in rows)
    ax.yaxis.set_major_locator(FixedLocator(FINE_TICKS if 0.5 <= smallest and largest <= 2.0 else COARSE_TICKS))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: _ratio(value)))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylabel("learned range / calibrated range")
    ax.set_xticks(range(len(names)), [n.removeprefix("model.") for n in names], rotation=90, fontsize=6)
    ax.set_xlabel("quantized conv of the fused model, forward order")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)  # below the axis: hides no point
    fig.suptitle("QAT learned ranges against their calibration")
    fig.savefig(path, dpi=110)
    return path


def write_range_report(student: QATDetectionModel, out_dir: Path) -> tuple[Path, Path, str] | None:
    """``ranges.csv`` and ``ranges.png`` in ``out_dir`` and the summary line; None without calibrated ranges (a
    checkpoint from before they were kept)."""
    rows = range_moves(student)
    if not rows:
        return None
    table = Path(out_dir) / "ranges.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return table, plot(rows, Path(out_dir) / "ranges.png"), summary(rows)
