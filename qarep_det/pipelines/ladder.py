"""The QARepVGG paper's ablation ladder (Chu et al., AAAI 2024, Table 5) on one's own data: train every step with
several seeds, score FP32 against INT8, read the paper's two diagnoses, summarise per step over the seeds.

The steps are the n-scale YAMLs that differ only in the block (README, Modules): S0 RepVGG with its custom L2, S1
RepVGG with plain weight decay, S2 without the identity BN, S3 also without the 1x1's BN, S4 QARepVGG (S3 with the
post-BN); ``groups=4`` takes their ``_g4`` twins. Every (step, seed) is trained with the project's trainer
(:func:`qarep_det.ultralytics.trainer.train`, Ultralytics' ``seed`` and ``deterministic``), its last checkpoint is
scored by the ptq-eval pipeline (:func:`qarep_det.pipelines.ptq.run_ptq_eval`, one recipe, every backend), and read:

- C1, the weights (:mod:`qarep_det.sensitivity.diagnostics`): per BN branch the largest ``|gamma| / sqrt(var + eps)``
  over the model and per block, how many BNs of each branch have a dead channel and how many channels are dead, the
  fused kernels' largest max / median and the largest share of a channel's weights INT8 rounds to zero;
- C2, the activations: each Rep block's output variance and max / std on the first ``activation_images`` of the
  calibration draw, read on the fused model (the one INT8 quantizes; the training form gives the same up to rounding).

A study lives in one folder and resumes there: a (step, seed) whose training wrote its marker is not trained again,
one whose row was written is not evaluated again, and a training interrupted after an epoch continues from its
``last.pt`` (Ultralytics' resume). New steps or seeds join an existing study; other settings are refused, since the
summary would then mix two studies.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from qarep_det.checks import check_count, check_imgsz
from qarep_det.device import cpu_info, torch_device
from qarep_det.errors import InputError
from qarep_det.evaluation.coco import GroundTruth, load_ground_truth, per_image_map50_95
from qarep_det.evaluation.ladder_report import plot_ladder, write_markdown
from qarep_det.models import model_yaml
from qarep_det.pipelines.ptq import PTQSettings, run_ptq_eval
from qarep_det.quant.calibration import calibration_set
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.reparam import reparameterize_model
from qarep_det.sensitivity.diagnostics import block_outputs, bn_scales, fused_kernels
from qarep_det.sensitivity.resolution import Resolution
from qarep_det.ultralytics.checkpoint import load_detector
from qarep_det.ultralytics.run_options import (
    TrainOptions,
    check_dataset,
    check_model_cfg,
    check_run_settings,
    load_hyp,
    train_device,
)
from qarep_det.ultralytics.trainer import train


@dataclass(frozen=True)
class LadderStep:
    """One row of the paper's ladder: the model YAML's stem (``_n.yaml`` or ``_g4_n.yaml`` appended), its L2."""

    name: str
    stem: str
    rep_l2: str
    what: str

    def cfg(self, groups: int) -> str:
        """The shipped n-scale YAML of this step with ``groups`` in its Rep blocks (1 or 4)."""
        return f"{self.stem}{'_g4' if groups == 4 else ''}_n.yaml"


STEPS: dict[str, LadderStep] = {
    step.name: step
    for step in (
        LadderStep("S0", "yolo_repvgg", "custom", "RepVGG, its custom L2"),
        LadderStep("S1", "yolo_repvgg", "plain", "RepVGG, plain weight decay"),
        LadderStep("S2", "yolo_repvgg_noidbn", "plain", "S1 without the identity BN"),
        LadderStep("S3", "yolo_qarep_nopostbn", "plain", "S2 without the 1x1's BN"),
        LadderStep("S4", "yolo_qarep", "plain", "QARepVGG: S3 with the post-BN"),
    )
}
"""The ladder by the names of the paper's table."""
GROUPS = (1, 4)
STUDY_HYP: dict[str, Any] = {
    "deterministic": True,  # Ultralytics' default, stated: a seed must reproduce its run
    "plots": False,
    # The val split is what INT8 is scored on: picking best.pt by val mAP would select on it. The last epoch is
    # scored, and the per-epoch validation that would pick a best one is skipped (Ultralytics still validates the
    # final epoch).
    "val": False,
}
"""Ultralytics settings every training of a study takes; ``hyp`` may override them."""
TRAIN_MARKER = "ladder_train.json"  # written in a run folder when its training finished
ROW_FILE = "ladder_row.json"  # the (step, seed)'s finished row: its evaluation is done
C1_TRACE = "ladder_c1_by_epoch.json"  # C1 of the training model after each epoch: how the outliers grow
STUDY_FILE = "study.json"  # the settings that make a folder one study
PINNED = (
    "data",
    "groups",
    "epochs",
    "imgsz",
    "batch",
    "hyp",
    "calib_images",
    "calib_method",
    "backends",
    "eval_batch",
    "activation_images",
)
"""Settings a resumed study must share with the folder's (steps and seeds may grow; device and workers may change)."""


@dataclass(frozen=True)
class LadderSettings:
    """Everything a ladder study depends on; checked on construction (the data set when the study starts)."""

    data: Path
    steps: tuple[str, ...] = tuple(STEPS)
    groups: int = 1
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 300
    imgsz: int = 640
    batch: int = 32
    device: str = "auto"
    workers: int = 8
    hyp: Mapping[str, Any] | Path | None = None  # extra Ultralytics train settings, as train's --hyp
    calib_images: int = 512
    calib_method: str = "max"
    backends: tuple[str, ...] = ("torch",)
    eval_batch: int = 8
    activation_images: int = 8  # C2: the first images of the calibration draw

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        object.__setattr__(self, "backends", tuple(self.backends))
        if not self.steps:
            raise InputError("give at least one step", field="steps")
        if unknown := [s for s in self.steps if s not in STEPS]:
            raise InputError(f"unknown step {unknown[0]!r}; choose from {', '.join(STEPS)}", field="steps")
        if len(set(self.steps)) < len(self.steps):
            raise InputError("a step is listed twice", field="steps")
        if self.groups not in GROUPS:
            raise InputError(f"must be one of {', '.join(map(str, GROUPS))}, got {self.groups!r}", field="groups")
        if not self.seeds:
            raise InputError("give at least one seed", field="seeds")
        for seed in self.seeds:
            check_count("seed", seed, 0)
        if len(set(self.seeds)) < len(self.seeds):
            raise InputError("a seed is listed twice", field="seeds")
        check_count("activation_images", self.activation_images)
        if self.activation_images > self.calib_images:
            raise InputError(
                f"at most calib_images ({self.calib_images}): they are the first of the calibration "
                f"draw, got {self.activation_images}",
                field="activation_images",
            )
        check_imgsz(self.imgsz)

    @property
    def ptq(self) -> PTQSettings:
        """The ptq-eval settings of every (step, seed): one recipe, its calibration draw the same for all."""
        recipe = QuantRecipe(calib_method=self.calib_method, calib_images=self.calib_images)
        return PTQSettings(
            Path(self.data),
            recipe=recipe,
            backends=self.backends,
            imgsz=self.imgsz,
            batch=self.eval_batch,
            device=str(torch_device(self.device, first=True)),
            save_int8=False,
            overwrite=True,
        )

    def options(self, step: str, seed: int, project: Path) -> TrainOptions:
        """The training run of ``step`` with ``seed``, in ``project/<step>_seed<seed>``."""
        return TrainOptions(
            cfg=model_yaml(STEPS[step].cfg(self.groups)),
            data=Path(self.data),
            epochs=self.epochs,
            imgsz=self.imgsz,
            batch=self.batch,
            device=self.device,
            workers=self.workers,
            project=project,
            name=run_name(step, seed),
            exist_ok=True,
            seed=seed,
            hyp={**STUDY_HYP, **load_hyp(self.hyp)},
            rep_l2=STEPS[step].rep_l2,
        )

    def pinned(self) -> dict[str, Any]:
        """The settings a folder's study is bound to, as JSON values (paths resolved)."""
        values = {k: _json(getattr(self, k)) for k in PINNED}
        return {**values, "data": str(Path(self.data).resolve()), "hyp": load_hyp(self.hyp)}

    def to_dict(self) -> dict[str, Any]:
        """Every setting as JSON, the device as resolved on this machine ('auto' -> '0' or 'cpu')."""
        return {**{k: _json(v) for k, v in asdict(self).items()}, **self.pinned(), "device": train_device(self.device)}


def _json(value: Any) -> Any:
    """A settings value as JSON: tuples as lists, paths as strings."""
    if isinstance(value, tuple):
        return list(value)
    return str(value) if isinstance(value, Path) else value


def run_name(step: str, seed: int) -> str:
    return f"{step}_seed{seed}"


def machine(device: torch.device) -> dict[str, Any]:
    """Where the study ran: the CPU's model name (``/proc/cpuinfo``, else ``platform.processor()``), the CUDA device's
    name when it ran on one, and the versions its numbers depend on."""
    import ultralytics

    return {
        "cpu": cpu_info().name,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ultralytics": ultralytics.__version__,
    }


# ---------------------------------------------------------------------------------------------------------------
# Summaries over seeds


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean over seeds and its standard error ``stdev / sqrt(n)`` (sample stdev; None for one seed), n and the
    values."""
    values = [float(v) for v in values]
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "se": se, "n": len(values), "values": values}


def mean_leaves(trees: Sequence[Any]) -> Any:
    """The mean over ``trees`` (one per seed) of every number at the same place in nested dicts; keys some trees
    lack and non-numbers are left out, a non-finite value makes its mean None."""
    first = trees[0]
    if isinstance(first, Mapping):
        keys = [k for k in first if all(isinstance(t, Mapping) and k in t for t in trees)]
        means = {k: mean_leaves([t[k] for t in trees]) for k in keys}
        return {k: v for k, v in means.items() if v is not _SKIP}
    if all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in trees):
        return statistics.fmean(trees) if all(math.isfinite(t) for t in trees) else None
    return _SKIP


_SKIP = object()


def _mean_known(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are known (a one-image val split has no image-level standard error)."""
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def summarize(step: str, groups: int, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A step's summary over its seeds' rows: per backend FP32 and INT8 mAP50-95 and the drop as :func:`spread`,
    the mean image-level standard error of the drop; each BN branch's largest scale as :func:`spread` (the plot's
    error bars); C1 and C2 figures averaged over seeds; wall times summed."""
    backends = list(rows[0]["backends"])
    return {
        "step": step,
        "model": STEPS[step].cfg(groups),
        "rep_l2": STEPS[step].rep_l2,
        "what": STEPS[step].what,
        "seeds": [row["seed"] for row in rows],
        "backends": {
            backend: {
                **{
                    key: spread([row["backends"][backend][key] for row in rows])
                    for key in ("fp32_map50_95", "int8_map50_95", "drop")
                },
                "image_drop_se": _mean_known(row["backends"][backend]["image_drop_se"] for row in rows),
            }
            for backend in backends
        },
        "bn_scale_max": {
            branch: spread([row["c1"]["bn_scale_max"][branch] for row in rows])
            for branch in rows[0]["c1"]["bn_scale_max"]
        },
        "c1": mean_leaves([row["c1"] for row in rows]),
        "c2": mean_leaves([row["c2"] for row in rows]),
        "c1_by_epoch": trace_means([row["c1_by_epoch"] for row in rows if row.get("c1_by_epoch")]),
        "train_s": sum(row["train_s"] for row in rows),
        "eval_s": sum(row["eval_s"] for row in rows),
        "wall_s": sum(row["train_s"] + row["eval_s"] for row in rows),
    }


# ---------------------------------------------------------------------------------------------------------------
# C1 and C2 of one trained model


def c1_figures(model: torch.nn.Module) -> dict[str, Any]:
    """The paper's C1 on the training form: BN scales per branch (model max and per block), BNs with dead channels
    and dead channels per branch, the fused kernels' largest max / median (whole kernel and worst channel) and INT8
    zero share."""
    bns, kernels = bn_scales(model), fused_kernels(model)
    branches = list(dict.fromkeys(row.branch for row in bns))
    by_block: dict[str, dict[str, float]] = {}
    for row in bns:
        by_block.setdefault(row.block, {})[row.branch] = row.max
    return {
        "bn_scale_max": {b: max(r.max for r in bns if r.branch == b) for b in branches},
        "bn_scale_max_by_block": by_block,
        "bns_with_dead_channels": {b: sum(r.dead_channels > 0 for r in bns if r.branch == b) for b in branches},
        "dead_channels": {b: sum(r.dead_channels for r in bns if r.branch == b) for b in branches},
        "kernel_max_to_median": max(k.max_to_median for k in kernels),
        "kernel_channel_max_to_median": max(k.channel_max_to_median for k in kernels),
        "zero_share_max": max(k.zero_share_max for k in kernels),
    }


def c2_figures(fused: torch.nn.Module, batches: Sequence[torch.Tensor]) -> dict[str, Any]:
    """The paper's C2 on the fused model: each Rep block's output variance and max / std, and their largest."""
    rows = block_outputs(fused, batches)
    return {
        "variance_max": max(r.variance for r in rows),
        "max_to_std_max": max(r.max_to_std for r in rows),
        "by_block": {r.block: {"variance": r.variance, "max_to_std": r.max_to_std} for r in rows},
    }


def c1_trace(path: Path) -> Callable[[Any], None]:
    """An Ultralytics ``on_fit_epoch_end`` callback that adds, after each epoch, the largest BN scale per branch and
    the fused kernels' largest max / median of the model the checkpoint saves (the EMA) to the JSON at ``path``,
    keyed by the epochs done; a resumed training adds to it. This is what says at which length RepVGG's singular
    identity-BN scales appear, and how fast they grow where they have not yet."""

    def record(trainer: Any) -> None:
        if int(os.environ.get("RANK", -1)) > 0:
            return  # DDP (torch.distributed sets RANK, as Ultralytics reads it): the first process writes
        if trainer.epoch + 1 > trainer.epochs:
            return  # the final validation's call, made with the epoch counter one past the last epoch
        model = trainer.ema.ema if getattr(trainer, "ema", None) is not None else trainer.model
        figures = c1_figures(model)
        trace = _read_json(path) if path.is_file() else {}
        trace[str(trainer.epoch + 1)] = {key: figures[key] for key in TRACED}
        _write_json(path, trace)

    return record


TRACED = ("bn_scale_max", "dead_channels", "kernel_max_to_median")
"""The C1 figures traced per epoch."""


def trace_means(traces: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per epoch that every seed's trace has, the mean over seeds of each traced figure (:func:`mean_leaves`)."""
    epochs = [e for e in traces[0] if all(e in t for t in traces)] if traces else []
    return {e: mean_leaves([t[e] for t in traces]) for e in sorted(epochs, key=int)}


# ---------------------------------------------------------------------------------------------------------------
# One (step, seed): train, evaluate, read


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, value: Any) -> Path:
    """Write JSON atomically (a marker is never half there); non-finite floats become null."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite(value), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def resumable(last: Path, epochs: int) -> bool:
    """Whether ``last`` is an interrupted training of ``epochs`` epochs that Ultralytics can continue: it holds the
    optimizer and an epoch before the last (a finished run's checkpoint is stripped of both)."""
    if not last.is_file():
        return False
    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
    except Exception:  # a checkpoint cut short by the interruption: train again
        return False
    if not isinstance(ckpt, dict) or ckpt.get("optimizer") is None:
        return False
    epoch, args = ckpt.get("epoch", -1), ckpt.get("train_args") or {}
    return args.get("epochs") == epochs and 0 <= epoch < epochs - 1


def train_run(settings: LadderSettings, step: str, seed: int, project: Path) -> dict[str, Any]:
    """Train ``step`` with ``seed`` unless its marker says it finished; returns the marker (``train_s``: the wall time
    of the session that finished it, ``resumed``: whether that session continued an interrupted one)."""
    run = project / run_name(step, seed)
    marker = run / TRAIN_MARKER
    if marker.is_file():
        return _read_json(marker)
    (run / ROW_FILE).unlink(missing_ok=True)  # a row of an earlier model of this run is stale
    options = settings.options(step, seed, project)
    last = run / "weights" / "last.pt"
    resumed = resumable(last, settings.epochs)
    if resumed:
        options = TrainOptions(resume=last, device=settings.device, workers=settings.workers)
    elif run.exists():
        shutil.rmtree(run)  # the start of a run that saved no epoch: start it again
    print(f"ladder: {'resuming' if resumed else 'training'} {step} seed {seed} -> {run}", flush=True)
    start = time.perf_counter()
    trainer = train(options, callbacks={"on_fit_epoch_end": [c1_trace(run / C1_TRACE)]})
    done = {
        "train_s": time.perf_counter() - start,
        "resumed": resumed,
        "epochs": settings.epochs,
        "weights": str(Path(trainer.last).resolve()),
    }
    _write_json(marker, done)
    return done


def _image_drop_se(fp32: Sequence[float], int8: Sequence[float]) -> float | None:
    """The paired standard error of a drop from its per-image AP (:mod:`qarep_det.sensitivity.resolution`); None for
    a one-image val split."""
    return Resolution.paired(fp32, int8).standard_error if len(fp32) > 1 else None


def evaluate_run(
    settings: LadderSettings, run: Path, ground_truth: GroundTruth, progress: bool
) -> tuple[dict[str, Any], float]:
    """FP32 against INT8 on every backend (ptq-eval of ``run``'s last.pt into ``run/eval``) with the image-level
    standard error of each drop, and C1 / C2; returns the per-backend figures with C1 and C2, and the seconds it
    took."""
    start = time.perf_counter()
    ptq, weights = settings.ptq, run / "weights" / "last.pt"
    rows, _, _ = run_ptq_eval([weights], ptq, run / "eval", progress=progress)
    name = rows[0].model  # the run folder's name, which the prediction files carry
    fp32_images = per_image_map50_95(ground_truth, run / "eval" / f"{name}_fp32.json")
    backends = {}
    for row in rows:
        int8_images = per_image_map50_95(ground_truth, run / "eval" / f"{name}_int8_{row.backend}.json")
        backends[row.backend] = {
            "fp32_map50_95": row.fp32_map50_95,
            "int8_map50_95": row.int8_map50_95,
            "drop": row.drop,
            "fp32_map50": row.fp32_map50,
            "int8_map50": row.int8_map50,
            "image_drop_se": _image_drop_se(fp32_images, int8_images),
            "images": len(fp32_images),
        }
    model = load_detector(weights)
    fused = reparameterize_model(model).to(ptq.device)
    batches = calibration_set(
        settings.data,
        settings.imgsz,
        n=settings.activation_images,
        seed=ptq.recipe.seed,
        batch_size=settings.eval_batch,
        progress=False,
    )
    figures = {"backends": backends, "c1": c1_figures(model), "c2": c2_figures(fused, batches)}
    return figures, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------------
# The study


@dataclass
class LadderResult:
    """What a study wrote: ``ladder.json`` (the whole study), ``ladder.md`` and ``ladder.png``; the JSON's dict."""

    json_path: Path
    md_path: Path
    png_path: Path
    study: dict[str, Any] = field(repr=False)


def check_study(settings: LadderSettings, out: Path) -> None:
    """Everything checkable before anything is written: the data set and every label, the run settings, every
    step's model on this data (S0's custom L2 included), the ptq-eval settings, and that ``out`` holds no study of
    other settings."""
    data = check_dataset(Path(settings.data), single_cls=bool(load_hyp(settings.hyp).get("single_cls")))
    check_run_settings(settings.options(settings.steps[0], settings.seeds[0], out))
    for step in settings.steps:
        check_model_cfg(model_yaml(STEPS[step].cfg(settings.groups)), data, STEPS[step].rep_l2)
    _ = settings.ptq  # its construction checks the backends and the evaluation device
    study = out / STUDY_FILE
    if study.is_file():
        theirs, ours = _read_json(study), _json_round_trip(settings.pinned())
        if differ := [k for k in PINNED if theirs.get(k) != ours.get(k)]:
            key = differ[0]
            raise InputError(
                f"'{out}' holds a study with {key} {theirs.get(key)!r}, not {ours.get(key)!r}: give "
                "another --out, or the same settings to resume it",
                field="out",
            )


def _json_round_trip(value: Any) -> Any:
    return json.loads(json.dumps(_finite(value)))


def run_ladder(
    settings: LadderSettings,
    out: str | os.PathLike,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> LadderResult:
    """Run (or resume) the study in ``out``: every (step, seed) trained and evaluated unless done before; writes
    ``ladder.json``, ``ladder.md`` and ``ladder.png`` there. ``on_row`` sees each (step, seed)'s row when it is
    ready (the CLI prints a line)."""
    out = Path(out)
    check_study(settings, out)
    ground_truth = load_ground_truth(settings.data)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / STUDY_FILE, settings.pinned())
    project = out / "runs"
    rows = []
    for step in settings.steps:
        for seed in settings.seeds:
            run = project / run_name(step, seed)
            trained = train_run(settings, step, seed, project)
            row_file = run / ROW_FILE
            if row_file.is_file():
                row = _read_json(row_file)
            else:
                figures, eval_s = evaluate_run(settings, run, ground_truth, progress)
                row = {
                    "step": step,
                    "seed": seed,
                    "model": STEPS[step].cfg(settings.groups),
                    "rep_l2": STEPS[step].rep_l2,
                    "run": str(run.relative_to(out)),
                    **trained,
                    "eval_s": eval_s,
                    **figures,
                }
                _write_json(row_file, row)
            if (trace := run / C1_TRACE).is_file():  # read apart from the row: a study run before it was traced
                row = {**row, "c1_by_epoch": _read_json(trace)}
            rows.append(row)
            if on_row is not None:
                on_row(row)
    device = torch_device(settings.device, first=True)
    ptq = settings.ptq
    study = {
        "tool": "qarep-det ladder",
        "settings": settings.to_dict(),
        "recipe": ptq.recipe.describe(),
        "protocol": ptq.protocol.describe(),
        "machine": machine(device),
        "steps": [summarize(step, settings.groups, [r for r in rows if r["step"] == step]) for step in settings.steps],
        "seeds": list(settings.seeds),
        "runs": rows,
    }
    study = _json_round_trip(study)
    json_path = _write_json(out / "ladder.json", study)
    md_path = write_markdown(study, out / "ladder.md")
    png_path = plot_ladder(study, out / "ladder.png")
    return LadderResult(json_path, md_path, png_path, study)
