"""A ladder study's ``ladder.json`` (:mod:`qarep_det.pipelines.ladder`) as a Markdown table and one PNG; nothing
here measures anything, so both can be rebuilt from the JSON alone.

The plot has two panels over the steps: the INT8 drop (mean over seeds with its standard error as error bar, each
seed a dot; one colour per backend) and the largest identity-BN scale ``|gamma| / sqrt(var + eps)`` on a log axis, the
paper's mechanism: it explodes where a dead channel sits behind RepVGG's identity BN and is gone from S2 on.
Matplotlib's object API with the Agg canvas, as :mod:`qarep_det.evaluation.plots`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from qarep_det.evaluation.table import markdown_table

IDENTITY = "identity"  # the BN branch whose scale is the paper's C1 story
ACCURACY_HEADER = (
    "step",
    "model",
    "L2",
    "backend",
    "seeds",
    "FP32 mAP50-95",
    "INT8 mAP50-95",
    "drop",
    "image SE",
    "wall s",
)
DIAGNOSIS_HEADER = (
    "step",
    "identity BN max",
    "largest BN (branch)",
    "identity BNs with a dead channel",
    "dead identity channels",
    "fused max/median",
    "worst channel max/median",
    "INT8 zero share max",
    "block output max/std",
    "block output variance max",
)


def _mean_se(value: dict[str, Any] | None, digits: int = 2) -> str:
    """``mean ± se`` of a :func:`~qarep_det.pipelines.ladder.spread`, ``mean`` alone for one seed, '-' for none."""
    if not value or value.get("mean") is None:
        return "-"
    se = value.get("se")
    return f"{value['mean']:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")


def _number(value: Any, fmt: str = ".3g") -> str:
    return "-" if value is None else f"{value:{fmt}}"


def _largest_bn(c1: dict[str, Any]) -> str:
    """The largest BN scale of any branch, and the branch: 'post 12.3'."""
    scales = {k: v for k, v in c1.get("bn_scale_max", {}).items() if v is not None}
    if not scales:
        return "-"
    branch = max(scales, key=scales.__getitem__)
    return f"{scales[branch]:.3g} ({branch})"


def accuracy_rows(study: dict[str, Any]) -> list[list[str]]:
    """One table row per step and backend: FP32, INT8 and drop as mean ± SE over seeds, the image-level SE."""
    rows = []
    for step in study["steps"]:
        for backend, figures in step["backends"].items():
            rows.append(
                [
                    step["step"],
                    step["model"],
                    step["rep_l2"],
                    backend,
                    str(len(step["seeds"])),
                    _mean_se(figures["fp32_map50_95"]),
                    _mean_se(figures["int8_map50_95"]),
                    _mean_se(figures["drop"]),
                    _number(figures["image_drop_se"], ".2f"),
                    f"{step['wall_s']:.0f}",
                ]
            )
    return rows


def diagnosis_rows(study: dict[str, Any]) -> list[list[str]]:
    """One table row per step: C1 and C2, each the mean over seeds."""
    rows = []
    for step in study["steps"]:
        c1, c2 = step["c1"], step["c2"]
        rows.append(
            [
                step["step"],
                _mean_se(step["bn_scale_max"].get(IDENTITY), 3),
                _largest_bn(c1),
                _number(c1["bns_with_dead_channels"].get(IDENTITY), ".3g"),
                _number(c1["dead_channels"].get(IDENTITY)),
                _number(c1["kernel_max_to_median"]),
                _number(c1["kernel_channel_max_to_median"]),
                _number(c1["zero_share_max"], ".3f"),
                _number(c2["max_to_std_max"]),
                _number(c2["variance_max"]),
            ]
        )
    return rows


TRACE_COLUMNS = 8  # epochs shown in the growth table: evenly spaced, the last always


def _shown_epochs(epochs: Sequence[str]) -> list[str]:
    """At most TRACE_COLUMNS of the traced epochs, evenly spaced, first and last included."""
    if len(epochs) <= TRACE_COLUMNS:
        return list(epochs)
    picks = {round(i * (len(epochs) - 1) / (TRACE_COLUMNS - 1)) for i in range(TRACE_COLUMNS)}
    return [epochs[i] for i in sorted(picks)]


def growth_rows(study: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The C1 trace as a table: per step, its largest identity-BN scale (else its largest BN scale of any branch,
    the branch named) after each shown epoch, the mean over seeds; empty when no step was traced."""
    traced = [step for step in study["steps"] if step.get("c1_by_epoch")]
    if not traced:
        return [], []
    epochs = _shown_epochs(sorted({e for step in traced for e in step["c1_by_epoch"]}, key=int))
    rows = []
    for step in traced:
        trace = step["c1_by_epoch"]
        last = trace[max(trace, key=int)]["bn_scale_max"]
        branch = IDENTITY if IDENTITY in last else max(last, key=lambda b: last[b] or 0.0)
        values = [trace.get(e, {}).get("bn_scale_max", {}).get(branch) for e in epochs]
        rows.append([step["step"], branch, *map(_number, values)])
    return ["step", "BN", *(f"epoch {e}" for e in epochs)], rows


def format_markdown(study: dict[str, Any]) -> str:
    """The study as Markdown: settings, the accuracy table, the diagnosis table and what each figure means."""
    s, m = study["settings"], study["machine"]
    hyp = ", ".join(f"{k}={v}" for k, v in s["hyp"].items()) or "none"
    lines = [
        "# QARepVGG ablation ladder",
        "",
        f"Data `{s['data']}`; groups {s['groups']}; seeds {', '.join(map(str, study['seeds']))}; {s['epochs']} epochs "
        f"at {s['imgsz']} px, batch {s['batch']}, device {s['device']}; extra train settings: {hyp}.",
        f"INT8: {study['recipe']}. Protocol: {study['protocol']}.",
        f"Machine: {m['cpu']} ({m['cpu_count']} CPUs){', ' + m['gpu'] if m['gpu'] else ''}; torch {m['torch']}, "
        f"Ultralytics {m['ultralytics']}.",
        "",
        *markdown_table(ACCURACY_HEADER, accuracy_rows(study), [False] * 4 + [True] * 6),
        "",
        "mAP50-95 in percent, mean ± standard error over seeds (stdev / sqrt(seeds)); drop = FP32 - INT8. Image SE: "
        "the standard error of one seed's drop from the per-image AP of the val images (paired FP32 - INT8), the "
        "mean over seeds; the images are the same for every seed, so it does not shrink with more seeds. Wall s: "
        "training and evaluation of all seeds of the step.",
        "",
        *markdown_table(DIAGNOSIS_HEADER, diagnosis_rows(study), [False] + [True] * 9),
        "",
        "Means over seeds. C1 (weights, training form): BN scale |gamma| / sqrt(running var + eps), largest over the "
        "model; a BN channel is dead when its running var + mean^2 <= eps; fused max/median: the largest |w| over "
        "the median |w| of the deployed kernel, the largest over blocks (and for its worst output channel); INT8 zero "
        "share: the largest share of one channel's non-zero weights that per-channel INT8 rounds to zero. C2 "
        f"(activations, fused model, the first {s['activation_images']} calibration images): each Rep block's output "
        "(after its ReLU), the largest over blocks. '-': the step has no such BN.",
    ]
    header, rows = growth_rows(study)
    if rows:
        lines += [
            "",
            *markdown_table(header, rows, [False, False] + [True] * (len(header) - 2)),
            "",
            "C1 by epoch: the largest BN scale |gamma| / sqrt(running var + eps) of the model the checkpoint saves "
            "(Ultralytics' EMA) after each epoch, the identity BN where the step has one, else the branch named; the "
            "mean over seeds. How it grows says at which schedule RepVGG's singular identity-BN scales would appear.",
        ]
    return "\n".join(lines) + "\n"


def write_markdown(study: dict[str, Any], path: Path) -> Path:
    path.write_text(format_markdown(study), encoding="utf-8")
    return path


def _step_label(step: dict[str, Any]) -> str:
    """'S0', the model and, for S0, its L2: the x tick of a step."""
    l2 = "\ncustom L2" if step["rep_l2"] == "custom" else ""
    return f"{step['step']}\n{step['model'].removesuffix('.yaml')}{l2}"


def _seed_values(study: dict[str, Any], step: str, read: Any) -> list[float]:
    """``read(run)`` for every seed's run of ``step`` (None skipped)."""
    return [v for run in study["runs"] if run["step"] == step and (v := read(run)) is not None]


def _errorbar(ax: Any, x: Sequence[float], means: Sequence[float | None], ses: Sequence[float | None], **kwargs: Any):
    """Means with SE bars (no bar for one seed); missing means left out."""
    points = [(xi, m, s or 0.0) for xi, m, s in zip(x, means, ses, strict=True) if m is not None]
    if points:
        xs, ms, es = zip(*points, strict=True)
        ax.errorbar(xs, ms, yerr=es, fmt="o", capsize=4, markersize=6, **kwargs)


def plot_ladder(study: dict[str, Any], path: Path) -> Path:
    """Two panels over the steps: the INT8 drop per backend (mean ± SE, seeds as dots) and the largest identity-BN
    scale (log axis, mean ± SE, seeds as dots; steps without an identity BN say so)."""
    steps = study["steps"]
    names = [s["step"] for s in steps]
    x = list(range(len(steps)))
    fig = Figure(figsize=(max(9.0, 2.2 * len(steps) + 4), 4.6), layout="constrained")
    drop_ax, bn_ax = fig.subplots(1, 2)
    backends = list(dict.fromkeys(b for s in steps for b in s["backends"]))
    for k, backend in enumerate(backends):
        offset = (k - (len(backends) - 1) / 2) * 0.15
        figures = [s["backends"].get(backend, {}).get("drop", {}) for s in steps]
        xs = [xi + offset for xi in x]
        _errorbar(
            drop_ax,
            xs,
            [f.get("mean") for f in figures],
            [f.get("se") for f in figures],
            color=f"C{k}",
            label=f"{backend}: mean ± SE over seeds",
        )
        for xi, step in zip(xs, names, strict=True):
            values = _seed_values(study, step, lambda run, b=backend: run["backends"].get(b, {}).get("drop"))
            drop_ax.plot([xi + 0.05] * len(values), values, ".", color=f"C{k}", alpha=0.45, markersize=5)
    drop_ax.axhline(0.0, color="grey", linewidth=0.8)
    drop_ax.set_ylabel("INT8 drop, FP32 - INT8 mAP50-95 (points)")
    drop_ax.set_title("INT8 drop per step (dots: seeds)", fontsize=10)
    drop_ax.legend(fontsize=8)

    identity = [s["bn_scale_max"].get(IDENTITY, {}) for s in steps]
    means = [f.get("mean") for f in identity]
    for xi, f in zip(x, identity, strict=True):
        bn_ax.plot(
            [xi + 0.08] * len(f.get("values", [])), f.get("values", []), ".", color="C3", alpha=0.45, markersize=5
        )
    _errorbar(bn_ax, x, means, [f.get("se") for f in identity], color="C3", label="identity BN: mean ± SE over seeds")
    largest = [max((v for v in s["c1"]["bn_scale_max"].values() if v is not None), default=None) for s in steps]
    bn_ax.plot(
        [xi for xi, v in zip(x, largest, strict=True) if v is not None],
        [v for v in largest if v is not None],
        "s",
        markerfacecolor="none",
        color="grey",
        label="largest BN of any branch (mean)",
    )
    bn_ax.set_yscale("log")
    for axis_formatter in (bn_ax.yaxis.set_major_formatter, bn_ax.yaxis.set_minor_formatter):
        axis_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))  # 6.5, not 6.5 x 10^0
    for xi, mean in zip(x, means, strict=True):
        if mean is None:
            bn_ax.annotate(
                "no identity BN", (xi, 0.02), xycoords=("data", "axes fraction"), ha="center", fontsize=8, color="grey"
            )
    bn_ax.set_ylabel("largest |gamma| / sqrt(var + eps) (log scale)")
    bn_ax.set_title("C1: largest identity-BN scale per step", fontsize=10)
    bn_ax.legend(fontsize=8)
    for ax in (drop_ax, bn_ax):
        ax.set_xticks(x, [_step_label(s) for s in steps], fontsize=7)
        ax.set_xlim(-0.5, len(steps) - 0.5)
        ax.grid(axis="y", alpha=0.3)
    s = study["settings"]
    fig.suptitle(
        f"QARepVGG ladder: {len(study['seeds'])} seed(s), {s['epochs']} epochs at {s['imgsz']} px, groups {s['groups']}"
    )
    fig.savefig(path, dpi=110)
    return path
