"""Images in, model-ready tensors out: the one preprocessing shared by calibration and evaluation.

INT8 calibration must see images exactly as evaluation feeds them (same letterbox, size, scaling), so both
call :func:`load_letterboxed` here. The letterbox itself is Ultralytics' own ``LetterBox``.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from ultralytics.data.augment import LetterBox
from ultralytics.data.utils import IMG_FORMATS

from qarep_det.errors import InputError


def list_images(source: str | Path | list[str | Path]) -> list[Path]:
    """Image files of a dataset split: a folder (searched recursively), an image, or a .txt list of images.

    Mirrors the rules of Ultralytics' ``BaseDataset.get_img_files`` (a method that needs a dataset instance),
    without its training-time side effects. Raises ``FileNotFoundError`` naming a path that does not exist.
    """
    files: list[Path] = []
    for entry in source if isinstance(source, list) else [source]:
        p = Path(entry)
        if p.is_dir():
            files += [f for f in p.rglob("*.*") if f.is_file()]
        elif p.suffix.lower() == ".txt" and p.is_file():
            lines = p.read_text(encoding="utf-8-sig").split()
            files += [p.parent / x[2:] if x.startswith("./") else Path(x) for x in lines]
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"image source '{p}' does not exist")
    return sorted(f for f in files if f.suffix[1:].lower() in IMG_FORMATS)


def letterbox(image_bgr: np.ndarray, imgsz: int) -> tuple[np.ndarray, tuple[tuple[float, float], tuple[float, float]]]:
    """Letterbox a BGR image to ``imgsz`` x ``imgsz`` and return a CHW RGB float32 array in [0, 1].

    Also returns ``ratio_pad`` as Ultralytics' ``scale_boxes`` wants it, to map boxes back to the original image.
    """
    box = LetterBox(new_shape=(imgsz, imgsz), auto=False, scaleup=True)
    params = box.get_params({"img": image_bgr})  # whole-pixel offsets where the image is placed
    padded = box(image=image_bgr)
    chw = np.ascontiguousarray(padded[:, :, ::-1].transpose(2, 0, 1), dtype=np.float32) / 255.0
    return chw, (params["ratio"], (params["left"], params["top"]))


def load_letterboxed(path: str | os.PathLike, imgsz: int):
    """Read one image file and letterbox it; returns ``(chw, original_hw, ratio_pad)``.

    Raises ``ValueError`` when the file cannot be decoded as an image.
    """
    image = cv2.imread(str(path))
    if image is None:
        raise InputError(f"cannot read image '{path}'")
    chw, ratio_pad = letterbox(image, imgsz)
    return chw, image.shape[:2], ratio_pad
