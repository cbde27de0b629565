"""Evaluation library: ground truth from YOLO labels, pycocotools mAP, streamed predictions, result tables."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import ptq_row

import qarep_det  # noqa: F401  (offline settings before ultralytics)
from qarep_det.data.images import list_images
from qarep_det.evaluation.coco import coco80_names, evaluate_coco, ground_truth_from_labels, load_ground_truth
from qarep_det.evaluation.predict import evaluate_runner, predict_to_json
from qarep_det.evaluation.protocol import EvalProtocol
from qarep_det.evaluation.table import (
    COLUMNS,
    format_console,
    format_markdown,
    normalize_rows,
    read_results,
    write_results,
)
from qarep_det.quant.runner import torch_runner

NAMES = ["square", "circle"]
IMGSZ = 64
# image name -> (height, width, objects as (class, xyxy in original pixels)); None: no label file
SPECS: dict[str, tuple[int, int, list[tuple[int, tuple[float, float, float, float]]] | None]] = {
    "a.jpg": (48, 64, [(0, (10, 5, 40, 30))]),  # wide: padded top and bottom
    "b.png": (80, 40, [(1, (5, 20, 30, 70)), (0, (2, 2, 12, 10))]),  # tall: padded left and right
    "c.png": (20, 20, None),  # no label file: no objects
    "d.png": (30, 45, [(1, (5, 5, 40, 25))]),  # odd padding (21 px) and a fractional gain
}


def _write_dataset(root: Path) -> list[Path]:
    """Images under images/val, YOLO labels under labels/val; b's label holds polygons and a duplicate row."""
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (h, w, objects) in SPECS.items():
        cv2.imwrite(str(root / "images" / "val" / name), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        if objects is None:
            continue
        rows = []
        for cls, (x1, y1, x2, y2) in objects:
            rows.append(
                f"{cls} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
            )
        if name == "b.png":  # polygons (a file holds boxes or polygons, not both), the first object twice
            rows = [
                f"{cls} " + " ".join(f"{x / w:.6f} {y / h:.6f}" for x, y in ((x1, y1), (x2, y1), (x2, y2), (x1, y2)))
                for cls, (x1, y1, x2, y2) in objects
            ]
            rows.append(rows[0])
        (root / "labels" / "val" / name).with_suffix(".txt").write_text("\n".join(rows) + "\n")
    return list_images(root / "images" / "val")


def _ltwh(xyxy: tuple[float, ...]) -> list[float]:
    return [xyxy[0], xyxy[1], xyxy[2] - xyxy[0], xyxy[3] - xyxy[1]]


def _letterboxed(h: int, w: int, xyxy: tuple[float, ...]) -> list[float]:
    """A box in letterboxed pixels, placed independently of the code under test (Ultralytics LetterBox's rules)."""
    gain = min(IMGSZ / h, IMGSZ / w)
    new_w, new_h = round(w * gain), round(h * gain)
    left, top = round((IMGSZ - new_w) / 2 - 0.1), round((IMGSZ - new_h) / 2 - 0.1)
    sx, sy = new_w / w, new_h / h
    return [xyxy[0] * sx + left, xyxy[1] * sy + top, xyxy[2] * sx + left, xyxy[3] * sy + top]


def _fake_runner(files: list[Path], nc: int = 2, anchors: int = 8, score: float = 0.9):
    """A runner that 'detects' each image's SPECS objects in letterboxed xywh, plus one box below conf."""
    queue = iter(files)

    def run(images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, IMGSZ, IMGSZ)
        assert 0.0 <= images.min() and images.max() <= 1.0
        out = torch.zeros(images.shape[0], 4 + nc, anchors)
        for b in range(images.shape[0]):
            h, w, objects = SPECS[next(queue).name]
            out[b, :4, -1] = torch.tensor([32.0, 32.0, 10.0, 10.0])  # scored under conf: must be dropped
            out[b, 4, -1] = 0.0005
            for a, (cls, xyxy) in enumerate(objects or []):
                x1, y1, x2, y2 = _letterboxed(h, w, xyxy)
                out[b, :4, a] = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
                out[b, 4 + cls, a] = score
        return out

    return run


@pytest.fixture
def dataset(tmp_path: Path) -> list[Path]:
    return _write_dataset(tmp_path / "data")


def _detections_from_gt(gt_dict: dict, shift: float = 0.0) -> list[dict]:
    """Ground-truth boxes as score-1 detections, optionally shifted right by a fraction of their width."""
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": [a["bbox"][0] + shift * a["bbox"][2], *a["bbox"][1:]],
            "score": 1.0,
        }
        for a in gt_dict["annotations"]
    ]


def test_ground_truth_from_labels(dataset: list[Path]) -> None:
    gt = ground_truth_from_labels(dataset, NAMES)
    d = gt.annotations
    assert [im["file_name"] for im in d["images"]] == [str(p) for p in dataset]
    assert [(im["id"], im["height"], im["width"]) for im in d["images"]] == [
        (i + 1, SPECS[p.name][0], SPECS[p.name][1]) for i, p in enumerate(dataset)
    ]
    assert d["categories"] == [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}]
    by_image: dict[int, list] = {}
    for a in d["annotations"]:
        by_image.setdefault(a["image_id"], []).append((a["category_id"], a["bbox"]))
        assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3]) and a["iscrowd"] == 0
    assert sorted(a["id"] for a in d["annotations"]) == list(range(1, len(d["annotations"]) + 1))
    for p in dataset:
        objects = SPECS[p.name][2] or []  # b: polygons boxed, duplicate row dropped; c: no label file
        got = sorted(by_image.get(gt.image_id(p), []))
        assert [c for c, _ in got] == sorted(c + 1 for c, _ in objects)
        expected = sorted((c + 1, _ltwh(xyxy)) for c, xyxy in objects)
        for (_, box), (_, want) in zip(got, expected, strict=True):
            np.testing.assert_allclose(box, want, atol=1e-3)
    assert gt.category_id(1) == 2
    with pytest.raises(KeyError, match="not part"):
        gt.image_id("elsewhere.jpg")


def test_load_ground_truth_from_yaml(dataset: list[Path], tmp_path: Path) -> None:
    yaml = tmp_path / "data.yaml"
    yaml.write_text(
        f"path: {tmp_path / 'data'}\ntrain: images/val\nval: images/val\nnames:\n  0: square\n  1: circle\n"
    )
    gt = load_ground_truth(yaml)
    assert gt.image_files == dataset and "YOLO labels" in gt.description
    assert [c["name"] for c in gt.annotations["categories"]] == NAMES


def test_bad_label_file_fails_loudly(dataset: list[Path]) -> None:
    label = dataset[0].parents[2] / "labels" / "val" / "a.txt"
    label.write_text("0 0.5 0.5 0.1 0.1\n5 0.5 0.5 0.1 0.1\n")
    with pytest.raises(ValueError, match=r"a\.txt' line 2: class 5 is not an integer in 0\.\.1"):
        ground_truth_from_labels(dataset, NAMES)
    label.write_text("0 0.5 0.5 0.1 0.1\n1 0.1 0.1 0.2 0.1 0.2 0.2\n")  # the rule training applies too
    with pytest.raises(ValueError, match="mixes boxes and polygons"):
        ground_truth_from_labels(dataset, NAMES)


def test_coco_json_ids(tmp_path: Path) -> None:
    images = tmp_path / "coco" / "images" / "val2017"
    images.mkdir(parents=True)
    cv2.imwrite(str(images / "000000000042.jpg"), np.zeros((20, 30, 3), np.uint8))
    instances = tmp_path / "coco" / "annotations" / "instances_val2017.json"
    instances.parent.mkdir()
    coco_gt = {
        "images": [{"id": 42, "width": 30, "height": 20}],
        "annotations": [{"id": 1, "image_id": 42, "category_id": 90, "bbox": [1, 2, 10, 8], "area": 80, "iscrowd": 0}],
        "categories": [{"id": 90, "name": "toothbrush"}],
    }
    instances.write_text(json.dumps(coco_gt))
    info = {"path": str(tmp_path / "coco"), "val": str(images), "names": dict(enumerate(coco80_names()))}
    gt = load_ground_truth(info)  # found at the standard place
    assert gt.annotations == instances and gt.image_ids == [42]
    assert gt.image_id(images / "000000000042.jpg") == 42
    assert (gt.category_id(0), gt.category_id(79)) == (1, 90)
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": 42, "category_id": 90, "bbox": [1, 2, 10, 8], "score": 0.9}]))
    assert evaluate_coco(gt, dets)["map50_95"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="not COCO"):
        load_ground_truth({**info, "names": {0: "a"}}, instances_json=instances)


def test_map_perfect_shifted_and_empty(dataset: list[Path], tmp_path: Path) -> None:
    gt = ground_truth_from_labels(dataset, NAMES)
    gt_json = gt.save(tmp_path / "gt.json")
    scores = {}
    for name, dets in {
        "perfect": _detections_from_gt(gt.annotations),
        "shifted": _detections_from_gt(gt.annotations, shift=0.5),
        "none": [],
    }.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(dets))
        scores[name] = evaluate_coco(gt_json, path)
    assert scores["perfect"]["map50_95"] == pytest.approx(100.0) and scores["perfect"]["map50"] == pytest.approx(100.0)
    assert scores["shifted"]["map50_95"] < 50.0 and scores["shifted"]["map50"] < 50.0  # IoU 1/3
    assert scores["none"]["map50_95"] == 0.0 and scores["none"]["map50"] == 0.0 and scores["none"]["detections"] == 0
    stray = tmp_path / "stray.json"
    stray.write_text(json.dumps([{"image_id": 999, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}]))
    with pytest.raises(ValueError, match="outside"):
        evaluate_coco(gt, stray)


def test_predict_to_json_maps_boxes_back(dataset: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import itertools
    import statistics
    from types import SimpleNamespace

    from qarep_det.evaluation import predict as predict_module

    ticks = itertools.count()  # predict.py's clock: 4 ms a reading, so each runner call takes exactly 4 ms
    monkeypatch.setattr(predict_module, "time", SimpleNamespace(perf_counter=lambda: 0.004 * next(ticks)))
    gt = ground_truth_from_labels(dataset, NAMES)
    out = tmp_path / "pred" / "detections.json"
    stats = predict_to_json(
        _fake_runner(dataset),
        dataset,
        IMGSZ,
        out,
        image_id_fn=gt.image_id,
        category_id_fn=gt.category_id,
        batch=3,  # a full batch and a partial one
        progress=False,
    )
    dets = json.loads(out.read_text())
    expected = [(gt.image_id(p), c + 1, _ltwh(xyxy)) for p in dataset for c, xyxy in SPECS[p.name][2] or []]
    assert stats.images == len(dataset) and stats.detections == len(dets) == len(expected)
    per_image_ms = [4.0 / 3, 4.0 / (len(dataset) - 3)]  # a full batch of 3 and the partial one
    assert stats.protocol == EvalProtocol(imgsz=IMGSZ)
    assert stats.runner_ms == pytest.approx(statistics.median(per_image_ms))
    assert not out.with_name(out.name + ".partial").exists()
    got = sorted((d["image_id"], d["category_id"], d["bbox"]) for d in dets)
    for (image_id, cat, box), (want_id, want_cat, want_box) in zip(got, sorted(expected), strict=True):
        assert (image_id, cat) == (want_id, want_cat)
        np.testing.assert_allclose(box, want_box, atol=1.0)
    assert all(d["score"] == pytest.approx(0.9) for d in dets)
    metrics = evaluate_coco(gt, out)
    assert metrics["map50"] == pytest.approx(100.0) and metrics["map50_95"] > 90.0


def test_predict_zero_detections_is_valid_json(dataset: list[Path], tmp_path: Path) -> None:
    gt = ground_truth_from_labels(dataset, NAMES)
    out = tmp_path / "none.json"
    stats = predict_to_json(
        lambda x: torch.zeros(x.shape[0], 6, 8), dataset, IMGSZ, out, image_id_fn=gt.image_id,
        category_id_fn=gt.category_id, progress=False,
    )  # fmt: skip
    assert json.loads(out.read_text()) == [] and stats.detections == 0
    assert evaluate_coco(gt, out)["map50_95"] == 0.0
    empty = tmp_path / "empty.json"
    predict_to_json(lambda x: x, [], IMGSZ, empty, image_id_fn=gt.image_id, category_id_fn=gt.category_id)
    assert json.loads(empty.read_text()) == []


def test_unreadable_image_leaves_no_results_file(dataset: list[Path], tmp_path: Path) -> None:
    gt = ground_truth_from_labels(dataset, NAMES)
    dataset[-1].write_bytes(b"not an image")
    out = tmp_path / "dets.json"
    with pytest.raises(ValueError, match="cannot read image"):
        predict_to_json(
            _fake_runner(dataset), dataset, IMGSZ, out, image_id_fn=gt.image_id,
            category_id_fn=gt.category_id, batch=2, progress=False,
        )  # fmt: skip
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


class _TupleModel(torch.nn.Module):
    """Returns (y, raw) like an Ultralytics DetectionModel in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        return (x[:, :1].flatten(2).repeat(1, 6, 1) * self.scale, [])


def test_torch_runner_and_evaluate_runner(dataset: list[Path], tmp_path: Path) -> None:
    model = _TupleModel().train()
    runner = torch_runner(model, "cpu")
    y = runner(torch.rand(2, 3, 8, 8))
    assert not model.training and y.shape == (2, 6, 64) and not y.requires_grad
    gt = ground_truth_from_labels(dataset, NAMES)
    result = evaluate_runner(
        _fake_runner(dataset), gt, tmp_path / "d.json", protocol=EvalProtocol(imgsz=IMGSZ), progress=False
    )
    assert result["map50"] == pytest.approx(100.0) and result["protocol"].startswith(f"{IMGSZ} px")


def test_tables_and_results_round_trip(tmp_path: Path) -> None:
    qarep = ptq_row(
        model="yolo_qarep_s",
        params=9_031_234,
        calib_images=512,
        fp32_map50_95=64.1234,
        int8_map50_95=61.5678,
        drop=64.1234 - 61.5678,
        fp32_map50=86.1,
        int8_map50=85.94,
        fp32_ms=12.345,
        int8_ms=float("nan"),
        fp32_mb=22.34567,
    )
    repvgg = ptq_row(model="yolo_repvgg_s", backend="openvino", fp32_map50_95=62.8, int8_map50_95=61.8, drop=1.0)
    rows = [qarep, repvgg]
    protocol = EvalProtocol()
    console, markdown = format_console(rows, protocol), format_markdown(rows, protocol)
    for text in console, markdown:
        for _, header in COLUMNS:
            assert header in text
        for value in ("yolo_qarep_s", "9.03M", "torch", "max", "512", "64.12", "61.57", "2.56", "12.35"):
            assert value in text
        assert protocol.describe() in text
    assert "fp32_mb" in markdown and "22.35" in markdown  # other fields: in the files only
    assert "fp32_mb" not in console and "22.35" not in console
    assert "int8_mb" not in markdown and "tune_drop" not in markdown  # no row has a value: no column
    assert len({len(line) for line in console.splitlines()[:2]}) == 1  # header and rule line up
    json_path, md_path = write_results(rows, tmp_path / "run", protocol)
    records = json.loads(json_path.read_text())
    assert records == normalize_rows([replace(r, protocol=protocol.describe()) for r in rows])
    assert records[0]["drop"] == 2.56 and records[0]["int8_ms"] is None and records[1]["drop"] == 1.0
    assert md_path.read_text() == format_markdown(read_results(json_path))
