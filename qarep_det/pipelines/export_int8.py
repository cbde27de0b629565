"""``export --int8``: the INT8 model ptq_eval scores on one backend, written where and as Ultralytics loads it.

The model is made by ptq_eval's own steps (:func:`qarep_det.pipelines.ptq.backend_jobs`: the same calibration draw,
recipe, ranking, ``keep_float`` or ``max_drop`` search, and the backend's quantize step), so with the same settings
the file written is the model ptq_eval scored. Before that, as the FP32 export does, the fused model is checked
against the trained one on the data's val images. Everything is checked before the first model runs, and the
artefact is written beside the checkpoint only once it is complete (:func:`qarep_det.ultralytics.int8_export.staged`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from qarep_det.data.dataset import resolve_dataset
from qarep_det.data.images import list_images
from qarep_det.errors import InputError
from qarep_det.pipelines.ptq import Choice, PTQSettings, backend_jobs, calibration_and_tuning, load_checked
from qarep_det.reparam import OutputDifference
from qarep_det.ultralytics.checkpoint import checkpoint_paths, load_detector
from qarep_det.ultralytics.export import check_fusion, check_images
from qarep_det.ultralytics.int8_export import export_contract, int8_writer, staged


@dataclass(frozen=True)
class Int8Export:
    """What ``export --int8`` wrote and how its model was chosen."""

    path: Path
    backend: str  # the ptq_eval backend whose INT8 model this is
    fusion: OutputDifference  # fused against trained, on the val images
    float_layers: tuple[str, ...]  # the convs kept float (by name, by keep_float, or by max_drop's search)
    choice: Choice  # the ranking and search ptq_eval's row would carry (None without them)


def export_int8(
    weights: str | os.PathLike,
    fmt: str,
    settings: PTQSettings,
    *,
    backend: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Int8Export:
    """Write the INT8 model of ``backend`` (None: the backend that writes ``fmt``) for the checkpoint ``weights`` as
    ``fmt``, beside it: ``<stem>_int8_openvino_model/`` or ``<stem>_int8_qdq.onnx``.

    ``settings`` are ptq_eval's (``data``: its train split calibrates, its val images check the fusion); with the
    same settings ``ptq_eval`` scores exactly this model. Bad input fails in one line before any model runs: an
    existing artefact without ``overwrite``, a format without an INT8 writer, missing weights or data, no train
    images, float convs the model does not have, a QAT checkpoint.
    """
    backend, writer = int8_writer(fmt, backend)
    settings = replace(settings, backends=(backend,), save_int8=False)  # checked again, for this backend
    (path,) = checkpoint_paths([weights])
    target = writer.path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"'{target}' exists; pass overwrite=True (--overwrite) to replace it")
    checkpoint = load_checked(path, settings)
    if checkpoint.student is not None:
        raise InputError(
            f"'{path}' is a QAT checkpoint: its INT8 model was fixed by its training; export it with "
            f"Ultralytics' exporter (qarep-det yolo export model={path} format=onnx)"
        )
    scored = list_images(resolve_dataset(settings.data)["val"]) if settings.max_drop is not None else []
    calib, tuning = calibration_and_tuning(settings, scored, progress)
    fusion = check_fusion(load_detector(path), checkpoint.fused, check_images(settings.data), settings.imgsz)
    contract = export_contract(checkpoint.fused, writer.format, settings.imgsz, settings.data)
    with tempfile.TemporaryDirectory(prefix="qarep_export_") as scratch, staged(target, overwrite) as out:
        jobs = backend_jobs(
            checkpoint,
            settings,
            calib,
            stem=Path(scratch) / checkpoint.name,
            scratch=Path(scratch),
            progress=progress,
            tuning=tuning,
        )
        _, job, choice = next(jobs)
        writer.write(job, contract, out)
    return Int8Export(path=target, backend=backend, fusion=fusion, float_layers=job.recipe.float_layers, choice=choice)
