"""The embedded demo: a synthetic dataset and two briefly trained detectors (QARep and its RepVGG twin).

``tools/ptq_eval.py`` with no ``--weights`` and no ``--data`` runs this, then compares FP32 and INT8, so anyone
can see the whole pipeline on a CPU in minutes with nothing downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qarep_det.data.synthetic import make_dataset
from qarep_det.integrations.trainer import TrainOptions, train

MODEL_YAMLS = Path(__file__).resolve().parents[1] / "model_yamls"


@dataclass(frozen=True)
class DemoSettings:
    """Small enough for a 2-core CPU in minutes, large enough for non-trivial mAP."""

    train_images: int = 256
    val_images: int = 64
    imgsz: int = 128
    epochs: int = 10
    batch: int = 16
    seed: int = 0
    models: tuple[str, ...] = ("yolo_qarep_n", "yolo_repvgg_n")


def run_demo(work_dir: Path, settings: DemoSettings = DemoSettings()) -> tuple[Path, list[Path]]:
    """Generate the dataset and train each demo model; returns the data YAML and the best checkpoints."""
    data = make_dataset(
        work_dir / "data", settings.train_images, settings.val_images, settings.imgsz, settings.seed, overwrite=True
    )
    weights = []
    for name in settings.models:
        cfg = MODEL_YAMLS / f"{name}.yaml"
        if not cfg.is_file():  # model_yamls/ ships beside the package in a source checkout
            raise FileNotFoundError(f"demo model YAML '{cfg}' not found; run the demo from a source checkout")
        options = TrainOptions(
            cfg=cfg,
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
        )
        weights.append(Path(train(options).best))
    return data, weights
