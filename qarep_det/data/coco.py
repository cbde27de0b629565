"""COCO 2017 for detection: its 80 classes, and its official downloads made a folder that Ultralytics trains on and
our tools evaluate on.

COCO ships its images as ``train2017/`` and ``val2017/`` and its annotations as one ``annotations/`` folder that
also holds ``captions_*.json`` and ``person_keypoints_*.json``. Ultralytics' ``convert_coco`` reads every json of
the folder it is given and stops on a captions file (``KeyError: 'bbox'``), so :func:`prepare_coco` hands it a
folder that links the two ``instances_*.json`` alone. Everything is checked before anything is written, and the
result is built in a hidden folder beside ``out`` and renamed into place, so a failure leaves nothing behind.

Layout written (Ultralytics' own COCO layout; the images stay where they are)::

    out/coco.yaml                        absolute ``path:``, ``train: train2017.txt``, ``val: val2017.txt``, COCO's 80
    out/train2017.txt, out/val2017.txt   every image of the split's json, ``./images/<split>/<file>`` a line
    out/images/<split>                   a link to the downloaded image folder
    out/labels/<split>/<stem>.txt        ``convert_coco``'s YOLO labels (cls91to80, crowd regions left out)
    out/annotations/instances_val2017.json  the official val json, where Ultralytics' DetectionValidator and
                                         :func:`qarep_det.evaluation.coco.load_ground_truth` look for it

Ultralytics scores a data as COCO (pycocotools on that json) only when its val list path contains ``coco`` and ends
in ``/val2017.txt``; our ``ptq-eval`` needs only COCO's 80 names and the json.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ultralytics.data.converter import coco80_to_coco91_class, convert_coco
from ultralytics.data.utils import IMG_FORMATS
from ultralytics.utils import LOGGER, ROOT, YAML

from qarep_det.errors import InputError
from qarep_det.logs import quiet

SPLITS = ("train2017", "val2017")
"""COCO 2017's detection splits with public annotations, in the order they are checked and written."""

SCORED_SPLIT = "val2017"
"""The split whose official json is kept in ``out/annotations`` for scoring."""


def coco80_names() -> list[str]:
    """COCO's 80 class names in Ultralytics' order (from its bundled coco.yaml): the model's class indices."""
    return list(YAML.load(ROOT / "cfg" / "datasets" / "coco.yaml")["names"].values())


def coco_categories() -> dict[int, str]:
    """COCO's 80 detection categories as its json files number them (ids 1-90, with gaps): id -> name."""
    return dict(zip(coco80_to_coco91_class(), coco80_names(), strict=True))


@dataclass(frozen=True)
class SplitSummary:
    """What one split holds, counted from its json and from the labels written."""

    name: str
    images: int
    """Images listed by the json (and found in the image folder)."""
    annotated: int
    """Images with at least one annotation, crowd regions included: one label file each."""
    crowd: int
    """Crowd regions, which YOLO labels leave out (COCO's evaluation ignores them)."""
    boxes: int = 0
    """Boxes written to the label files."""

    def line(self) -> str:
        """One summary line for the command's output."""
        background = self.images - self.annotated
        return (
            f"{self.name}: {self.images} images, {self.boxes} boxes in {self.annotated} label files "
            f"({background} images without annotations, {self.crowd} crowd regions left out)"
        )


@dataclass(frozen=True)
class _Split:
    """A split checked and ready to convert."""

    name: str
    image_dir: Path
    instances: Path
    file_names: list[str]
    summary: SplitSummary


def _is_within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both resolved)."""
    return path == folder or folder in path.parents


def _check_out(out: Path, sources: Sequence[Path], overwrite: bool) -> None:
    """Refuse an ``out`` that exists (unless ``overwrite``) or whose replacement would delete the downloads."""
    if out.exists() and not overwrite:
        raise InputError(f"'{out}' exists: pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise InputError(f"'{out}' exists and is not a folder")
    if clash := next((s for s in sources if _is_within(s, out) or _is_within(out, s)), None):
        raise InputError(f"--out '{out}' overlaps the download '{clash}': choose a folder outside the downloads")


def _instances_json(annotations: Path, split: str) -> Path:
    """The split's ``instances_<split>.json``, or an error naming what the folder holds instead."""
    if not annotations.is_dir():
        raise InputError(f"annotations folder '{annotations}' does not exist")
    path = annotations / f"instances_{split}.json"
    if not path.is_file():
        found = ", ".join(sorted(p.name for p in annotations.glob("*.json"))) or "no json"
        raise InputError(
            f"no instances_{split}.json in '{annotations}' (it holds {found}): the boxes are the instances_*.json "
            f"of COCO's annotations_trainval2017.zip"
        )
    return path


def _image_names(folder: Path) -> set[str]:
    """The images of ``folder`` (searched recursively), as paths relative to it, as a COCO json names them."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.*") if p.suffix[1:].lower() in IMG_FORMATS}


def _check_split(name: str, image_dir: Path, instances: Path) -> _Split:
    """Read a split's json and check it against COCO's 80 categories and against the image folder."""
    if not image_dir.is_dir():
        raise InputError(f"image folder '{image_dir}' does not exist (unzip COCO's {name}.zip there)")
    try:
        dataset: dict[str, Any] = json.loads(instances.read_text(encoding="utf-8"))
        categories = {c["id"]: c["name"] for c in dataset["categories"]}
        images = {image["id"]: image["file_name"] for image in dataset["images"]}
        annotated = {a["image_id"] for a in dataset["annotations"]}
        crowd = sum(bool(a.get("iscrowd")) for a in dataset["annotations"])
        boxes_ok = all(len(a["bbox"]) == 4 for a in dataset["annotations"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        reason = f"no {e} entry" if isinstance(e, KeyError) else " ".join(str(e).split())
        raise InputError(f"'{instances}' is not a COCO instances file: {reason}") from None
    del dataset  # train2017's json is 448 MB: let it go before convert_coco reads it again
    if not boxes_ok:
        raise InputError(f"'{instances}' has an annotation whose bbox is not 4 numbers")
    coco = coco_categories()
    if categories != coco:
        odd = min(i for i in categories.keys() | coco.keys() if categories.get(i) != coco.get(i))
        raise InputError(
            f"'{instances}' does not have COCO's 80 categories: its id {odd} is {categories.get(odd)!r}, COCO's is "
            f"{coco.get(odd)!r}"
        )
    if stray := annotated - images.keys():
        raise InputError(f"'{instances}' annotates image id {min(stray)}, which its images list lacks")
    listed, found = set(images.values()), _image_names(image_dir)
    if len(listed) < len(images):
        raise InputError(f"'{instances}' lists {len(images)} images under {len(listed)} file names")
    if not listed & found:
        raise InputError(
            f"'{image_dir}' holds none of the {len(listed)} images of {instances.name} (e.g. {min(listed)}): "
            f"is it another split's folder?"
        )
    if missing := listed - found:
        raise InputError(
            f"'{image_dir}' lacks {len(missing)} of the {len(listed)} images of {instances.name} (e.g. "
            f"{min(missing)}): an incomplete download?"
        )
    if extra := found - listed:
        raise InputError(
            f"'{image_dir}' holds {len(extra)} images that {instances.name} does not list (e.g. {min(extra)})"
        )
    summary = SplitSummary(name, images=len(images), annotated=len(annotated), crowd=crowd)
    return _Split(name, image_dir, instances, sorted(listed), summary)


def _convert(splits: Sequence[_Split], scratch: Path) -> Path:
    """``convert_coco`` of the splits' jsons alone (linked into one folder); returns its labels folder."""
    jsons = scratch / "instances"
    jsons.mkdir()
    for split in splits:
        (jsons / split.instances.name).symlink_to(split.instances)
    with quiet(LOGGER):  # convert_coco names the hidden build folder as its result; its progress bar stays
        convert_coco(labels_dir=str(jsons), save_dir=str(scratch / "converted"), use_segments=False, cls91to80=True)
    return scratch / "converted" / "labels"


def _count_labels(folder: Path, split: _Split) -> SplitSummary:
    """The split's summary with the boxes written, once checked that ``convert_coco`` wrote one label file per
    annotated image (an empty one where all are crowd regions)."""
    files = list(folder.rglob("*.txt")) if folder.is_dir() else []
    if len(files) != split.summary.annotated:
        raise RuntimeError(
            f"{split.name}: convert_coco wrote {len(files)} label files for {split.summary.annotated} annotated images"
        )
    boxes = sum(len(f.read_text(encoding="utf-8").splitlines()) for f in files)
    return SplitSummary(split.name, split.summary.images, split.summary.annotated, split.summary.crowd, boxes)


def _write_dataset(splits: Sequence[_Split], labels: Path, out: Path, dataset: Path) -> list[SplitSummary]:
    """Assemble the dataset folder ``dataset`` (to be renamed ``out``, which its ``coco.yaml`` names)."""
    summaries = []
    (dataset / "images").mkdir(parents=True)
    (dataset / "labels").mkdir()
    for split in splits:
        (dataset / "images" / split.name).symlink_to(split.image_dir, target_is_directory=True)
        summaries.append(_count_labels(labels / split.name, split))
        if (labels / split.name).is_dir():
            (labels / split.name).rename(dataset / "labels" / split.name)
        else:  # no image of the split has an annotation
            (dataset / "labels" / split.name).mkdir()
        lines = "".join(f"./images/{split.name}/{name}\n" for name in split.file_names)
        (dataset / f"{split.name}.txt").write_text(lines, encoding="utf-8")
        if split.name == SCORED_SPLIT:
            (dataset / "annotations").mkdir()
            shutil.copyfile(split.instances, dataset / "annotations" / split.instances.name)
    data = {
        "path": str(out),
        "train": f"{SPLITS[0]}.txt",
        "val": f"{SCORED_SPLIT}.txt",
        "names": dict(enumerate(coco80_names())),
    }
    header = "# COCO 2017 detection, written by 'qarep-det coco'; the images are linked from their download folders\n"
    (dataset / "coco.yaml").write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return summaries


def prepare_coco(
    images: str | os.PathLike, annotations: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False
) -> tuple[Path, list[SplitSummary]]:
    """Make ``out`` a training-ready COCO 2017 folder from COCO's official downloads; returns its data YAML and a
    summary per split.

    ``images`` holds ``train2017/`` and ``val2017/`` as COCO's zips unpack them; ``annotations`` holds at least
    ``instances_train2017.json`` and ``instances_val2017.json`` (other files there are ignored). Raises
    :class:`InputError` for input that cannot make the dataset, before anything is written; an ``OSError``
    while writing (a full disk) leaves ``out`` as it was.
    """
    images, annotations, out = Path(images).resolve(), Path(annotations).resolve(), Path(out).resolve()
    jsons = [_instances_json(annotations, split) for split in SPLITS]
    _check_out(out, [images / split for split in SPLITS] + jsons, overwrite)
    splits = [_check_split(split, images / split, path) for split, path in zip(SPLITS, jsons, strict=True)]

    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # same file system: rename is atomic
    try:
        summaries = _write_dataset(splits, _convert(splits, scratch), out, scratch / "dataset")
        if out.exists():  # --overwrite: the old folder goes only once the new one is in place
            out.rename(scratch / "replaced")
            try:
                (scratch / "dataset").rename(out)
            except OSError:
                (scratch / "replaced").rename(out)
                raise
        else:
            (scratch / "dataset").rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out / "coco.yaml", summaries
