"""The embedded demo: a synthetic dataset and two briefly trained detectors (QARep and its RepVGG twin).

``qarep-det ptq-eval`` (or ``tools/ptq_eval.py``) with no ``--weights`` and no ``--data`` runs this, then compares
FP32 and INT8, so anyone can see the whole pipeline on a CPU in minutes with nothing downloaded. The models are the
shipped YAMLs, so the demo runs from an installed wheel in any folder.

The two models train side by side, one process each: Ultralytics trains on the CPU with ``cpu_count - 1`` threads
and loads data in the training process, so one run leaves one of two cores idle. Each run writes its console
output to ``train/<model>.log``; the demo shows one progress bar over the epochs of both.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm
from ultralytics.nn.tasks import DetectionModel

from qarep_det.data.synthetic import CLASS_NAMES, make_dataset
from qarep_det.models import model_yaml
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.scope import check_partial
from qarep_det.reparam import reparameterize_model
from qarep_det.ultralytics.run_options import TrainOptions
from qarep_det.ultralytics.trainer import train


@dataclass(frozen=True)
class DemoSettings:
    """Small enough for a 2-core CPU in minutes, large enough for non-trivial mAP.

    Ultralytics trains on one thread on a 2-core CPU, so the demo buys optimizer steps: small images, batch 8 with no
    gradient accumulation (Ultralytics would otherwise accumulate up to 64 images per step, leaving a few dozen steps
    in the whole run), AdamW instead of the recipe's SGD, and a short warmup: with the recipe, a run this short left
    both models near 0 mAP50-95. The runs behind these choices: docs/results.md, The demo.
    """

    train_images: int = 512
    val_images: int = 64
    imgsz: int = 96
    epochs: int = 6
    batch: int = 8
    seed: int = 0
    calib_images: int = 64  # ptq_eval's calibration in the demo
    models: tuple[str, ...] = ("yolo_qarep_n", "yolo_repvgg_n")
    # Adam's step size does not scale with the gradient, so a few hundred small steps from scratch get somewhere;
    # SGD at the recipe's lr0 stayed near 0 mAP50-95 in the same steps.
    optimizer: str = "AdamW"
    lr0: float = 0.002  # half and double did worse
    warmup_epochs: float = 0.5  # the recipe's 3 would be half of this run
    mosaic: float = 0.0  # stated: the recipe's close_mosaic (last 15 epochs) already kept it off in a run this short


def _train_logged(options: TrainOptions, log: Path) -> Path:
    """Train in this (worker) process with its console output sent to ``log``; returns the last checkpoint.

    The redirection is at the file-descriptor level because Ultralytics' logger holds the original stdout.
    """
    with open(log, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        return Path(train(options).last)


def _epochs_done(run: Path) -> int:
    """Epochs a run has finished so far, from its results.csv (one row per epoch)."""
    try:
        with open(run / "results.csv", newline="") as f:
            return sum(1 for _ in csv.DictReader(f))
    except OSError:
        return 0


def check_demo(settings: DemoSettings, recipe: QuantRecipe, keep_float: int = 0) -> None:
    """Everything about the demo that can be checked before it writes its dataset and trains: its model YAMLs
    exist and the partial-quantization choice fits them (on untrained models of the same structure)."""
    for name in settings.models:
        model = DetectionModel(str(model_yaml(name)), nc=len(CLASS_NAMES), verbose=False)
        check_partial(reparameterize_model(model), recipe, keep_float)


def run_demo(work_dir: Path, settings: DemoSettings = DemoSettings()) -> tuple[Path, list[Path]]:
    """Generate the dataset and train the demo models side by side; returns the data YAML and the last checkpoints."""
    data = make_dataset(
        work_dir / "data", settings.train_images, settings.val_images, settings.imgsz, settings.seed, overwrite=True
    )
    runs = {}
    for name in settings.models:
        runs[name] = TrainOptions(
            cfg=model_yaml(name),
            data=data,
            epochs=settings.epochs,
            imgsz=settings.imgsz,
            batch=settings.batch,
            device="cpu",
            workers=0,
            project=work_dir / "train",
            name=name,
            exist_ok=True,
            seed=settings.seed,
            hyp={
                "optimizer": settings.optimizer,
                "lr0": settings.lr0,
                "warmup_epochs": settings.warmup_epochs,
                "mosaic": settings.mosaic,
                "nbs": settings.batch,  # nominal batch = batch: one optimizer step per batch, no accumulation
                "plots": False,  # the demo reports a table; label, batch and curve plots cost seconds per model
                # The val split is what ptq_eval scores: choosing best.pt by val mAP would select on it. So the last
                # epoch is evaluated, and the per-epoch validation that would pick a best one is skipped (Ultralytics
                # still validates the final epoch).
                "val": False,
            },
        )
    logs = work_dir / "train"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"training {', '.join(runs)} side by side (logs: {logs}/<model>.log)")
    spawn = multiprocessing.get_context("spawn")  # a clean interpreter each: no inherited threads or state
    with ProcessPoolExecutor(len(runs), mp_context=spawn) as pool:
        jobs = [pool.submit(_train_logged, options, logs / f"{name}.log") for name, options in runs.items()]
        with tqdm(total=settings.epochs * len(runs), desc="training", unit="epoch") as bar:
            finished = False
            while not finished:
                finished = not wait(jobs, timeout=1.0).not_done  # checked first, so the count below is final
                bar.update(sum(_epochs_done(logs / name) for name in runs) - bar.n)
        weights = [job.result() for job in jobs]  # re-raises a worker's error
    return data, weights
