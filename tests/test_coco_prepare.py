"""'qarep-det coco': COCO's official downloads (image folders, an annotations folder with captions and keypoints
files beside the instances ones) to a folder Ultralytics trains and scores on and our ptq-eval finds the json in.

The download is made from the real-photo fixture (tests/data/coco_real, see test_coco_real.py): its three photos
and official annotations serve as val2017, and as train2017 with one photo's annotations dropped (an image without
boxes, as COCO has about a thousand). Set ``QAREP_COCO128`` to a coco128 folder (images/train2017 and
annotations/instances_train2017.json of COCO's first 128 train images) to also run the larger check on it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from ultralytics.models.yolo.detect import DetectionValidator

import qarep_det  # noqa: F401  (offline settings before ultralytics is used)
from qarep_det.cli.main import main as qarep_det_main
from qarep_det.data.coco import prepare_coco
from qarep_det.data.dataset import resolve_dataset
from qarep_det.data.labels import read_yolo_label
from qarep_det.evaluation.coco import coco80_names, load_ground_truth

FIXTURE = Path(__file__).resolve().parent / "data" / "coco_real"
UNANNOTATED = "000000000309.jpg"  # its annotations are dropped from the train json
COCO128 = os.environ.get("QAREP_COCO128")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content), encoding="utf-8")


def _without_annotations_of(content: dict[str, Any], file_name: str) -> dict[str, Any]:
    image_id = next(image["id"] for image in content["images"] if image["file_name"] == file_name)
    return {**content, "annotations": [a for a in content["annotations"] if a["image_id"] != image_id]}


def official_download(root: Path) -> Path:
    """COCO's zips unpacked in ``root/download``: train2017/, val2017/, annotations/ with every kind of json."""
    download = root / "download"
    official = _read_json(FIXTURE / "annotations" / "instances_train2017.json")
    for split in ("train2017", "val2017"):
        shutil.copytree(FIXTURE / "images" / "train2017", download / split)
    annotations = download / "annotations"
    annotations.mkdir()
    _write_json(annotations / "instances_train2017.json", _without_annotations_of(official, UNANNOTATED))
    _write_json(annotations / "instances_val2017.json", official)
    for split in ("train2017", "val2017"):  # what makes Ultralytics' convert_coco of the folder fail
        captions = [
            {"id": i, "image_id": image["id"], "caption": "a photo"} for i, image in enumerate(official["images"])
        ]
        _write_json(annotations / f"captions_{split}.json", {**official, "annotations": captions})
        keypoints = [{"id": 1, "name": "person", "supercategory": "person", "keypoints": ["nose"], "skeleton": []}]
        _write_json(annotations / f"person_keypoints_{split}.json", {**official, "categories": keypoints})
    return download


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    _write_json(path, edit(_read_json(path)))


def _without_image(content: dict[str, Any], file_name: str) -> dict[str, Any]:
    return {**content, "images": [image for image in content["images"] if image["file_name"] != file_name]}


VAL_JSON = Path("annotations/instances_val2017.json")


@pytest.fixture
def download(tmp_path: Path) -> Path:
    return official_download(tmp_path)


def _assert_same_labels(ours: Path, expected: Path) -> None:
    """The same label files, with the same rows (6 significant digits as convert_coco writes them)."""
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in expected.iterdir())
    for path in expected.iterdir():
        (cls, boxes), (cls_expected, boxes_expected) = read_yolo_label(ours / path.name, 80), read_yolo_label(path, 80)
        assert np.array_equal(cls, cls_expected)
        np.testing.assert_allclose(boxes, boxes_expected, atol=1e-6)


def test_official_download_to_a_folder_ultralytics_and_ptq_eval_score(
    download: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "datasets" / "coco"
    assert qarep_det_main(["coco", "--images", str(download), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [  # the fixture's labels hold 4, 4 (309) and 16 boxes; 544 has a crowd region
        "train2017: 3 images, 20 boxes in 2 label files (1 images without annotations, 1 crowd regions left out)",
        "val2017: 3 images, 24 boxes in 3 label files (0 images without annotations, 1 crowd regions left out)",
        str(out / "coco.yaml"),
    ]
    assert sorted(p.name for p in out.parent.iterdir()) == ["coco"]  # no build folder left beside it

    _assert_same_labels(out / "labels" / "val2017", FIXTURE / "labels" / "train2017")
    expected_train = tmp_path / "expected_train"
    shutil.copytree(FIXTURE / "labels" / "train2017", expected_train)
    (expected_train / UNANNOTATED).with_suffix(".txt").unlink()
    _assert_same_labels(out / "labels" / "train2017", expected_train)
    photos = sorted(p.name for p in (FIXTURE / "images" / "train2017").iterdir())
    for split in ("train2017", "val2017"):  # every image listed, the one without boxes included
        assert (out / f"{split}.txt").read_text().splitlines() == [f"./images/{split}/{name}" for name in photos]
        assert (out / "images" / split).resolve() == download / split  # linked, not copied
    assert _read_json(out / "annotations" / "instances_val2017.json") == _read_json(
        download / "annotations" / "instances_val2017.json"
    )

    info = resolve_dataset(out / "coco.yaml")  # Ultralytics' check_det_dataset, offline
    assert info["path"] == out and info["val"] == str(out / "val2017.txt") and info["nc"] == 80
    assert list(info["names"].values()) == coco80_names()
    gt = load_ground_truth(out / "coco.yaml")  # ptq-eval's ground truth: the official json, found by itself
    assert gt.annotations == out / "annotations" / "instances_val2017.json"
    assert gt.image_ids == [208, 309, 544]

    args = {"model": str(FIXTURE / "tiny_qarep.pt"), "data": str(out / "coco.yaml"), "imgsz": 160, "batch": 1,
            "save_json": True, "plots": False, "device": "cpu", "project": str(tmp_path), "name": "val",
            "verbose": False}  # fmt: skip
    validator = DetectionValidator(args=args)
    validator()
    assert validator.is_coco and hasattr(validator, "_coco_api")  # scored with faster-coco-eval on the json


def test_overwrite_replaces_the_folder(download: Path, tmp_path: Path) -> None:
    out = tmp_path / "coco"
    prepare_coco(download, download / "annotations", out)
    (out / "stale.txt").write_text("from an earlier run")
    (download / "val2017" / UNANNOTATED).unlink()  # the val split loses a photo
    _edit_json(download / VAL_JSON, lambda c: _without_image(_without_annotations_of(c, UNANNOTATED), UNANNOTATED))
    _, summaries = prepare_coco(download, download / "annotations", out, overwrite=True)
    assert [s.images for s in summaries] == [3, 2]
    assert not (out / "stale.txt").exists()
    assert len((out / "val2017.txt").read_text().splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco", "download"]


def _rename_images(folder: Path) -> None:
    for path in folder.iterdir():
        path.rename(path.with_name(f"9{path.name[1:]}"))


BAD: dict[str, tuple[Callable[[Path], Any], str]] = {
    "missing_split": (lambda d: shutil.rmtree(d / "val2017"), r"image folder '.*val2017' does not exist"),
    "captions_only": (
        lambda d: [p.unlink() for p in (d / "annotations").glob("instances_*.json")],
        r"no instances_train2017\.json in '.*annotations' \(it holds captions_train2017\.json, captions_val2017\.json, "
        r"person_keypoints_train2017\.json, person_keypoints_val2017\.json\)",
    ),
    "no_val_instances": (lambda d: (d / VAL_JSON).unlink(), r"no instances_val2017\.json"),
    "captions_as_instances": (
        lambda d: shutil.copyfile(d / "annotations" / "captions_val2017.json", d / VAL_JSON),
        r"instances_val2017\.json' is not a COCO instances file: no 'bbox' entry",
    ),
    "not_json": (lambda d: (d / VAL_JSON).write_text("{"), r"instances_val2017\.json' is not a COCO instances file"),
    "not_coco_categories": (
        lambda d: _edit_json(d / VAL_JSON, lambda c: {**c, "categories": c["categories"][:-1]}),
        r"does not have COCO's 80 categories: its id 90 is None, COCO's is 'toothbrush'",
    ),
    "another_splits_images": (
        lambda d: _rename_images(d / "val2017"),
        r"'.*val2017' holds none of the 3 images of instances_val2017\.json .*another split's folder",
    ),
    "incomplete_download": (
        lambda d: (d / "train2017" / "000000000544.jpg").unlink(),
        r"'.*train2017' lacks 1 of the 3 images of instances_train2017\.json \(e\.g\. 000000000544\.jpg\)",
    ),
    "one_name_twice": (
        lambda d: _edit_json(d / VAL_JSON, lambda c: {**c, "images": c["images"] + [{**c["images"][0], "id": 1}]}),
        r"instances_val2017\.json' lists 4 images under 3 file names",
    ),
    "unlisted_image": (
        lambda d: shutil.copyfile(d / "val2017" / UNANNOTATED, d / "val2017" / "000000000001.jpg"),
        r"'.*val2017' holds 1 images that instances_val2017\.json does not list \(e\.g\. 000000000001\.jpg\)",
    ),
}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"" for p in root.rglob("*")}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_download_is_one_line_exit_2_and_nothing_written(
    case: str, download: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    breaks, message = BAD[case]
    breaks(download)
    before = _tree(tmp_path)
    out = tmp_path / "datasets" / "coco"
    assert qarep_det_main(["coco", "--images", str(download), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(message, err), err
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("case", ["exists", "is_the_download", "holds_the_download", "inside_the_download"])
def test_bad_out_is_one_line_exit_2_and_nothing_written(
    case: str, download: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = {"exists": tmp_path / "coco", "is_the_download": download, "holds_the_download": tmp_path,
           "inside_the_download": download / "val2017" / "coco"}[case]  # fmt: skip
    overwrite = [] if case == "exists" else ["--overwrite"]  # with --overwrite, the download itself would go
    if case == "exists":
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    before = _tree(tmp_path)
    assert qarep_det_main(["coco", "--images", str(download), "--out", str(out), *overwrite]) == 2
    err = capsys.readouterr().err
    expected = "exists: pass --overwrite to replace it" if case == "exists" else "overlaps the download"
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert _tree(tmp_path) == before


@pytest.mark.skipif(not COCO128, reason="set QAREP_COCO128 to a coco128 folder to run")
def test_coco128_split_in_two_gives_its_labels(tmp_path: Path) -> None:
    """COCO's first 128 train images as a 96 + 32 split: the labels are coco128's own (convert_coco's), file for
    file, and the summary counts the official json's images, crowd regions and boxes."""
    coco128 = Path(str(COCO128))
    official = _read_json(coco128 / "annotations" / "instances_train2017.json")
    images = sorted(official["images"], key=lambda image: image["file_name"])
    download = tmp_path / "download"
    (download / "annotations").mkdir(parents=True)
    for split, part in (("train2017", images[:96]), ("val2017", images[96:])):
        (download / split).mkdir()
        for image in part:
            (download / split / image["file_name"]).symlink_to(coco128 / "images" / "train2017" / image["file_name"])
        ids = {image["id"] for image in part}
        annotations = [a for a in official["annotations"] if a["image_id"] in ids]
        _write_json(
            download / "annotations" / f"instances_{split}.json",
            {**official, "images": part, "annotations": annotations},
        )
    _, summaries = prepare_coco(download, download / "annotations", tmp_path / "coco")
    assert [(s.images, s.crowd) for s in summaries] == [(96, 6), (32, 4)]  # 10 crowd regions in all
    expected = tmp_path / "expected"  # coco128's labels of these images (its folder also holds 2 other images')
    expected.mkdir()
    for image in images:
        label = (coco128 / "labels" / "train2017" / image["file_name"]).with_suffix(".txt")
        if label.exists():
            shutil.copyfile(label, expected / label.name)
    merged = tmp_path / "merged"
    merged.mkdir()
    for split in ("train2017", "val2017"):
        for label in (tmp_path / "coco" / "labels" / split).iterdir():
            shutil.copyfile(label, merged / label.name)
    _assert_same_labels(merged, expected)
    assert sum(s.boxes for s in summaries) == sum(len(p.read_text().splitlines()) for p in expected.iterdir())
    assert yaml.safe_load((tmp_path / "coco" / "coco.yaml").read_text())["path"] == str(tmp_path / "coco")
