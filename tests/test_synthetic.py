"""The synthetic dataset: deterministic, valid YOLO + COCO labels that agree, readable by Ultralytics, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from qarep_det.cli.main import main as qarep_det_main
from qarep_det.data.synthetic import CLASS_NAMES, category_id, make_dataset

REPO = Path(__file__).resolve().parents[1]
SMALL = {"n_train": 6, "n_val": 5, "imgsz": 96}


def _files(root: Path) -> dict[str, bytes]:
    """Every file the generator wrote except data.yaml (its absolute path differs between folders)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "data.yaml"
    }


def _labels(path: Path) -> np.ndarray:
    """A YOLO label file as an (N, 5) float array."""
    rows = [line.split() for line in path.read_text().splitlines()]
    assert all(len(r) == 5 for r in rows), f"{path}: every line needs 5 fields"
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """One small dataset shared by the read-only tests; returns its data.yaml."""
    return make_dataset(tmp_path_factory.mktemp("synthetic"), seed=0, **SMALL)


def test_layout_and_yaml(dataset):
    root = dataset.parent
    data = yaml.safe_load(dataset.read_text())
    assert Path(data["path"]).is_absolute() and Path(data["path"]) == root
    assert (data["train"], data["val"]) == ("images/train", "images/val")
    assert data["names"] == dict(enumerate(CLASS_NAMES)) and "download" not in data
    for split, n in (("train", SMALL["n_train"]), ("val", SMALL["n_val"])):
        images = sorted((root / "images" / split).iterdir())
        assert [p.stem for p in images] == [f"{i:06d}" for i in range(1, n + 1)]
        assert all((root / "labels" / split / f"{p.stem}.txt").is_file() for p in images)


def test_same_seed_identical_bytes_other_seed_differs(dataset, tmp_path):
    again = make_dataset(tmp_path / "again", seed=0, **SMALL)
    other = make_dataset(tmp_path / "other", seed=1, **SMALL)
    reference = _files(dataset.parent)
    assert _files(again.parent) == reference
    changed = _files(other.parent)
    assert changed.keys() == reference.keys()
    assert all(changed[k] != reference[k] for k in reference if k.startswith(("images", "annotations")))


def test_val_split_independent_of_train_and_disjoint(dataset, tmp_path):
    fewer = make_dataset(tmp_path / "fewer", seed=0, n_train=2, n_val=SMALL["n_val"], imgsz=SMALL["imgsz"])
    val = {k: v for k, v in _files(dataset.parent).items() if "val" in k}
    assert val == {k: v for k, v in _files(fewer.parent).items() if "val" in k}
    train_images = {p.read_bytes() for p in (dataset.parent / "images" / "train").iterdir()}
    assert not train_images & {p.read_bytes() for p in (dataset.parent / "images" / "val").iterdir()}


def test_yolo_labels_valid(dataset):
    label_files = sorted((dataset.parent / "labels").rglob("*.txt"))
    assert len(label_files) == SMALL["n_train"] + SMALL["n_val"]
    counts = []
    for path in label_files:
        lb = _labels(path)
        counts.append(len(lb))
        assert np.all(lb[:, 0] == lb[:, 0].round()) and lb[:, 0].min() >= 0 and lb[:, 0].max() < len(CLASS_NAMES)
        assert np.all((lb[:, 1:] > 0) & (lb[:, 1:] <= 1)), path
        xc, yc, w, h = lb[:, 1:].T
        assert np.all(
            (xc - w / 2 >= -1e-6) & (xc + w / 2 <= 1 + 1e-6) & (yc - h / 2 >= -1e-6) & (yc + h / 2 <= 1 + 1e-6)
        )
    assert min(counts) >= 1


def test_coco_json_matches_yolo_labels(dataset):
    from pycocotools.coco import COCO

    root = dataset.parent
    coco = COCO(str(root / "annotations" / "instances_val.json"))
    assert sorted(coco.getCatIds()) == [category_id(c) for c in range(len(CLASS_NAMES))]
    assert category_id(0) == 1
    assert len(coco.getImgIds()) == SMALL["n_val"]
    for image in coco.loadImgs(coco.getImgIds()):
        assert image["id"] == int(Path(image["file_name"]).stem)  # Ultralytics' image id for numeric stems
        assert (image["width"], image["height"]) == (SMALL["imgsz"], SMALL["imgsz"])
        assert (root / "images" / "val" / image["file_name"]).is_file()
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        lb = _labels(root / "labels" / "val" / f"{Path(image['file_name']).stem}.txt")
        assert len(anns) == len(lb)
        s = SMALL["imgsz"]
        yolo_xywh = np.c_[(lb[:, 1] - lb[:, 3] / 2) * s, (lb[:, 2] - lb[:, 4] / 2) * s, lb[:, 3] * s, lb[:, 4] * s]
        np.testing.assert_allclose([a["bbox"] for a in anns], yolo_xywh, atol=1.0)
        assert [a["category_id"] for a in anns] == [category_id(int(c)) for c in lb[:, 0]]
        assert all(a["iscrowd"] == 0 and 0 < a["area"] <= a["bbox"][2] * a["bbox"][3] for a in anns)


def test_ultralytics_reads_dataset(dataset):
    from ultralytics.data.utils import check_det_dataset, verify_image_label

    data = check_det_dataset(str(dataset))
    assert data["nc"] == len(CLASS_NAMES)
    assert Path(data["train"]).is_dir() and Path(data["val"]).is_dir()
    for image in sorted(Path(data["val"]).iterdir()):
        label = dataset.parent / "labels" / "val" / f"{image.stem}.txt"
        *_, n_corrupt, message = verify_image_label((str(image), str(label), "", False, data["nc"], 0, 0, False))
        assert n_corrupt == 0 and message == "", message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_train": 0}, "n_train"),
        ({"n_val": 0}, "n_val"),
        ({"imgsz": 31}, "imgsz"),
        ({"seed": -1}, "seed"),
        ({"n_classes": 0}, "n_classes"),
        ({"n_classes": len(CLASS_NAMES) + 1}, "n_classes"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_dataset(tmp_path / "out", **{**SMALL, **kwargs})
    assert not (tmp_path / "out").exists()


def test_refuses_non_empty_folder_unless_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        make_dataset(tmp_path, **SMALL)
    make_dataset(tmp_path, n_train=3, n_val=2, imgsz=64, overwrite=True)
    make_dataset(tmp_path, n_train=1, n_val=1, imgsz=64, overwrite=True)
    assert len(list((tmp_path / "images" / "train").iterdir())) == 1  # no stale images from the larger run
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        make_dataset(tmp_path / "file", **SMALL)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    """Run the tool as a user would, ``--help`` and a bad input side by side (each pays seconds of package import).

    Returns ``{case: (exit status, stdout, stderr)}``.
    """
    out = tmp_path_factory.mktemp("cli") / "ds"
    cases = {"help": ["--help"], "error": ["--out", str(out), "--train", "0"]}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "tools/make_dataset.py", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in cases.items()
    }
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        results[name] = (proc.returncode, stdout, stderr)
    return results


def test_cli_bad_input_exits_with_one_line_error(cli_runs):
    status, _, stderr = cli_runs["error"]
    assert status != 0
    assert stderr.strip() == "error: n_train must be >= 1, got 0"


def test_cli_help_shows_defaults(cli_runs):
    status, stdout, _ = cli_runs["help"]
    assert status == 0
    for default in ("datasets/synthetic", "512", "128", "160", "(default: 0)"):
        assert default in stdout


@pytest.fixture(scope="module")
def cli_main():
    """``qarep-det make-dataset`` in-process (through the command that reports bad input), for the cases that need no
    fresh interpreter."""
    return lambda argv: qarep_det_main(["make-dataset", *argv])


def test_cli_writes_dataset_and_prints_yaml(cli_main, tmp_path, capsys):
    out = tmp_path / "ds"
    assert cli_main(["--out", str(out), "--train", "2", "--val", "1", "--imgsz", "64", "--classes", "3"]) == 0
    yaml_path = Path(capsys.readouterr().out.strip())
    assert yaml_path == out / "data.yaml" and yaml_path.is_file()
    assert len(yaml.safe_load(yaml_path.read_text())["names"]) == 3
