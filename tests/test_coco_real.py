"""The COCO path on real COCO files: 3 train2017 photos and their official annotations (tests/data/coco_real).

The fixture images (see its ATTRIBUTION.md) were picked for what the COCO path must get right: a crowd region
(000000000544), categories whose COCO ids are above 80 (sink 81 and toothbrush 90 in 000000000208, teddy bear 88 in
000000000309) and three image sizes. The scored layout is Ultralytics' COCO one: a ``val2017.txt`` image list beside
``annotations/instances_val2017.json``, which is what makes its ``DetectionValidator`` score with faster-coco-eval.

The compared model, ``tiny_qarep.pt`` (a QARep detector at 1/16 of YOLOv6-N's width, 1.6 MB, overfit on the 3
photos), was made once by ``python tests/test_coco_real.py`` (:func:`train_fixture_model`; 11 min on 2 busy cores of
an AMD EPYC): from scratch, a detector needs a few hundred steps before any score passes the 0.001 threshold, too
long for every test run. Retraining gives another model (CPU float sums differ); no test depends on its figures.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from ultralytics.data.converter import coco80_to_coco91_class, convert_coco
from ultralytics.models.yolo.detect import DetectionValidator

import qarep_det  # noqa: F401  (offline settings before ultralytics is used)
from qarep_det.cli.main import main as cli_main
from qarep_det.data.labels import read_yolo_label
from qarep_det.evaluation.coco import coco80_names, load_ground_truth
from qarep_det.evaluation.predict import evaluate_runner
from qarep_det.evaluation.protocol import EvalProtocol
from qarep_det.quant.runner import torch_runner
from qarep_det.ultralytics.checkpoint import load_fused

FIXTURE = Path(__file__).resolve().parent / "data" / "coco_real"
OFFICIAL_JSON = FIXTURE / "annotations" / "instances_train2017.json"
CHECKPOINT = FIXTURE / "tiny_qarep.pt"
IMGSZ = 160  # the fixture model's training size

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def coco_layout(root: Path) -> Path:
    """The fixture in Ultralytics' COCO layout under ``root/coco``; returns its data YAML.

    Images and YOLO labels under ``images/val2017`` and ``labels/val2017``, the list ``val2017.txt``, the official
    json as ``annotations/instances_val2017.json`` (train2017 images scored as the val split, as Ultralytics'
    coco128 does).
    """
    coco = root / "coco"
    shutil.copytree(FIXTURE / "images" / "train2017", coco / "images" / "val2017")
    shutil.copytree(FIXTURE / "labels" / "train2017", coco / "labels" / "val2017")
    (coco / "annotations").mkdir()
    shutil.copy(OFFICIAL_JSON, coco / "annotations" / "instances_val2017.json")
    images = sorted((coco / "images" / "val2017").glob("*.jpg"))
    (coco / "val2017.txt").write_text("".join(f"./images/val2017/{p.name}\n" for p in images))
    data = {"path": str(coco), "train": "val2017.txt", "val": "val2017.txt", "names": dict(enumerate(coco80_names()))}
    (coco / "coco.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return coco / "coco.yaml"


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return coco_layout(tmp_path)


def _official() -> dict[str, Any]:
    return json.loads(OFFICIAL_JSON.read_text())


def test_fixture_covers_what_it_is_for() -> None:
    official = _official()
    licences = {lic["id"]: lic["name"] for lic in official["licenses"]}
    redistributable = {"Attribution License", "Attribution-ShareAlike License", "Attribution-NoDerivs License",
                       "No known copyright restrictions"}  # fmt: skip
    assert all(licences[image["license"]] in redistributable for image in official["images"])
    attribution = (FIXTURE / "ATTRIBUTION.md").read_text()
    assert all(image["file_name"] in attribution and image["flickr_url"] in attribution for image in official["images"])
    assert sorted(p.name for p in (FIXTURE / "images" / "train2017").iterdir()) == sorted(
        image["file_name"] for image in official["images"]
    )
    assert any(a["iscrowd"] for a in official["annotations"])
    assert len({a["category_id"] for a in official["annotations"] if a["category_id"] > 80}) >= 3
    assert len({(image["width"], image["height"]) for image in official["images"]}) == len(official["images"])
    assert len(official["categories"]) == 80


def test_convert_coco_gives_the_fixture_labels(tmp_path: Path) -> None:
    """The README's COCO recipe, Ultralytics' ``convert_coco`` of the official json, writes the fixture's labels."""
    convert_coco(str(OFFICIAL_JSON.parent), str(tmp_path / "converted"), use_segments=False, cls91to80=True)
    converted = sorted((tmp_path / "converted" / "labels" / "train2017").glob("*.txt"))
    assert [p.name for p in converted] == sorted(p.name for p in (FIXTURE / "labels" / "train2017").iterdir())
    for path in converted:
        ours = read_yolo_label(FIXTURE / "labels" / "train2017" / path.name, nc=80)
        theirs = read_yolo_label(path, nc=80)
        assert len(ours[0]) > 0 and np.array_equal(ours[0], theirs[0])
        np.testing.assert_allclose(ours[1], theirs[1], atol=1e-6)  # both written to 6 significant digits


def _perfect_detector(files: list[Path], imgsz: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A runner whose raw output, for each image in turn (batch 1), is its official non-crowd boxes.

    Boxes are placed where Ultralytics' letterbox puts the image (scale ``min(imgsz / h, imgsz / w)``, padding split
    with its rounding), as xywh in input pixels followed by a score of 1 for the box's class index, which is the
    inverse of COCO's 80-to-91 category ids.
    """
    official = _official()
    sizes = {image["id"]: (image["height"], image["width"]) for image in official["images"]}
    class_index = {category_id: i for i, category_id in enumerate(coco80_to_coco91_class())}
    queue = iter(files)

    def run(images: torch.Tensor) -> torch.Tensor:
        assert images.shape[0] == 1
        image_id = int(next(queue).stem)
        (h, w), boxes = sizes[image_id], []
        gain = min(imgsz / h, imgsz / w)
        left, top = round((imgsz - round(w * gain)) / 2 - 0.1), round((imgsz - round(h * gain)) / 2 - 0.1)
        for a in official["annotations"]:
            if a["image_id"] == image_id and not a["iscrowd"]:
                x, y, bw, bh = a["bbox"]
                scores = [0.0] * 80
                scores[class_index[a["category_id"]]] = 1.0
                boxes.append([(x + bw / 2) * gain + left, (y + bh / 2) * gain + top, bw * gain, bh * gain, *scores])
        return torch.tensor(boxes, dtype=torch.float64).T[None].float()

    return run


def test_ground_truth_as_detections_scores_100(data: Path, tmp_path: Path) -> None:
    """Ids from file names, 80-to-91 classes, boxes back in original pixels, crowd ignored: all right, or not 100."""
    gt = load_ground_truth(data)
    assert gt.annotations == data.parent / "annotations" / "instances_val2017.json"  # found beside val2017.txt
    out = tmp_path / "detections.json"
    runner = _perfect_detector(gt.image_files, IMGSZ)
    metrics = evaluate_runner(runner, gt, out, protocol=EvalProtocol(imgsz=IMGSZ), batch=1, progress=False)
    official = _official()
    non_crowd = [a for a in official["annotations"] if not a["iscrowd"]]
    detections = json.loads(out.read_text())
    assert len(detections) == len(non_crowd) < len(official["annotations"])
    assert {d["image_id"] for d in detections} == {image["id"] for image in official["images"]}
    assert {d["category_id"] for d in detections} == {a["category_id"] for a in non_crowd}
    # the crowd region is not a missed box (recall 1) and nothing matched it is a false positive (precision 1)
    assert metrics["map50_95"] == pytest.approx(100.0) and metrics["map50"] == pytest.approx(100.0)


def test_our_scores_equal_ultralytics_coco_evaluation(data: Path, tmp_path: Path) -> None:
    """ptq_eval's FP32 scoring of a checkpoint matches Ultralytics' own COCO evaluation of it (faster-coco-eval)."""
    gt = load_ground_truth(data)
    runner = torch_runner(load_fused(CHECKPOINT).fused)
    ours = evaluate_runner(runner, gt, tmp_path / "ours.json", protocol=EvalProtocol(imgsz=IMGSZ), progress=False)
    args = {"model": str(CHECKPOINT), "data": str(data), "imgsz": IMGSZ, "batch": 1, "save_json": True,
            "plots": False, "device": "cpu", "project": str(tmp_path), "name": "val", "verbose": False}  # fmt: skip
    validator = DetectionValidator(args=args)
    stats = validator()
    assert validator.is_coco and hasattr(validator, "_coco_api")  # it scored with faster-coco-eval, not its own mAP
    assert ours["map50_95"] > 3.0 and ours["map50"] > 3.0  # it detects: the comparison means something
    assert ours["map50_95"] == pytest.approx(100 * stats["metrics/mAP50-95(B)"], abs=0.1)
    assert ours["map50"] == pytest.approx(100 * stats["metrics/mAP50(B)"], abs=0.1)


def _edit_json(data: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = data.parent / "annotations" / "instances_val2017.json"
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def _other_images(content: dict[str, Any]) -> None:
    for entry in content["images"]:
        entry["id"] += 1_000_000
    for entry in content["annotations"]:
        entry["image_id"] += 1_000_000


def _one_image_less(content: dict[str, Any]) -> None:
    content["images"] = [image for image in content["images"] if image["id"] != 309]
    content["annotations"] = [a for a in content["annotations"] if a["image_id"] != 309]


def _contiguous_ids(content: dict[str, Any]) -> None:  # Ultralytics' custom-json convention, not COCO's
    to80 = {c: i for i, c in enumerate(coco80_to_coco91_class())}
    for entry in content["categories"]:
        entry["id"] = to80[entry["id"]] + 1
    for entry in content["annotations"]:
        entry["category_id"] = to80[entry["category_id"]] + 1


def _class_id_80(data: Path) -> None:  # no json: the ground truth comes from the labels
    (data.parent / "annotations" / "instances_val2017.json").unlink()
    with open(data.parent / "labels" / "val2017" / "000000000309.txt", "a") as f:
        f.write("80 0.5 0.5 0.2 0.2\n")


BROKEN: dict[str, tuple[Callable[[Path], None], str]] = {
    "json_of_other_images": (lambda d: _edit_json(d, _other_images), r"has none of the split's 3 images"),
    "json_of_another_split": (lambda d: _edit_json(d, _one_image_less), r"lacks 1 of the split's 3 .*000000000309"),
    "categories_not_coco": (lambda d: _edit_json(d, _contiguous_ids), r"not COCO's .*id 12 is 'stop sign'"),
    "not_json": (lambda d: (d.parent / "annotations" / "instances_val2017.json").write_text("{"), "not a COCO"),
    "label_class_id_ge_nc": (_class_id_80, r"000000000309\.txt' line 5: class 80 is not an integer in 0\.\.79"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_mismatch_refused_in_one_line_before_predicting(case: str, data: Path, tmp_path: Path, capsys) -> None:
    """Each mismatch fails when the ground truth is built (before any model), and ptq_eval stops there, one line."""
    breaks, message = BROKEN[case]
    breaks(data)
    with pytest.raises(ValueError, match=message) as e:
        load_ground_truth(data)
    assert "\n" not in str(e.value)
    bogus = tmp_path / "not_a_checkpoint.pt"  # a model loaded before the check would fail on this instead
    bogus.write_bytes(b"")
    out = tmp_path / "out"
    argv = ["--weights", str(bogus), "--data", str(data), "--out", str(out), "--imgsz", str(IMGSZ)]
    assert cli_main(["ptq-eval", *argv]) == 2
    assert capsys.readouterr().err == f"error: {e.value}\n"
    assert not out.exists()


def train_fixture_model(out: Path = CHECKPOINT) -> None:
    """Make ``tiny_qarep.pt``: yolo_qarep_n at width 1/16, 300 epochs on the 3 fixture photos at 160 px.

    AdamW at lr0 0.01, no mosaic (as few images need), no validation during training; the last epoch's weights.
    """
    import tempfile

    from qarep_det.models import model_yaml
    from qarep_det.ultralytics.run_options import TrainOptions
    from qarep_det.ultralytics.trainer import train

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        cfg = yaml.safe_load(model_yaml("yolo_qarep_n.yaml").read_text())
        (root / "tiny_qarep.yaml").write_text(yaml.safe_dump({**cfg, "width_multiple": 0.0625}, sort_keys=False))
        hyp = {"optimizer": "AdamW", "lr0": 0.01, "mosaic": 0.0, "close_mosaic": 0, "val": False, "plots": False}
        options = TrainOptions(cfg=root / "tiny_qarep.yaml", data=coco_layout(root), epochs=300, imgsz=IMGSZ,
                               batch=3, device="cpu", workers=0, project=root / "runs", hyp=hyp)  # fmt: skip
        shutil.copy(train(options).last, out)


if __name__ == "__main__":
    train_fixture_model(Path(sys.argv[1]) if len(sys.argv) > 1 else CHECKPOINT)
