"""Ground truth as COCO annotations, and pycocotools bbox mAP: the metric every table here reports.

pycocotools, not Ultralytics' in-house val metric, because the published COCO numbers we compare with come from it
(crowd regions ignored, maxDets 100, its own interpolation); Ultralytics' val mAP differs slightly.

Id convention (predictions must use the same one; they get it from :meth:`GroundTruth.image_id` and
:meth:`GroundTruth.category_id`, so both sides come from one place):

- official COCO instances json: ``image_id = int(file stem)`` (COCO names its files by id) and
  ``category_id = coco80_to_coco91_class()[class index]``;
- ground truth built from YOLO labels: ``image_id = 1 +`` the image's position in the split's sorted image list
  (stems need not be numeric or unique across sub-folders) and ``category_id = class index + 1`` (Ultralytics'
  convention for custom COCO json). Annotation ids start at 1: pycocotools reads a matched id of 0 as "unmatched".
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from ultralytics.data.converter import coco80_to_coco91_class
from ultralytics.data.utils import exif_size, img2label_paths
from ultralytics.utils.ops import clip_boxes, xywhn2xyxy, xyxy2ltwh

from qarep_det.data.coco import coco80_names, coco_categories
from qarep_det.data.dataset import resolve_dataset
from qarep_det.data.images import list_images
from qarep_det.data.labels import read_yolo_label
from qarep_det.errors import InputError

# COCOeval.stats indices of the numbers we report (see COCOeval.summarize)
_STATS = {"map50_95": 0, "map50": 1, "map75": 2, "map_small": 3, "map_medium": 4, "map_large": 5}


def _key(path: str | os.PathLike) -> str:
    """Lookup key of an image path: absolute but not symlink-resolved, so it is cheap and stable within a run."""
    return os.path.abspath(path)


@contextlib.contextmanager
def _silenced(quiet: bool) -> Iterator[None]:
    """Swallow pycocotools' progress prints when ``quiet``; it only ever writes through ``print``."""
    if quiet:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    else:
        yield


@dataclass
class GroundTruth:
    """The ground truth of one split and the id convention that predictions for it must follow.

    ``annotations`` is either the path of an official COCO instances json or a COCO dataset dict built from labels.
    """

    image_files: list[Path]
    image_ids: list[int]
    category_ids: list[int]  # class index -> COCO category id
    annotations: Path | dict[str, Any]
    _ids: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._ids = {_key(p): i for p, i in zip(self.image_files, self.image_ids, strict=True)}

    @property
    def description(self) -> str:
        """Where the ground truth came from, for logs and tables."""
        if isinstance(self.annotations, Path):
            return f"COCO instances json '{self.annotations}' ({len(self.image_files)} images)"
        return f"YOLO labels of {len(self.image_files)} images"

    def image_id(self, path: str | os.PathLike) -> int:
        """COCO image id of an image of this split."""
        try:
            return self._ids[_key(path)]
        except KeyError:
            raise KeyError(f"image '{path}' is not part of this ground truth") from None

    def category_id(self, cls: int) -> int:
        """COCO category id of a model class index."""
        return self.category_ids[int(cls)]

    def coco(self, quiet: bool = True) -> COCO:
        """The ground truth as a pycocotools ``COCO`` object."""
        with _silenced(quiet):
            if isinstance(self.annotations, Path):
                return COCO(str(self.annotations))
            coco = COCO()
            coco.dataset = self.annotations
            coco.createIndex()
            return coco

    def save(self, path: str | os.PathLike) -> Path:
        """Write label-built ground truth as a COCO json (an official json is returned as is)."""
        if isinstance(self.annotations, Path):
            return self.annotations
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.annotations), encoding="utf-8")
        return path


def ground_truth_from_labels(
    image_files: Sequence[str | os.PathLike], names: Sequence[str], keypoint_fields: int = 0
) -> GroundTruth:
    """COCO ground truth from the YOLO labels of ``image_files`` (labels found by Ultralytics' ``img2label_paths``).

    Image sizes come from the file header (EXIF orientation applied, as ``cv2.imread`` does), without decoding.
    """
    files = [Path(p) for p in image_files]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, (file, label_file) in enumerate(zip(files, img2label_paths(files), strict=True), start=1):
        with Image.open(file) as im:
            w, h = exif_size(im)
        images.append({"id": image_id, "file_name": str(file), "width": w, "height": h})
        cls, xywhn = read_yolo_label(label_file, len(names), keypoint_fields=keypoint_fields)
        boxes = xyxy2ltwh(clip_boxes(xywhn2xyxy(xywhn, w, h), (h, w)))
        for c, box in zip(cls.tolist(), boxes.tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": c + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    dataset = {
        "info": {"description": "ground truth built from YOLO labels by qarep_det"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
    }
    return GroundTruth(files, [im["id"] for im in images], list(range(1, len(names) + 1)), dataset)


def _split_name(source: str) -> str:
    """COCO's name of a split: its folder (``images/val2017``) or image list (``val2017.txt``) without the suffix."""
    path = Path(source)
    return path.stem if path.suffix.lower() == ".txt" else path.name


def check_instances_json(path: Path, files: Sequence[Path]) -> None:
    """Refuse, in one ``ValueError`` line, an instances json that cannot score ``files`` (COCO-named images).

    Checked up front because pycocotools finds out only after every image is predicted, or not at all: a json with
    a category that is not COCO's (COCO's id and name; a subset such as person alone is fine) scores our 80-to-91
    category ids against other classes, and one that lacks some of the split's images (another split's json: COCO's
    splits share no image id) cannot score them.
    """
    try:
        dataset = json.loads(path.read_text(encoding="utf-8"))
        categories = {c["id"]: c["name"] for c in dataset["categories"]}
        json_ids = {image["id"] for image in dataset["images"]}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        reason = f"no {e} entry" if isinstance(e, KeyError) else " ".join(str(e).split())
        raise InputError(f"instances json '{path}' is not a COCO instances file: {reason}") from None
    coco = coco_categories()
    if not categories:
        raise InputError(f"instances json '{path}' has no categories")
    if odd := next(((i, n) for i, n in categories.items() if coco.get(i) != n), None):
        raise InputError(
            f"instances json '{path}': its categories are not COCO's (ids 1-90, names): id {odd[0]} is '{odd[1]}'"
        )
    missing = [f for f in files if int(f.stem) not in json_ids]
    if len(missing) == len(files):
        raise InputError(
            f"instances json '{path}' has none of the split's {len(files)} images (the ids are the file names, e.g. "
            f"'{files[0].name}' is {int(files[0].stem)}): it belongs to another split"
        )
    if missing:
        raise InputError(
            f"instances json '{path}' lacks {len(missing)} of the split's {len(files)} images, e.g. "
            f"'{missing[0].name}': it belongs to another split or to a part of this one"
        )


def load_ground_truth(
    data: str | os.PathLike | dict[str, Any], split: str = "val", instances_json: str | os.PathLike | None = None
) -> GroundTruth:
    """Ground truth of a data YAML's split: the official COCO json for COCO, else built from the YOLO labels.

    ``data`` is a data YAML (resolved with Ultralytics' ``check_det_dataset``, never downloading) or its resolved
    dict. The official json is used when the names are COCO's 80 and ``instances_json`` is given, or exists at
    ``<path>/annotations/instances_<split>.json``, ``<split>`` being the split's folder or image list name without
    suffix (``val2017`` for ``images/val2017`` or ``val2017.txt``: where Ultralytics' COCO setup puts it).

    Everything that would make the scores wrong or fail late fails here, in one ``ValueError`` line, before any
    model work: a json that does not fit the split (:func:`check_instances_json`), a label row with a class id
    outside the names (:func:`qarep_det.data.labels.read_yolo_label`).
    """
    info = data if isinstance(data, dict) else resolve_dataset(data)
    if not info.get(split):
        raise InputError(f"the data has no '{split}' split")
    files = list_images(info[split])
    if not files:
        raise InputError(f"no images in the '{split}' split ({info[split]})")
    names = list(info["names"].values()) if isinstance(info["names"], dict) else list(info["names"])
    is_coco = names == coco80_names()
    if instances_json is None and is_coco and isinstance(info[split], str):
        standard = Path(info["path"]) / "annotations" / f"instances_{_split_name(info[split])}.json"
        instances_json = standard if standard.is_file() else None
    if instances_json is None:
        nkpt, ndim = info.get("kpt_shape") or (0, 0)
        return ground_truth_from_labels(files, names, keypoint_fields=nkpt * ndim)
    if not is_coco:
        raise InputError("an instances json was given but the data's names are not COCO's 80 classes")
    if not Path(instances_json).is_file():
        raise FileNotFoundError(f"instances json '{instances_json}' does not exist")
    if bad := next((f for f in files if not f.stem.isnumeric()), None):
        raise InputError(f"COCO image ids come from numeric file names; '{bad.name}' is not one")
    check_instances_json(Path(instances_json), files)
    return GroundTruth(files, [int(f.stem) for f in files], coco80_to_coco91_class(), Path(instances_json))


def evaluate_coco(
    ground_truth: GroundTruth | COCO | str | os.PathLike,
    detections_json: str | os.PathLike,
    image_ids: Sequence[int] | None = None,
    quiet: bool = True,
) -> dict[str, Any]:
    """pycocotools bbox mAP of a detections json, in percent: ``map50_95``, ``map50``, ``map75``, ``map_small``, ...

    Scores only ``image_ids`` (default: a ``GroundTruth``'s own images, else every image of the json), so a subset
    of COCO val is not charged for the images it skipped. No detections give 0, not an error; an area range without
    ground truth gives ``None``. Also returns ``images`` and ``detections`` counts. ``quiet`` hides pycocotools'
    prints (its summary included).
    """
    if isinstance(ground_truth, GroundTruth):
        coco = ground_truth.coco(quiet)
        image_ids = ground_truth.image_ids if image_ids is None else image_ids
    elif isinstance(ground_truth, COCO):
        coco = ground_truth
    else:
        with _silenced(quiet):
            coco = COCO(str(ground_truth))
    ids = set(coco.getImgIds() if image_ids is None else image_ids)
    if missing := ids - set(coco.getImgIds()):
        raise InputError(f"{len(missing)} image ids are not in the ground truth, e.g. {next(iter(missing))!r}")
    if not coco.getAnnIds(imgIds=list(ids), iscrowd=False):
        raise InputError("the ground truth has no boxes on these images: mAP is undefined")

    with open(detections_json, encoding="utf-8") as f:
        detections = json.load(f)
    if stray := {d["image_id"] for d in detections} - ids:
        raise InputError(f"detections for image ids outside the evaluated set, e.g. {next(iter(stray))!r}")
    result: dict[str, Any] = {"images": len(ids), "detections": len(detections)}
    if not detections:  # pycocotools' loadRes cannot take an empty list; nothing found scores 0
        return {**dict.fromkeys(_STATS, 0.0), **result}

    with _silenced(quiet):
        evaluator = COCOeval(coco, coco.loadRes(detections), iouType="bbox")
        evaluator.params.imgIds = sorted(ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {**{k: None if stats[i] < 0 else 100.0 * float(stats[i]) for k, i in _STATS.items()}, **result}


def per_image_map50_95(ground_truth: GroundTruth, detections: str | os.PathLike) -> list[float]:
    """pycocotools' AP50-95 in percent (all areas, 100 detections) of each image scored alone, in
    ``ground_truth.image_files`` order; 0 for an image without detections or without boxes.

    Their spread is what the noise of a mAP measured on these images is estimated from
    (:mod:`qarep_det.sensitivity.resolution`). One ``COCOeval`` serves every image, narrowed to that image, its boxes'
    categories (pycocotools leaves a category without boxes out of the mean, so the others cannot change it) and the
    all-area range: the figure :func:`evaluate_coco` gives for that image alone, without 80 categories x 4 areas of
    empty work.
    """
    coco = ground_truth.coco()
    detections = json.loads(Path(detections).read_text(encoding="utf-8"))
    values = [0.0] * len(ground_truth.image_ids)
    if not detections:  # loadRes cannot take an empty list
        return values
    with _silenced(True):
        evaluator = COCOeval(coco, coco.loadRes(detections), iouType="bbox")
        params = evaluator.params
        params.areaRng, params.areaRngLbl, params.maxDets = [params.areaRng[0]], ["all"], [params.maxDets[-1]]
        for i, image_id in enumerate(ground_truth.image_ids):
            categories = sorted({a["category_id"] for a in coco.imgToAnns[image_id]})
            if not categories:
                continue
            params.imgIds, params.catIds = [image_id], categories
            evaluator.evaluate()
            evaluator.accumulate()
            precision = evaluator.eval["precision"]
            if (precision > -1).any():
                values[i] = 100.0 * float(precision[precision > -1].mean())
    return values
