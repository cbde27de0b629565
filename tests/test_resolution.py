"""How finely the tuning set resolves --max-drop: per-image AP50-95, the paired standard error, the warning."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest

from qarep_det.evaluation.coco import GroundTruth, evaluate_coco, per_image_map50_95
from qarep_det.sensitivity.max_drop import search_float_convs
from qarep_det.sensitivity.resolution import Resolution

# three images: two classes on the first, one box on the second, nothing on the third
BOXES = {1: [(1, [10, 10, 40, 30]), (2, [60, 50, 30, 40])], 2: [(1, [5, 5, 50, 50])], 3: []}


@pytest.fixture
def truth() -> GroundTruth:
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in BOXES]
    annotations = [
        {"id": n, "image_id": i, "category_id": c, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
        for n, (i, c, box) in enumerate(((i, c, b) for i, boxes in BOXES.items() for c, b in boxes), start=1)
    ]
    dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1}, {"id": 2}, {"id": 3}]}
    return GroundTruth([Path(im["file_name"]) for im in images], list(BOXES), [1, 2, 3], dataset)


def write(path: Path, detections: list[tuple[int, int, list[float], float]]) -> Path:
    path.write_text(json.dumps([{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in detections]))
    return path


PERFECT = [(i, c, box, 0.9) for i, boxes in BOXES.items() for c, box in boxes]


# --- per-image AP50-95 -------------------------------------------------------------------------------------------


def test_per_image_ap_of_perfect_missing_and_no_detections(truth: GroundTruth, tmp_path: Path) -> None:
    assert per_image_map50_95(truth, write(tmp_path / "perfect.json", PERFECT)) == pytest.approx([100.0, 100.0, 0.0])
    assert per_image_map50_95(truth, write(tmp_path / "none.json", [])) == [0.0, 0.0, 0.0]
    # the second class of image 1 missed: its AP is the mean over both classes (100 and 0); image 2 found nothing
    only_first = write(tmp_path / "first.json", [PERFECT[0]])
    assert per_image_map50_95(truth, only_first) == pytest.approx([50.0, 0.0, 0.0])


def test_per_image_ap_is_pycocotools_on_each_image_alone(truth: GroundTruth, tmp_path: Path) -> None:
    """Loose boxes, a false positive of a class the image lacks, a lower-scored duplicate: each image's value is
    what evaluate_coco gives that image alone (the per-image narrowing changes nothing)."""
    detections = [
        (1, 1, [12, 11, 40, 30], 0.9),
        (1, 2, [66, 56, 30, 40], 0.8),
        (1, 3, [0, 0, 20, 20], 0.95),
        (2, 1, [8, 9, 50, 46], 0.7),
        (2, 1, [5, 5, 50, 50], 0.6),
        (2, 2, [5, 5, 50, 50], 0.99),
        (3, 1, [1, 1, 10, 10], 0.5),
    ]
    values = per_image_map50_95(truth, write(tmp_path / "all.json", detections))
    for image_id, value in zip(truth.image_ids, values, strict=True):
        if not BOXES[image_id]:
            assert value == 0.0
            continue
        alone = write(tmp_path / f"{image_id}.json", [d for d in detections if d[0] == image_id])
        expected = evaluate_coco(truth, alone, image_ids=[image_id])["map50_95"]
        assert value == pytest.approx(expected, abs=1e-9) and 0 < value < 100


# --- the standard error ------------------------------------------------------------------------------------------


def test_the_error_pairs_each_images_scores_and_is_zero_for_the_same_model(truth: GroundTruth, tmp_path: Path) -> None:
    """A model that misses the second class of image 1 and image 2's box, against the perfect one: per image 100
    against 50, 100 against 0, 0 against 0, so the differences (50, 100, 0) give a standard error of 50 / sqrt(3);
    the same detections written twice give exactly 0, and then any D is resolved (even 0)."""
    perfect = per_image_map50_95(truth, write(tmp_path / "fp32.json", PERFECT))
    missing = per_image_map50_95(truth, write(tmp_path / "int8.json", [PERFECT[0]]))
    noise = Resolution.paired(perfect, missing)
    assert noise.images == 3 and noise.standard_error == pytest.approx(50 / math.sqrt(3))
    assert not noise.resolves(2 * 50 / math.sqrt(3) - 0.01) and noise.images_needed(15.0) == 45  # 3 * (57.7 / 15)^2
    again = per_image_map50_95(truth, write(tmp_path / "fp32_again.json", PERFECT))
    same = Resolution.paired(perfect, again)
    assert same == Resolution(0.0, 3) and same.resolves(0.0) and same.images_needed(0.0) == 0
    result = search_float_convs(
        ["a", "b", "c", "d"],
        fp32_tune_map=40.0,
        evaluate=lambda _: (40.0, 1.0),
        max_drop=0.0,
        resolution=lambda: same,
        report=lambda _: None,
    )
    assert result.chosen.k == 0 and result.met and result.tune_drop_se == 0.0 and result.tune_images_needed is None


def test_the_paired_standard_error_by_hand() -> None:
    # differences [1, -1, 1, -1]: mean 0, sample variance 4/3, so se = sqrt(4/3) / sqrt(4)
    noise = Resolution.paired([51.0, 49.0, 31.0, 29.0], [50.0, 50.0, 30.0, 30.0])
    assert noise.images == 4 and noise.standard_error == pytest.approx(math.sqrt(4 / 3) / 2)
    # the images' own difficulty (50 against 30) cancels in the pairs: shifting an image shifts both its scores
    assert Resolution.paired([91.0, 9.0, 71.0, 29.0], [90.0, 10.0, 70.0, 30.0]) == noise
    assert noise.resolves(1.155) and not noise.resolves(1.154)  # 2 se = 1.1547
    assert noise.images_needed(0.5) == 22  # ceil(4 * (1.1547 / 0.5) ** 2) = ceil(21.33)
    assert noise.images_needed(2 * noise.standard_error) == 4 and noise.images_needed(4 * noise.standard_error) == 1
    assert noise.images_needed(0.0) is None and not noise.resolves(0.0)
    with pytest.raises(ValueError, match="differ in length: 2 FP32, 1 INT8"):
        Resolution.paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2 images"):
        Resolution.paired([1.0], [1.0])


# --- the warning in the search -----------------------------------------------------------------------------------


def search(max_drop: float, noise: Resolution, calls: list[str] | None = None) -> tuple:
    """A 60-conv search on a fake curve (drop 3 - 0.1 K), its step lines, and its warnings."""
    calls = [] if calls is None else calls
    lines: list[str] = []

    def evaluate(float_set: tuple[str, ...]) -> tuple[float, float]:
        k = len(float_set)
        calls.append(f"K={k}")
        return 40.0 - max(0.0, 3.0 - 0.1 * k), 1.0

    def resolution() -> Resolution:
        calls.append("resolution")
        return noise

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = search_float_convs(
            [f"conv{i}" for i in range(60)],
            fp32_tune_map=40.0,
            evaluate=evaluate,
            max_drop=max_drop,
            resolution=resolution,
            report=lines.append,
        )
    return result, lines, [w for w in caught if issubclass(w.category, UserWarning)]


def test_a_target_below_two_standard_errors_is_warned_about_once() -> None:
    noise = Resolution(0.15, 256)
    calls: list[str] = []
    result, lines, caught = search(0.29, noise, calls)
    assert len(caught) == 1 and len(lines) == len(result.steps) > 2  # one warning for the whole search
    assert str(caught[0].message) == (
        "--max-drop 0.29 is below what 256 tuning images resolve (2 standard errors = 0.30 mAP50-95); "
        "about 274 images would (--tune-images)"  # ceil(256 * (0.30 / 0.29) ** 2)
    )
    assert calls[:2] == ["K=0", "resolution"] and calls.count("resolution") == 1  # once, from K = 0
    assert all("± 0.15" in line for line in lines)  # every step with the same error
    assert result.tune_drop_se == 0.15 and result.tune_images_needed == 274
    _, _, caught = search(0.0, noise)
    assert [str(w.message).split("; ")[1] for w in caught] == ["no number of images resolves 0"]


def test_a_resolved_target_is_not_warned_about() -> None:
    for max_drop in (0.3, 1.0):  # 2 se = 0.3 exactly resolves
        result, lines, caught = search(max_drop, Resolution(0.15, 256))
        assert not caught and result.tune_images_needed is None and result.met
    result, _, caught = search(0.0, Resolution(0.0, 256))
    assert not caught and result.tune_images_needed is None
