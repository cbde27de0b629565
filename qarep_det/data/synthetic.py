"""A synthetic shape-detection dataset, so tests and demos can train and evaluate offline in minutes.

Each image holds 1 to ``MAX_OBJECTS`` shapes (circle, square, triangle, cross, ring, star) of random size (about 8 %
to 60 % of the image side), rotation, colour and texture (solid, stripes, noise) on a cluttered background (colour
gradient, low-frequency blotches, thin lines and scribbles that are not objects). Colours are drawn independently of
the class, so only the shape tells classes apart.

Boxes are the tight extent of each object's *visible* pixels, computed from the drawn masks and clipped to the
image. Later objects may occlude earlier ones, but a placement is rejected if any object, the new one included,
would keep less than ``MIN_VISIBLE`` of its area visible (through occlusion or the image border).

Layout (Ultralytics YOLO format, plus a COCO JSON for the val split)::

    out/data.yaml                      absolute ``path:``, ``train: images/train``, ``val: images/val``, ``names:``
    out/images/{train,val}/000001.jpg  numeric stems: Ultralytics uses ``int(stem)`` as the COCO image id
    out/labels/{train,val}/000001.txt  ``cls xc yc w h`` per line, normalized to the image size
    out/annotations/instances_val.json image ids = ``int(stem)``, category ids = ``category_id(cls)``

Everything is a pure function of ``seed``: image ``i`` of a split draws from its own generator seeded by
``(seed, split, i)``, so the same seed gives byte-identical files and the val set does not depend on ``n_train``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import yaml
from tqdm import tqdm

from qarep_det.errors import InputError

CLASS_NAMES = ("circle", "square", "triangle", "cross", "ring", "star")
MAX_OBJECTS = 6
SIZE_RANGE = (0.08, 0.6)  # shape diameter as a fraction of the image side
MIN_SIZE_PX = 6.0  # smaller shapes would be a few pixels of noise at small imgsz
MIN_VISIBLE = 0.5  # fraction of a shape's area that must stay visible
MIN_CONTRAST = 90.0  # RGB distance between an object's colours and the background it covers
JPEG_QUALITY = 95  # fixed, so images are byte-identical across runs
SPLITS = ("train", "val")
PROGRESS_MIN_IMAGES = 16  # show a progress bar above this many images
_SUBPIXEL = 4  # cv2 fixed-point bits: draw vertices at 1/16 px so small shapes keep their geometry


def category_id(cls_index: int) -> int:
    """COCO category id of YOLO class ``cls_index``: ``cls_index + 1``.

    Ultralytics writes ``class + 1`` as ``category_id`` in its own predictions JSON for non-COCO datasets, so its
    exports and our annotation file agree without a mapping table.
    """
    return int(cls_index) + 1


def _fixed(points: np.ndarray) -> np.ndarray:
    """Float vertices to cv2's fixed-point int32 polygon format."""
    return np.round(points * (1 << _SUBPIXEL)).astype(np.int32).reshape(-1, 1, 2)


def _axes(a: float, b: float) -> tuple[int, int]:
    """Ellipse half-axes in cv2's fixed-point format."""
    return round(a * (1 << _SUBPIXEL)), round(b * (1 << _SUBPIXEL))


def _star_points(center: np.ndarray, radii: list[float], angle: float) -> np.ndarray:
    """Vertices at equal angular steps from ``angle``, cycling through ``radii`` (a regular polygon or a star)."""
    n = len(radii)
    theta = angle + 2 * np.pi * np.arange(n) / n
    r = np.asarray(radii)
    return center + np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)


def _shape_mask(cls: int, diameter: float, rng: np.random.Generator) -> np.ndarray:
    """Binary uint8 mask of one shape of class ``cls``, rotated at random, centred in a square patch."""
    side = int(np.ceil(diameter)) + 2
    mask = np.zeros((side, side), np.uint8)
    center = np.full(2, side / 2)
    r = diameter / 2
    angle = rng.uniform(0, 2 * np.pi)
    name = CLASS_NAMES[cls]
    if name in ("circle", "ring"):
        c = tuple(int(v) for v in _fixed(center).ravel())
        outer = r * rng.uniform(0.8, 1.0)  # a slight ellipse: boxes are not all squares
        cv2.ellipse(mask, c, _axes(r, outer), np.degrees(angle), 0, 360, 1, -1, cv2.LINE_8, _SUBPIXEL)
        if name == "ring":
            k = rng.uniform(0.45, 0.7)
            cv2.ellipse(mask, c, _axes(r * k, outer * k), np.degrees(angle), 0, 360, 0, -1, cv2.LINE_8, _SUBPIXEL)
    elif name == "square":
        phi = rng.uniform(0.6, np.pi / 4)  # half-angle of the diagonals: aspect ratio tan(phi) in ~[0.7, 1]
        corners = [angle + phi, angle + np.pi - phi, angle + np.pi + phi, angle - phi]
        pts = center + r * np.stack([np.cos(corners), np.sin(corners)], axis=1)
        cv2.fillPoly(mask, [_fixed(pts)], 1, cv2.LINE_8, _SUBPIXEL)
    elif name == "triangle":
        pts = _star_points(center, [0.9 * r] * 3, angle) + rng.uniform(-0.07, 0.07, (3, 2)) * r  # within r
        cv2.fillPoly(mask, [_fixed(pts)], 1, cv2.LINE_8, _SUBPIXEL)
    elif name == "cross":
        half = r * rng.uniform(0.22, 0.35)  # half the arm thickness
        length = np.sqrt(r * r - half * half)  # arm corners lie on the circle of radius r
        arm = np.array([[-length, -half], [length, -half], [length, half], [-length, half]])
        for a in (angle, angle + np.pi / 2):
            rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
            cv2.fillPoly(mask, [_fixed(center + arm @ rot.T)], 1, cv2.LINE_8, _SUBPIXEL)
    else:  # star
        pts = _star_points(center, [r, r * rng.uniform(0.38, 0.5)] * 5, angle)
        cv2.fillPoly(mask, [_fixed(pts)], 1, cv2.LINE_8, _SUBPIXEL)
    return mask


def _background(imgsz: int, rng: np.random.Generator) -> np.ndarray:
    """A float32 RGB canvas: colour gradient, soft blotches, then thin lines and scribbles as distractors."""
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(0, 1, imgsz, dtype=np.float32)
    t = ramp[None, :] * np.float32(np.cos(a)) + ramp[:, None] * np.float32(np.sin(a))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    image = c0 + t[..., None] * (c1 - c0)
    blotches = rng.normal(0, 30, (5, 5, 3)).astype(np.float32)
    image = (image + cv2.resize(blotches, (imgsz, imgsz), interpolation=cv2.INTER_CUBIC)).astype(np.float32)
    width = max(1, imgsz // 100)
    for _ in range(rng.integers(2, 9)):
        p, q = rng.integers(0, imgsz, (2, 2))
        cv2.line(image, tuple(map(int, p)), tuple(map(int, q)), tuple(rng.uniform(0, 255, 3)), width)
    for _ in range(rng.integers(0, 4)):
        start = rng.uniform(0, imgsz, 2)
        pts = start + np.cumsum(rng.normal(0, imgsz / 8, (5, 2)), axis=0)
        cv2.polylines(image, [pts.astype(np.int32)], False, tuple(rng.uniform(0, 255, 3)), width + 1)
    return image


def _contrasting_colour(rng: np.random.Generator, against: np.ndarray) -> np.ndarray:
    """A random RGB colour at least ``MIN_CONTRAST`` from ``against`` (the best of a few draws otherwise)."""
    candidates = rng.uniform(0, 255, (16, 3))
    distance = np.linalg.norm(candidates - against, axis=1)
    ok = np.flatnonzero(distance >= MIN_CONTRAST)
    return candidates[ok[0] if len(ok) else int(np.argmax(distance))]


def _texture(h: int, w: int, rng: np.random.Generator, against: np.ndarray) -> np.ndarray:
    """An ``h`` x ``w`` float32 RGB fill: solid, stripes or noise, in colours that stand out from ``against``."""
    base = _contrasting_colour(rng, against)
    kind = rng.integers(3)
    if kind == 0:
        return np.broadcast_to(base, (h, w, 3)).astype(np.float32)
    if kind == 1:
        other = _contrasting_colour(rng, against)
        period, a = rng.uniform(3, 8), rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        on = ((xx * np.cos(a) + yy * np.sin(a)) / period) % 1.0 < 0.5
        return np.where(on[..., None], base, other).astype(np.float32)
    return (base + rng.normal(0, rng.uniform(15, 40), (h, w, 3))).astype(np.float32)


def render_image(imgsz: int, n_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """Draw one image; returns ``(uint8 HxWx3 image, objects)``.

    Each object is ``(cls, x0, y0, x1, y1, area)``: the visible pixels span columns ``x0..x1-1`` and rows
    ``y0..y1-1`` (so ``x1 - x0`` is the box width in pixels) and ``area`` counts them.
    """
    image = _background(imgsz, rng)
    owner = np.full((imgsz, imgsz), -1, np.int16)  # index of the object that owns each pixel, -1 for background
    classes: list[int] = []
    full_area: list[int] = []
    visible: list[int] = []
    windows: list[tuple[int, int, int, int]] = []
    n_wanted = int(rng.integers(1, MAX_OBJECTS + 1))
    for _ in range(4 * n_wanted):  # rejected placements cost a retry; give up after a few
        if len(classes) == n_wanted:
            break
        cls = int(rng.integers(n_classes))
        diameter = max(rng.uniform(*SIZE_RANGE) * imgsz, MIN_SIZE_PX)
        patch = _shape_mask(cls, diameter, rng)
        side = patch.shape[0]
        x, y = map(int, rng.integers(-(side // 4), imgsz - side + side // 4 + 1, 2))  # a quarter may be outside
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + side, imgsz), min(y + side, imgsz)
        shape = patch[y0 - y : y1 - y, x0 - x : x1 - x].astype(bool)
        area = int(shape.sum())
        if area < MIN_VISIBLE * patch.sum():
            continue
        covered = owner[y0:y1, x0:x1][shape]
        lost = np.bincount(covered[covered >= 0], minlength=len(classes))
        if any(v - n < MIN_VISIBLE * f for v, n, f in zip(visible, lost, full_area, strict=True)):
            continue
        region = image[y0:y1, x0:x1]
        region[shape] = _texture(y1 - y0, x1 - x0, rng, region[shape].mean(axis=0))[shape]
        owner[y0:y1, x0:x1][shape] = len(classes)
        visible = [v - n for v, n in zip(visible, lost, strict=True)] + [area]
        classes.append(cls)
        full_area.append(int(patch.sum()))
        windows.append((x0, y0, x1, y1))
    image += rng.standard_normal(image.shape, np.float32) * np.float32(rng.uniform(0, 6))  # sensor noise
    objects = []
    for k, (cls, (wx0, wy0, wx1, wy1)) in enumerate(zip(classes, windows, strict=True)):
        ys, xs = np.nonzero(owner[wy0:wy1, wx0:wx1] == k)
        box = (wx0 + int(xs.min()), wy0 + int(ys.min()), wx0 + int(xs.max()) + 1, wy0 + int(ys.max()) + 1)
        objects.append((cls, *box, len(xs)))
    return np.clip(image, 0, 255).astype(np.uint8), objects


def _check_args(out: Path, n_train: int, n_val: int, imgsz: int, seed: int, n_classes: int, overwrite: bool) -> None:
    """Raise ``ValueError`` with a one-line reason for any argument ``make_dataset`` cannot honour."""
    if n_train < 1:
        raise InputError(f"n_train must be >= 1, got {n_train}")
    if n_val < 1:
        raise InputError(f"n_val must be >= 1, got {n_val}")
    if imgsz < 32:
        raise InputError(f"imgsz must be >= 32, got {imgsz}")
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    if not 1 <= n_classes <= len(CLASS_NAMES):
        raise InputError(f"n_classes must be in 1..{len(CLASS_NAMES)}, got {n_classes}")
    if out.exists() and not out.is_dir():
        raise InputError(f"output path '{out}' exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"output folder '{out}' is not empty (pass overwrite=True / --overwrite to replace it)")


def _remove_previous(out: Path) -> None:
    """Delete what an earlier run wrote (and Ultralytics' label caches), leaving any other files in ``out`` alone."""
    for name in ("images", "labels", "annotations"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "data.yaml").unlink(missing_ok=True)


def _label_text(objects: list[tuple[int, ...]], imgsz: int) -> str:
    """One image's YOLO label file: a ``cls xc yc w h`` line per object, normalized to the image side."""
    return "".join(
        f"{c} {(x0 + x1) / 2 / imgsz:.6f} {(y0 + y1) / 2 / imgsz:.6f} {(x1 - x0) / imgsz:.6f} {(y1 - y0) / imgsz:.6f}\n"
        for c, x0, y0, x1, y1, _ in objects
    )


def _coco_annotations(objects: list[tuple[int, ...]], image_id: int, first_id: int) -> list[dict]:
    """One image's COCO annotations, numbered from ``first_id`` (pycocotools reads id 0 as "unmatched")."""
    return [
        {
            "id": first_id + k,
            "image_id": image_id,
            "category_id": category_id(c),
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "area": area,  # visible pixels: COCO's area is the object's mask area, not its box's
            "iscrowd": 0,
        }
        for k, (c, x0, y0, x1, y1, area) in enumerate(objects)
    ]


def make_dataset(
    out: str | Path,
    n_train: int,
    n_val: int,
    imgsz: int = 160,
    seed: int = 0,
    n_classes: int = len(CLASS_NAMES),
    overwrite: bool = False,
) -> Path:
    """Write the dataset under ``out`` and return the path of its ``data.yaml``.

    Uses the first ``n_classes`` of ``CLASS_NAMES``. Refuses (``ValueError``) a non-empty ``out`` unless ``overwrite``
    is set; then only the folders and files this function writes are replaced.
    """
    out = Path(out).resolve()
    _check_args(out, n_train, n_val, imgsz, seed, n_classes, overwrite)
    _remove_previous(out)
    counts = dict(zip(SPLITS, (n_train, n_val), strict=True))
    total = n_train + n_val
    coco: dict = {
        "info": {"description": f"qarep_det synthetic shapes, seed {seed}, imgsz {imgsz}"},
        "licenses": [],
        "images": [],
        "annotations": [],
        "categories": [{"id": category_id(c), "name": CLASS_NAMES[c]} for c in range(n_classes)],
    }
    with tqdm(total=total, desc="synthetic dataset", unit="img", disable=total <= PROGRESS_MIN_IMAGES) as bar:
        for split_index, split in enumerate(SPLITS):
            (out / "images" / split).mkdir(parents=True)
            (out / "labels" / split).mkdir(parents=True)
            for i in range(1, counts[split] + 1):
                rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split_index, i)))
                image, objects = render_image(imgsz, n_classes, rng)
                stem = f"{i:06d}"
                cv2.imwrite(
                    str(out / "images" / split / f"{stem}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
                )
                (out / "labels" / split / f"{stem}.txt").write_text(_label_text(objects, imgsz), encoding="utf-8")
                if split == "val":
                    coco["images"].append({"id": i, "file_name": f"{stem}.jpg", "width": imgsz, "height": imgsz})
                    coco["annotations"] += _coco_annotations(objects, i, first_id=len(coco["annotations"]) + 1)
                bar.update()
    (out / "annotations").mkdir()
    (out / "annotations" / "instances_val.json").write_text(json.dumps(coco), encoding="utf-8")
    data = {
        "path": str(out),
        "train": "images/train",
        "val": "images/val",
        "names": dict(enumerate(CLASS_NAMES[:n_classes])),
    }
    yaml_path = out / "data.yaml"
    yaml_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return yaml_path
