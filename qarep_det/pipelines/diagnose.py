"""Where INT8 accuracy goes, per model: the library behind ``tools/diagnose.py``.

For each checkpoint: load, read the BN scale factors of its training form, re-parameterize, and run the per-conv
analysis of :mod:`qarep_det.sensitivity.analysis` with ptq_eval's recipe and calibration draw. All models share one
calibration set. Outputs: ``report.json`` (the dict below), ``report.md`` (top 10 per model, and a side-by-side
summary for several models) and the PNGs of :mod:`qarep_det.evaluation.plots`, written together at the end so a
failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from qarep_det.checks import check_count, check_imgsz
from qarep_det.errors import InputError
from qarep_det.evaluation.plots import save_plots
from qarep_det.evaluation.table import markdown_table
from qarep_det.quant.calibration import CalibrationSet, first_images, recipe_calibration
from qarep_det.quant.qat import qat_student
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.reparam import reparameterize_model
from qarep_det.sensitivity.analysis import analyze
from qarep_det.sensitivity.diagnostics import BN_OUTLIER_FACTOR, block_outputs, bn_scales, fused_kernels
from qarep_det.ultralytics.checkpoint import checkpoint_paths, load_detector, model_name

TOP = 10
SQNR_NOTE = (
    "SQNR in dB against the fused FP32 model, signal and noise summed over all calibration images; null in "
    "report.json = no error (infinite SQNR). isolated: detector output with only this conv INT8, "
    "-10 log10 of the mean of the box and score relative noise powers; cumulative: the conv's output in the fully "
    "INT8 model (in: its input before its quantizer); added: the noise the conv adds itself there, its INT8 output "
    "against its float output on the same input."
)


@dataclass(frozen=True)
class DiagnoseSettings:
    """What a diagnosis depends on besides the checkpoints; stored in the report."""

    data: Path
    recipe: QuantRecipe = field(default_factory=lambda: QuantRecipe(calib_images=64))
    imgsz: int = 640
    batch: int = 8
    device: str = "cpu"
    rank_images: int | None = None  # analyse the first M calibration images only (None: all of them)

    def __post_init__(self) -> None:
        check_imgsz(self.imgsz)
        check_count("batch", self.batch)
        if self.rank_images is not None and check_count("rank_images", self.rank_images) > self.recipe.calib_images:
            raise InputError(
                f"rank_images ({self.rank_images}) cannot exceed calib_images ({self.recipe.calib_images}): the "
                "analysed images are the first of the calibration draw"
            )


def json_float(value: float) -> float | None:
    """None for inf and NaN, which JSON cannot hold (an infinite SQNR means no error)."""
    return value if math.isfinite(value) else None


def to_record(row: Any) -> dict[str, object]:
    """A dataclass row (a conv's analysis, a BN's scales) as a JSON-ready dict: non-finite floats become None."""
    return {k: json_float(v) if isinstance(v, float) else v for k, v in asdict(row).items()}


def diagnose_checkpoint(
    weights: Path, model: nn.Module, settings: DiagnoseSettings, calib: CalibrationSet, *, progress: bool = True
) -> dict[str, Any]:
    """The report entry of one checkpoint (``model``: as loaded from ``weights``)."""
    scales = bn_scales(model)  # the training form: fusion removes every BN
    kernels = fused_kernels(model)  # C1 of the kernels deployed: the same on the training form as once fused
    fused = reparameterize_model(model)
    result = analyze(
        fused, calib, settings.recipe, device=settings.device, progress=progress, rank_images=settings.rank_images
    )
    outputs = block_outputs(fused, first_images(calib, settings.rank_images))  # C2 on the analysed images
    return {
        "model": model_name(weights),
        "weights": str(weights),
        "calib_images": result.images,
        "imgsz": settings.imgsz,
        "device": settings.device,
        "recipe": settings.recipe.to_dict(),
        "recipe_description": settings.recipe.describe(),
        "int8_output_sqnr_db": {k: json_float(v) for k, v in result.int8_output_sqnr_db.items()},
        "calibrate_s": round(result.calibrate_s, 1),
        "analyze_s": round(result.analyze_s, 1),
        "layers": [to_record(row) for row in result.layers],
        "bn_scales": [to_record(row) for row in scales],
        "bn_outlier_factor": BN_OUTLIER_FACTOR,
        "fused_kernels": [to_record(row) for row in kernels],
        "block_outputs": [to_record(row) for row in outputs],
        "ranking": result.ranking,
        "cumulative_ranking": result.cumulative_ranking,
    }


def _db(value: float | None) -> str:
    return "inf" if value is None else f"{value:.1f}"


def _in_out(r: dict[str, Any]) -> str:
    return f"{_db(r['cumulative_input_sqnr_db'])} -> {_db(r['cumulative_sqnr_db'])}"


# (header, cell) of the per-model tables; SQNRs in dB
LAYER_COLUMNS: dict[str, Callable[[dict[str, Any]], str]] = {
    "conv": lambda r: f"`{r['name']}`",
    "block": lambda r: f"{r['block']} ({r['block_type']})",
    "isolated": lambda r: _db(r["isolated_sqnr_db"]),
    "boxes": lambda r: _db(r["isolated_boxes_sqnr_db"]),
    "scores": lambda r: _db(r["isolated_scores_sqnr_db"]),
    "cumulative in -> out": _in_out,
    "added": lambda r: _db(r["cumulative_added_sqnr_db"]),
    "weight SQNR": lambda r: _db(r["weight_sqnr_db"]),
    "w max/median": lambda r: f"{r['weight_max_to_median']:.1f}",
    "act amax": lambda r: f"{r['act_amax']:.3g}",
    "act SQNR": lambda r: _db(r["act_sqnr_db"]),
}
ADDED_COLUMNS = ("conv", "added", "cumulative in -> out", "isolated", "weight SQNR", "act SQNR")


def _ranked(layers: dict[str, dict[str, Any]], ranking: Sequence[str], columns: Sequence[str]) -> list[str]:
    """The first TOP convs of a ranking as a table of ``columns``."""
    rows = [[str(i), *(LAYER_COLUMNS[c](layers[n]) for c in columns)] for i, n in enumerate(ranking[:TOP], 1)]
    return markdown_table(["#", *columns], rows)


def _model_section(m: dict[str, Any]) -> list[str]:
    """Top 10 by each ranking, and the BN scales, for one model."""
    layers = {row["name"]: row for row in m["layers"]}
    out = m["int8_output_sqnr_db"]
    return [
        f"## {m['model']}",
        "",
        f"`{m['weights']}`: {len(layers)} quantized convs, {m['calib_images']} calibration images at {m['imgsz']} px "
        f"({m['calibrate_s']:.0f} s calibration, {m['analyze_s']:.0f} s analysis on {m['device']}). Fully INT8 "
        f"output SQNR {_db(out['combined'])} dB (boxes {_db(out['boxes'])}, scores {_db(out['scores'])}).",
        "",
        f"Top {TOP} by isolated sensitivity (what `ptq_eval --keep-float K` keeps float):",
        "",
        *_ranked(layers, m["ranking"], list(LAYER_COLUMNS)),
        "",
        f"Top {TOP} by the noise each conv adds in the fully INT8 model:",
        "",
        *_ranked(layers, m["cumulative_ranking"], ADDED_COLUMNS),
        "",
        *_bn_section(m),
        *_kernel_section(m),
    ]


def _bn_section(m: dict[str, Any]) -> list[str]:
    if not m["bn_scales"]:
        return ["No BN scales: the checkpoint holds a fused model (no training-form BatchNorm left).", ""]
    outliers = [r for r in m["bn_scales"] if r["outlier"]]
    largest = sorted(m["bn_scales"], key=lambda r: -r["max"])[:TOP]
    rows = [
        [
            f"{r['block']} ({r['block_type']})",
            r["branch"],
            f"{r['max']:.3g}",
            f"{r['median']:.3g}",
            str(r["channel"]),
            str(r["outliers"]),
            str(r["dead_channels"]),
        ]
        for r in largest
    ]
    return [
        f"BN scale factors |gamma| / sqrt(var + eps) of the training form: {len(m['bn_scales'])} BNs, "
        f"{len(outliers)} with an outlier channel (> {m['bn_outlier_factor']:g}x its BN's median). Largest:",
        "",
        *markdown_table(["block", "branch", "max", "median", "max channel", "outlier channels", "dead channels"], rows),
        "",
        "Dead channels: channels whose BN output is zero after the ReLU for every input (beta <= 0 with a near-zero "
        "running variance); behind an identity BN they are the block's dead input channels, whose tiny variance makes "
        "gamma / sqrt(var + eps) singular (the QARepVGG paper's C1).",
        "",
    ]


def _kernel_section(m: dict[str, Any]) -> list[str]:
    """C1 of the deployed kernels and C2 of the block outputs, worst TOP blocks of each."""
    kernels, outputs = m.get("fused_kernels", []), m.get("block_outputs", [])
    if not kernels:
        return []
    worst = sorted(kernels, key=lambda r: -(r["max_to_median"] or math.inf))[:TOP]
    kernel_rows = [
        [
            f"{r['block']} ({r['block_type']})",
            _ratio(r["max_to_median"]),
            f"{_ratio(r['channel_max_to_median'])} (ch {r['channel']})",
            f"{r['zero_share_max']:.1%}",
            f"{r['zero_share_mean']:.1%}",
        ]
        for r in worst
    ]
    spread = sorted(outputs, key=lambda r: -(r["max_to_std"] or math.inf))[:TOP]
    output_rows = [
        [f"{r['block']} ({r['block_type']})", f"{r['variance']:.3g}", f"{r['max_abs']:.3g}", _ratio(r["max_to_std"])]
        for r in spread
    ]
    return [
        f"Fused kernels (C1, weights): the {len(kernels)} fused blocks' deployed kernels, the largest max / median "
        "|w| first. Zero share: per output channel, the share of weights that round to 0 at per-channel INT8 because "
        "one tap sets the channel's scale.",
        "",
        *markdown_table(["block", "max/median", "worst channel max/median", "zero share max", "mean"], kernel_rows),
        "",
        f"Block outputs (C2, activations) on the {m['calib_images']} analysed calibration images, after each Rep "
        "block's activation: per-tensor INT8 spends its range on the largest value, so max / std is how many standard "
        "deviations the typical value shares 127 levels with.",
        "",
        *markdown_table(["block", "variance", "max |x|", "max / std"], output_rows),
        "",
    ]


def _ratio(value: float | None) -> str:
    return "inf" if value is None else f"{value:.3g}"


def _summary(models: Sequence[dict[str, Any]]) -> list[str]:
    """One row per model, for comparing several side by side."""
    rows = []
    for m in models:
        layers = {row["name"]: row for row in m["layers"]}
        worst, added = layers[m["ranking"][0]], layers[m["cumulative_ranking"][0]]
        weights = [r["weight_sqnr_db"] for r in m["layers"] if r["weight_sqnr_db"] is not None]
        bn = max(m["bn_scales"], key=lambda r: r["max"], default=None)
        rows.append(
            [
                m["model"],
                _db(m["int8_output_sqnr_db"]["combined"]),
                f"`{worst['name']}` {_db(worst['isolated_sqnr_db'])}",
                f"`{added['name']}` {_db(added['cumulative_added_sqnr_db'])}",
                f"{min(weights):.1f}" if weights else "-",
                f"{max(r['weight_max_to_median'] for r in m['layers']):.0f}",
                f"{bn['max']:.3g} ({bn['block']} {bn['branch']})" if bn else "-",
                str(sum(r["outlier"] for r in m["bn_scales"])),
            ]
        )
    header = [
        "model",
        "INT8 output SQNR",
        "most harmful (isolated dB)",
        "most noise added (dB)",
        "min weight SQNR",
        "max w max/median",
        "max BN scale",
        "outlier BNs",
    ]
    return ["## Summary", "", *markdown_table(header, rows), ""]


def format_markdown(report: dict[str, Any], plots: Sequence[str] = ()) -> str:
    """report.md: the recipe, a summary when several models, each model's top 10, links to the plots."""
    models = report["models"]
    lines = ["# INT8 diagnosis", "", f"Recipe: {models[0]['recipe_description']}.", "", SQNR_NOTE, ""]
    if len(models) > 1:
        lines += _summary(models)
    for m in models:
        lines += _model_section(m)
    if plots:
        lines += ["## Plots", "", *(f"![{p}]({p})" for p in plots), ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """Write report.json, report.md and the plots into ``out_dir``, all or nothing: they are made in a temporary
    sibling folder and moved in only once every file exists. Refuses to replace files unless ``overwrite``."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-") as tmp:
        staging = Path(tmp)
        plots = [p.name for p in save_plots(report, staging)]
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (staging / "report.md").write_text(format_markdown(report, plots), encoding="utf-8")
        names = ["report.json", "report.md", *plots]
        if not overwrite and (existing := [n for n in names if (out_dir / n).exists()]):
            raise FileExistsError(f"'{out_dir / existing[0]}' exists; pass overwrite=True to replace it")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            os.replace(staging / name, out_dir / name)
    return [out_dir / n for n in names]


def run_diagnose(
    weights: Sequence[str | os.PathLike],
    settings: DiagnoseSettings,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[dict[str, Any], list[Path]]:
    """Diagnose every checkpoint on one calibration set; returns the report and the files written."""
    paths = checkpoint_paths(weights)
    recipe = settings.recipe
    calib = recipe_calibration(settings.data, settings.imgsz, recipe, batch_size=settings.batch, progress=progress)
    models = [load_detector(p) for p in paths]  # every checkpoint readable before minutes of analysis
    for path, model in zip(paths, models, strict=True):
        if qat_student(model) is not None:
            raise InputError(f"'{path}' is a QAT checkpoint; diagnose the FP32 checkpoint its training started from")
    entries = [
        diagnose_checkpoint(p, m, settings, calib, progress=progress) for p, m in zip(paths, models, strict=True)
    ]
    report = {"models": entries}
    return report, write_report(report, out_dir, overwrite)
