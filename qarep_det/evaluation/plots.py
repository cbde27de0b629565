"""Diagnosis report (``report.json``'s dict), ``--max-drop`` rows and leave-one-out sweeps -> PNG plots; nothing here
measures anything.

The diagnosis gets five figures, each comparing every model of the report on one axis (layers are matched by name,
in the first model's order, so twins such as yolo_qarep_s / yolo_repvgg_s line up bar by bar): the isolated output
SQNR per conv, the cumulative SQNR along the depth, the fused weights' max/median per conv, the BN scale factors
of the training form per block and branch, and the QARepVGG paper's two conditions per Rep block (C1: the deployed
kernel's spread; C2: the block output's max / std). Matplotlib's object API with the Agg canvas: no pyplot state,
no display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from qarep_det.evaluation.results import PTQRow, Search, TuneStep

LABEL_SIZE = 7  # layer names on the x axis: ~60 convs fit at 0.22 inch each
INCH_PER_LAYER = 0.22


def _layer_names(models: Sequence[dict[str, Any]]) -> list[str]:
    """Every conv name of every model, first model's order first."""
    return list(dict.fromkeys(layer["name"] for m in models for layer in m["layers"]))


def _values(model: dict[str, Any], names: list[str], key: str) -> list[float]:
    """``key`` of each named layer, NaN where missing or not finite (JSON null = inf SQNR)."""
    by_name = {layer["name"]: layer.get(key) for layer in model["layers"]}
    return [v if isinstance(v, (int, float)) and math.isfinite(v) else math.nan for v in map(by_name.get, names)]


def _short(name: str) -> str:
    """``model.8.1.conv`` -> ``8.1.conv``: the common prefix costs label space."""
    return name.removeprefix("model.")


def _figure(n_items: int, height: float = 5.5) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(max(8.0, 2.5 + INCH_PER_LAYER * n_items), height), layout="constrained")
    return fig, fig.add_subplot()


def _layer_axis(ax: Axes, names: list[str]) -> None:
    ax.set_xticks(range(len(names)), [_short(n) for n in names], rotation=90, fontsize=LABEL_SIZE)
    ax.set_xlim(-0.7, len(names) - 0.3)
    ax.set_xlabel("quantized conv of the fused model (module path without 'model.'), forward order")
    ax.grid(axis="y", alpha=0.3)


def _save(fig: Figure, title: str, path: Path) -> Path:
    """Title on top, the legend below the x axis (so it never hides data), then write the PNG."""
    fig.suptitle(title)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=8, frameon=False)
    fig.savefig(path, dpi=110)
    return path


def _bar_x(i: int, k: int, n_models: int) -> float:
    """Centre of model ``k``'s bar in the group of layer ``i``."""
    return i - 0.4 + 0.8 / n_models * (k + 0.5)


def _bars(ax: Axes, models: Sequence[dict[str, Any]], names: list[str], key: str) -> None:
    """Grouped bars: one colour per model, side by side for each layer."""
    for k, model in enumerate(models):
        xs = [_bar_x(i, k, len(models)) for i in range(len(names))]
        ax.bar(xs, _values(model, names, key), 0.8 / len(models), label=model["model"], color=f"C{k}")


def plot_isolated(models: Sequence[dict[str, Any]], path: Path) -> Path:
    """Detector output SQNR with one conv INT8 at a time; each model's most harmful conv is marked and named."""
    names = _layer_names(models)
    fig, ax = _figure(len(names))
    _bars(ax, models, names, "isolated_sqnr_db")
    for k, model in enumerate(models):
        worst = model["ranking"][0]
        value = _values(model, [worst], "isolated_sqnr_db")[0]
        ax.plot(
            _bar_x(names.index(worst), k, len(models)),
            value,
            "v",
            color=f"C{k}",
            markeredgecolor="black",
            markersize=10,
            label=f"{model['model']}: most harmful {_short(worst)} ({value:.1f} dB)",
        )
    _layer_axis(ax, names)
    ax.set_ylabel("detector output SQNR (dB) with only this conv INT8\n(lower = more harmful)")
    title = "Isolated sensitivity per conv (boxes and scores weighted equally: mean of their relative noise powers)"
    return _save(fig, title, path)


def plot_cumulative(models: Sequence[dict[str, Any]], path: Path) -> Path:
    """SQNR of each conv's output (solid) and input (dotted) in the fully INT8 model against FP32."""
    names = _layer_names(models)
    fig, ax = _figure(len(names))
    xs = range(len(names))
    for k, model in enumerate(models):
        ax.plot(
            xs,
            _values(model, names, "cumulative_sqnr_db"),
            "-o",
            color=f"C{k}",
            markersize=3,
            label=f"{model['model']}: conv output",
        )
        ax.plot(
            xs,
            _values(model, names, "cumulative_input_sqnr_db"),
            ":",
            color=f"C{k}",
            label=f"{model['model']}: conv input (before its quantizer)",
        )
    _layer_axis(ax, names)
    ax.set_ylabel("SQNR vs FP32 in the fully INT8 model (dB)")
    return _save(fig, "Cumulative error along the depth: the gap from dotted to solid is what a conv adds", path)


def plot_weights(models: Sequence[dict[str, Any]], path: Path) -> Path:
    """Largest |weight| over its channel's median per conv (log scale): fused identity taps stand out."""
    names = _layer_names(models)
    fig, ax = _figure(len(names))
    _bars(ax, models, names, "weight_max_to_median")
    ax.set_yscale("log")
    _layer_axis(ax, names)
    ax.set_ylabel("largest |w| / median |w| of its output channel\n(log scale)")
    return _save(fig, "Fused weight outliers: per-channel INT8 spends each channel's range on its largest weight", path)


def plot_bn_scales(models: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """|gamma| / sqrt(var + eps) per block and branch of the training form, one panel per model (log scale):
    max as a filled marker, median hollow, outlier BNs ringed. None when no model has BN rows (fused checkpoints)."""
    with_bn = [m for m in models if m["bn_scales"]]
    if not with_bn:
        return None
    blocks = list(dict.fromkeys(row["block"] for m in with_bn for row in m["bn_scales"]))
    fig = Figure(figsize=(max(8.0, 2.5 + INCH_PER_LAYER * len(blocks)), 1.0 + 3.6 * len(with_bn)), layout="constrained")
    axes = fig.subplots(len(with_bn), 1, sharex=True, squeeze=False)[:, 0]
    for ax, model in zip(axes, with_bn, strict=True):
        branches = list(dict.fromkeys(row["branch"] for row in model["bn_scales"]))
        for k, branch in enumerate(branches):
            rows = [r for r in model["bn_scales"] if r["branch"] == branch]
            xs = [blocks.index(r["block"]) + (k - (len(branches) - 1) / 2) * 0.18 for r in rows]
            ax.plot(xs, [r["max"] for r in rows], "o", color=f"C{k}", markersize=4, label=f"{branch} BN: max")
            ax.plot(
                xs,
                [r["median"] for r in rows],
                "o",
                markerfacecolor="none",
                color=f"C{k}",
                markersize=4,
                label=f"{branch} BN: median",
            )
            outliers = [(x, r["max"]) for x, r in zip(xs, rows, strict=True) if r["outlier"]]
            if outliers:
                ax.plot(*zip(*outliers, strict=True), "o", markersize=11, markerfacecolor="none", color="red")
        ax.set_yscale("log")
        ax.set_ylabel("|gamma| / sqrt(var + eps)\n(log scale)")
        factor = model.get("bn_outlier_factor", math.nan)
        ax.set_title(f"{model['model']}: red ring = a channel above {factor:g}x its BN's median", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the panel, never over a point
    axes[-1].set_xticks(range(len(blocks)), [_short(b) for b in blocks], rotation=90, fontsize=LABEL_SIZE)
    axes[-1].set_xlabel("block of the training form (module path without 'model.'); ConvBNReLU's BN is 'conv'")
    fig.suptitle("BN scale factors |gamma| / sqrt(running var + eps) per block and branch")
    fig.savefig(path, dpi=110)
    return path


def _block_values(model: dict[str, Any], key: str, field: str, blocks: list[str]) -> list[float]:
    """``field`` of each named Rep block in the ``key`` list of a model's report, NaN where missing or not finite."""
    by_block = {row["block"]: row.get(field) for row in model.get(key, [])}
    return [v if isinstance(v, (int, float)) and math.isfinite(v) else math.nan for v in map(by_block.get, blocks)]


def plot_conditions(models: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """The paper's C1 and C2 per Rep block (log scale), every model on the same axes: the deployed kernel's largest
    |w| over its median (whole kernel, and the worst output channel's own) and the block output's max / std. None
    when no model has Rep blocks."""
    with_blocks = [m for m in models if m.get("fused_kernels")]
    if not with_blocks:
        return None
    blocks = list(dict.fromkeys(row["block"] for m in with_blocks for row in m["fused_kernels"]))
    fig = Figure(figsize=(max(8.0, 2.5 + INCH_PER_LAYER * len(blocks)), 8.0), layout="constrained")
    c1, c2 = fig.subplots(2, 1, sharex=True)
    xs = range(len(blocks))
    for k, model in enumerate(with_blocks):
        name = model["model"]
        c1.plot(
            xs,
            _block_values(model, "fused_kernels", "max_to_median", blocks),
            "o-",
            color=f"C{k}",
            markersize=4,
            label=f"{name}: whole kernel",
        )
        c1.plot(
            xs,
            _block_values(model, "fused_kernels", "channel_max_to_median", blocks),
            "s--",
            color=f"C{k}",
            markersize=3,
            markerfacecolor="none",
            label=f"{name}: worst output channel",
        )
        c2.plot(
            xs,
            _block_values(model, "block_outputs", "max_to_std", blocks),
            "o-",
            color=f"C{k}",
            markersize=4,
            label=name,
        )
    c1.set_ylabel("C1: fused kernel max |w| / median |w|\n(log scale)")
    c2.set_ylabel("C2: block output max |x| / std\n(log scale)")
    for ax in (c1, c2):
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    c2.set_xticks(xs, [_short(b) for b in blocks], rotation=90, fontsize=LABEL_SIZE)
    c2.set_xlabel("Rep block (module path without 'model.'), forward order")
    fig.suptitle("What INT8 needs (QARepVGG's C1 and C2): small weight spread and small activation spread per block")
    fig.savefig(path, dpi=110)
    return path


def save_plots(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write every plot of a diagnosis report into ``out_dir``; returns the files written."""
    out_dir = Path(out_dir)
    models = report["models"]
    paths = [
        plot_isolated(models, out_dir / "isolated_sqnr.png"),
        plot_cumulative(models, out_dir / "cumulative_sqnr.png"),
        plot_weights(models, out_dir / "weight_max_to_median.png"),
        plot_bn_scales(models, out_dir / "bn_scales.png"),
        plot_conditions(models, out_dir / "c1_c2.png"),
    ]
    return [p for p in paths if p is not None]


def plot_max_drop(rows: Sequence[PTQRow], path: Path) -> Path:
    """``ptq_eval --max-drop``'s trade-off, one panel per model: the tuning mAP50-95 of every K each backend's search
    evaluated (the K chosen ringed, the target FP32 - D dashed), and on a second axis the OpenVINO INT8 ms per image
    of the same candidates, measured on the tuning batches (what keeping convs float costs on the real INT8 CPU
    backend). The convs ``--refine`` reverted alone are marked at K = 1 (the best of them is the bisection's K = 1).
    Every row searched (its ``search`` is set)."""
    models = list(dict.fromkeys(row.model for row in rows))
    fig = Figure(figsize=(8.0, 1.2 + 3.8 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), 1, squeeze=False)[:, 0]
    for ax, model in zip(axes, models, strict=True):
        model_rows = [r for r in rows if r.model == model]
        for k, row in enumerate(model_rows):
            steps = _bisected(row.search)
            ax.plot(
                [s.k for s in steps],
                [s.tune_map50_95 for s in steps],
                "-o",
                color=f"C{k}",
                markersize=4,
                label=f"{row.backend}: tuning mAP50-95, K = {len(row.float_layers)} chosen",
            )
            if singles := [s for s in row.search.tune_steps if s.reverted is not None]:
                ax.plot(
                    [1] * len(singles),
                    [s.tune_map50_95 for s in singles],
                    "x",
                    color=f"C{k}",
                    label=f"{row.backend}: each of the first {len(singles)} reverted alone",
                )
            ax.plot(
                len(row.float_layers),
                row.search.int8_tune_map50_95,
                "o",
                markersize=12,
                markerfacecolor="none",
                color=f"C{k}",
            )
        first = model_rows[0].search
        ax.axhline(
            first.fp32_tune_map50_95 - first.max_drop,
            color="gray",
            linestyle="--",
            label=f"target: FP32 {first.fp32_tune_map50_95:.2f} - {first.max_drop:g}",
        )
        ax.set_xlabel("K: convs kept float, first K of the sensitivity ranking (its first R re-ranked by --refine R)")
        ax.set_ylabel("tuning mAP50-95 (%)")
        ax.grid(alpha=0.3)
        title = f"{model}: {first.tune_images} tuning images"
        if openvino := next((r for r in model_rows if r.backend == "openvino"), None):
            steps = _bisected(openvino.search)
            latency = ax.twinx()
            latency.plot(
                [s.k for s in steps],
                [s.int8_ms for s in steps],
                ":s",
                color="black",
                markersize=3,
                label="OpenVINO INT8 ms per image (right axis)",
            )
            latency.axhline(
                openvino.fp32_ms,
                color="black",
                linestyle="-.",
                linewidth=0.8,
                label="OpenVINO FP32 ms per image, val batches (right axis)",
            )
            latency.set_ylabel("OpenVINO INT8 ms per image\n(median over tuning batches)")
            handles, labels = latency.get_legend_handles_labels()
        else:
            handles, labels = [], []
            title += " (latency: add --backend openvino)"
        ax.set_title(title, fontsize=10)
        h, lab = ax.get_legend_handles_labels()
        ax.legend(h + handles, lab + labels, fontsize=7, loc="lower right")
    fig.suptitle("ptq_eval --max-drop: tuning mAP and INT8 latency against the convs kept float")
    fig.savefig(path, dpi=110)
    return path


def _bisected(search: Search) -> list[TuneStep]:
    """A ``--max-drop`` search's bisection steps by K, without the convs ``--refine`` reverted alone."""
    return sorted((s for s in search.tune_steps if s.reverted is None), key=lambda s: s.k)


def plot_leave_one_out(
    sweeps: dict[str, dict[str, Any]], rankings: dict[str, Sequence[str]], path: Path, title: str, top: int = 5
) -> Path:
    """The leave-one-out ground truth, one panel per backend: the tuning mAP50-95 each conv wins back reverted alone
    (``LeaveOneOut.as_dict()`` of each backend), as bars in model order, the sweep's own top ``top`` black; above
    them a row of markers per ranking on its top ``top`` convs, labelled with how many of the sweep's top it found."""
    longest = max(len(sweep["rows"]) for sweep in sweeps.values())
    fig = Figure(figsize=(max(8.0, 2.5 + INCH_PER_LAYER * longest), 1.5 + 3.6 * len(sweeps)), layout="constrained")
    axes = fig.subplots(len(sweeps), 1, squeeze=False)[:, 0]
    for ax, (backend, sweep) in zip(axes, sweeps.items(), strict=True):
        names = [row["name"] for row in sweep["rows"]]
        gains = [row["gain"] for row in sweep["rows"]]
        best = set(sorted(names, key=lambda n: (-gains[names.index(n)], names.index(n)))[:top])
        ax.bar(range(len(names)), gains, 0.8, color=["black" if n in best else "C7" for n in names])
        ax.axhline(0, color="black", linewidth=0.6)
        high = max(max(gains), 0.0) or 1.0  # the marker rows sit above the highest bar
        for k, (name, ranking) in enumerate(rankings.items()):
            picked = [names.index(n) for n in ranking[:top] if n in names]
            found = len(best & set(ranking[:top]))
            ax.plot(
                picked,
                [high * (1.1 + 0.12 * k)] * len(picked),
                "v",
                color=f"C{k}",
                markersize=7,
                markeredgecolor="black",
                label=f"{name}: its top {top} ({found}/{top} of the sweep's)",
            )
        ax.set_ylim(top=high * (1.15 + 0.12 * len(rankings)))
        _layer_axis(ax, names)
        ax.set_ylabel("tuning mAP50-95 gained\nreverting this conv alone")
        fp32 = "" if sweep.get("fp32_tune_map50_95") is None else f", FP32 {sweep['fp32_tune_map50_95']:.2f}"
        ax.set_title(
            f"{backend}: fully INT8 {sweep['int8_tune_map50_95']:.2f}{fp32} on {sweep['tune_images']} tuning "
            f"images; black bars: the sweep's top {top} (ties in model order)",
            fontsize=10,
        )
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the panel, never over a marker
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path
