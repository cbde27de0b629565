"""Run any detector ("runner") over a split and stream its detections into a COCO results json.

A runner is the one interface the FP32 torch model, the simulated-INT8 model and compiled runtimes share, so all of
them are scored by the same pre- and post-processing. Memory stays bounded for any split size: one batch is loaded
in a background thread while the previous one runs, and detections go to disk image by image.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision  # noqa: F401  (see below)
from tqdm import tqdm
from ultralytics.utils.nms import non_max_suppression
from ultralytics.utils.ops import scale_boxes, xyxy2ltwh

from qarep_det.data.images import load_letterboxed
from qarep_det.evaluation.coco import GroundTruth, evaluate_coco
from qarep_det.evaluation.protocol import EvalProtocol
from qarep_det.quant.runner import Runner, first_output

RatioPad = tuple[tuple[float, float], tuple[float, float]]


@dataclass(frozen=True)
class PredictStats:
    """What one prediction pass did; ``runner_ms`` is the median over batches of (runner call time / batch size)."""

    images: int
    detections: int
    runner_ms: float
    wall_s: float
    batch: int
    protocol: EvalProtocol


def _load_batch(files: Sequence[Path], imgsz: int) -> tuple[torch.Tensor, list[tuple[int, int]], list[RatioPad]]:
    """Letterbox a batch exactly as calibration does (the shared ``load_letterboxed``)."""
    loaded = [load_letterboxed(f, imgsz) for f in files]
    images = torch.from_numpy(np.stack([chw for chw, _, _ in loaded]))
    return images, [hw for _, hw, _ in loaded], [rp for _, _, rp in loaded]


def _timed_call(runner: Runner, images: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Run and time one batch; waits for CUDA so asynchronous kernels are counted."""
    start = time.perf_counter()
    preds = first_output(runner(images))
    if preds.is_cuda:
        torch.cuda.synchronize(preds.device)
    return preds, time.perf_counter() - start


def _coco_records(
    boxes: torch.Tensor, det: torch.Tensor, image_id: int, category_id_fn: Callable[[int], int]
) -> list[str]:
    """One image's detections as compact COCO result json objects: ltwh boxes, rounded as Ultralytics rounds them."""
    ltwh, scores, classes = xyxy2ltwh(boxes).tolist(), det[:, 4].tolist(), det[:, 5].tolist()
    return [
        json.dumps(
            {
                "image_id": image_id,
                "category_id": category_id_fn(int(c)),
                "bbox": [round(x, 3) for x in box],
                "score": round(score, 5),
            },
            separators=(",", ":"),
        )
        for box, score, c in zip(ltwh, scores, classes, strict=True)
    ]


def predict_to_json(
    runner: Runner,
    image_files: Sequence[str | os.PathLike],
    imgsz: int,
    out_json: str | os.PathLike,
    *,
    image_id_fn: Callable[[Path], int],
    category_id_fn: Callable[[int], int],
    batch: int = 8,
    conf: float = 0.001,
    iou: float = 0.7,
    max_det: int = 300,
    multi_label: bool = True,
    progress: bool = True,
) -> PredictStats:
    """:func:`predict` under the protocol these keywords describe (defaults: :class:`EvalProtocol`'s)."""
    protocol = EvalProtocol(imgsz=imgsz, conf=conf, iou=iou, max_det=max_det, multi_label=multi_label)
    return predict(
        runner,
        image_files,
        out_json,
        protocol,
        image_id_fn=image_id_fn,
        category_id_fn=category_id_fn,
        batch=batch,
        progress=progress,
    )


def predict(
    runner: Runner,
    image_files: Sequence[str | os.PathLike],
    out_json: str | os.PathLike,
    protocol: EvalProtocol,
    *,
    image_id_fn: Callable[[Path], int],
    category_id_fn: Callable[[int], int],
    batch: int = 8,
    progress: bool = True,
) -> PredictStats:
    """Detect on every image under ``protocol`` and stream COCO-format detections (boxes in original pixels) into
    ``out_json``.

    Post-processing is Ultralytics val's: its ``non_max_suppression`` then ``scale_boxes`` with the letterbox's
    ``ratio_pad``. The ids come from ``image_id_fn`` / ``category_id_fn`` (use a ``GroundTruth``'s methods so they
    match the ground truth). The file is written beside ``out_json`` and renamed at the end, so a failure never leaves
    a truncated file that looks finished.
    """
    files = [Path(f) for f in image_files]
    imgsz = protocol.imgsz
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    partial = out_json.with_name(out_json.name + ".partial")
    batches = [files[i : i + batch] for i in range(0, len(files), batch)]
    per_image_s: list[float] = []
    detections = 0
    start = time.perf_counter()
    try:
        with (
            ThreadPoolExecutor(max_workers=1) as loader,
            open(partial, "w", encoding="utf-8") as f,
            tqdm(total=len(files), desc="predict", unit="img", disable=not progress) as bar,
        ):
            f.write("[")
            pending = loader.submit(_load_batch, batches[0], imgsz) if batches else None
            for i, batch_files in enumerate(batches):
                images, shapes, ratio_pads = pending.result()
                if i + 1 < len(batches):  # prefetch: at most two batches in memory
                    pending = loader.submit(_load_batch, batches[i + 1], imgsz)
                preds, seconds = _timed_call(runner, images)
                per_image_s.append(seconds / len(batch_files))
                # an infinite time budget: Ultralytics' NMS otherwise stops early on a slow CPU and drops detections.
                # It runs torchvision's C++ NMS only when torchvision is already imported (hence the import above),
                # else a much slower loop in Python that gives the same boxes (Ultralytics' TorchNMS; conf 0.001
                # leaves thousands of boxes per image)
                results = non_max_suppression(
                    preds,
                    protocol.conf,
                    protocol.iou,
                    multi_label=protocol.multi_label,
                    max_det=protocol.max_det,
                    max_time_img=math.inf,
                )
                for file, det, shape, ratio_pad in zip(batch_files, results, shapes, ratio_pads, strict=True):
                    boxes = scale_boxes(images.shape[2:], det[:, :4].clone(), shape, ratio_pad=ratio_pad)
                    records = _coco_records(boxes, det, image_id_fn(file), category_id_fn)
                    if records:
                        f.write(("," if detections else "") + "\n" + ",\n".join(records))
                        detections += len(records)
                bar.update(len(batch_files))
            f.write("\n]\n")
    except BaseException:
        partial.unlink(missing_ok=True)  # no half-written results left behind
        raise
    os.replace(partial, out_json)
    return PredictStats(
        images=len(files),
        detections=detections,
        runner_ms=1000.0 * statistics.median(per_image_s) if per_image_s else math.nan,
        wall_s=time.perf_counter() - start,
        batch=batch,
        protocol=protocol,
    )


def evaluate_runner(
    runner: Runner,
    ground_truth: GroundTruth,
    out_json: str | os.PathLike,
    *,
    protocol: EvalProtocol | None = None,
    batch: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict on the ground truth's images and score them: mAP in percent plus ``runner_ms`` and the protocol."""
    protocol = protocol or EvalProtocol()
    stats = predict(
        runner,
        ground_truth.image_files,
        out_json,
        protocol,
        image_id_fn=ground_truth.image_id,
        category_id_fn=ground_truth.category_id,
        batch=batch,
        progress=progress,
    )
    metrics = evaluate_coco(ground_truth, out_json)
    return {**metrics, "runner_ms": stats.runner_ms, "wall_s": stats.wall_s, "protocol": protocol.describe()}
