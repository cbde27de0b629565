"""The leave-one-out ground truth: the planted conv wins back the most when reverted alone; agreement of two orders."""

from __future__ import annotations

import csv
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from qarep_det.evaluation.coco import load_ground_truth
from qarep_det.evaluation.plots import plot_leave_one_out
from qarep_det.evaluation.protocol import EvalProtocol
from qarep_det.quant.backends.base import Job
from qarep_det.quant.backends.simulated import quantize_torch
from qarep_det.quant.calibration import calibration_set
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.reparam import reparameterize_model
from qarep_det.sensitivity.tuning import tuning_set
from qarep_det.ultralytics.checkpoint import load_detector

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # research code, not in the wheel
from leave_one_out_sweep import LeaveOneOut, Reverted, agreement, leave_one_out, write_csv  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CALIB, TUNE = 8, 16  # of the known answer's 24 train images
OTHERS = ("model.0.conv", "model.2.0.conv", "model.24.cv3.1.1.conv")  # the stem, a backbone conv, a head conv


@pytest.fixture(scope="module")
def planted_job(known_answer, tmp_path_factory: pytest.TempPathFactory):
    """The planted model calibrated once, its tuning set, and a Job for the torch backend."""
    fused = reparameterize_model(load_detector(known_answer.planted))
    calib = calibration_set(known_answer.data, known_answer.imgsz, n=CALIB, batch_size=4, progress=False)
    recipe = QuantRecipe(calib_images=CALIB)
    scratch = tmp_path_factory.mktemp("loo")
    job = Job(
        fused=fused,
        calib=calib,
        recipe=recipe,
        imgsz=known_answer.imgsz,
        device="cpu",
        stem=scratch / "planted",
        save=False,
        overwrite=True,
        calibrated=quantize_torch(fused, calib, recipe),
    )
    tuning = tuning_set(
        known_answer.data,
        TUNE,
        seed=0,
        calibration=calib.paths,
        scored=load_ground_truth(known_answer.data).image_files,
    )
    return job, tuning, scratch


def test_the_planted_conv_has_the_largest_revert_one_gain(known_answer, planted_job) -> None:
    job, tuning, scratch = planted_job
    names = [OTHERS[0], known_answer.consumer, *OTHERS[1:]]
    loo = leave_one_out(job, "torch", names, tuning, EvalProtocol(imgsz=known_answer.imgsz), scratch, batch=4,
                        progress=False, fp32_tune_map=60.0)  # fmt: skip
    assert [row.name for row in loo.rows] == names and loo.evaluations == 5 and loo.tune_images == TUNE
    gains = {row.name: row.gain for row in loo.rows}
    assert loo.ranking()[0] == known_answer.consumer
    assert gains[known_answer.consumer] > 30 > max(abs(gains[n]) for n in OTHERS)  # INT8 collapses, one conv restores
    for row in loo.rows:
        assert row.gain == pytest.approx(row.tune_map50_95 - loo.int8_tune_map50_95)
    assert loo.as_dict()["rows"][1]["name"] == known_answer.consumer and loo.fp32_tune_map50_95 == 60.0
    # each half of the tuning images sees the collapse too: the sweep agrees with itself on the planted conv
    assert min(loo.rows[1].half_gains) > 30 > max(abs(g) for row in loo.rows if row.name in OTHERS
                                                 for g in row.half_gains)  # fmt: skip
    assert loo.ranking(0)[0] == loo.ranking(1)[0] == known_answer.consumer and loo.split_half()["same_top1"]

    path = write_csv(loo, scratch / "loo.csv", {"by_name": sorted(names)})
    lines = list(csv.DictReader(path.open()))
    assert [line["name"] for line in lines] == names
    planted = lines[1]
    assert planted["loo_position"] == "1"
    assert planted["by_name_position"] == str(sorted(names).index(planted["name"]) + 1)
    assert float(planted["gain"]) == pytest.approx(gains[known_answer.consumer], abs=1e-3)
    assert float(planted["gain_odd_images"]) == pytest.approx(loo.rows[1].half_gains[1], abs=1e-3)
    assert planted["block"] != planted["name"] and planted["name"].startswith(planted["block"])  # the Rep block's conv
    drawn = plot_leave_one_out({"torch": loo.as_dict()}, {"by_name": sorted(names)}, scratch / "loo.png", "planted")
    assert drawn.stat().st_size > 10_000


def test_leave_one_out_refuses_what_it_cannot_revert(planted_job, known_answer) -> None:
    job, tuning, scratch = planted_job
    protocol = EvalProtocol(imgsz=known_answer.imgsz)
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        leave_one_out(job, "tensorrt", OTHERS, tuning, protocol, scratch)
    with pytest.raises(ValueError, match="convs named twice: model.0.conv"):
        leave_one_out(job, "torch", [*OTHERS, "model.0.conv"], tuning, protocol, scratch)
    kept = job.with_recipe(replace(job.recipe, float_layers=("model.0.conv",)))
    with pytest.raises(ValueError, match="already float in the recipe, nothing to revert: model.0.conv"):
        leave_one_out(kept, "torch", OTHERS, tuning, protocol, scratch)


def test_agreement_of_hand_made_orders() -> None:
    order = [f"conv{i}" for i in range(12)]
    same = agreement(order, order, same_top=(1, 4))
    assert same == {"top5": 1.0, "top10": 1.0, "same_top1": True, "same_top4": True, "tau": pytest.approx(1.0)}
    reversed_ = agreement(order[::-1], order)
    assert reversed_["tau"] == pytest.approx(-1.0) and reversed_["top5"] == 0.0 and reversed_["top10"] == 8 / 10
    # the first five swapped with the next five: top-5 shares none, top-10 all of them; 25 of 66 pairs discordant
    swapped = agreement(order[5:10] + order[:5] + order[10:], order, same_top=(10,))
    assert swapped["top5"] == 0.0 and swapped["top10"] == 1.0 and swapped["same_top10"]
    assert swapped["tau"] == pytest.approx((66 - 2 * 25) / 66)
    # three convs: overlaps are fractions of the convs there are
    assert agreement(["a", "c", "b"], ["a", "b", "c"])["top5"] == 1.0
    with pytest.raises(ValueError, match="two orders of the same convs"):
        agreement(["a", "b"], ["a", "c"])
    with pytest.raises(ValueError, match="two orders of the same convs"):
        agreement(["a", "a"], ["a", "a"])


def test_the_split_half_agreement_compares_the_two_halves_rankings() -> None:
    """Gains that rank the convs one way on the even images and the opposite way on the odd ones: tau -1; the
    ranking on all images is by the whole gains."""
    rows = tuple(Reverted(f"conv{i}", f"conv{i}", 50.0 + i, float(i), (float(i), float(-i))) for i in range(12))
    loo = LeaveOneOut("torch", 16, 50.0, rows, 1.0)
    assert loo.ranking() == loo.ranking(0) == [f"conv{i}" for i in reversed(range(12))]
    assert loo.ranking(1) == [f"conv{i}" for i in range(12)]
    split = loo.split_half()
    assert split["tau"] == pytest.approx(-1.0) and split["top5"] == 0.0 and not split["same_top1"]
    assert loo.as_dict()["split_half"] == split
