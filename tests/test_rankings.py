"""The sensitivity rankings: each finds the planted conv, the revert-one passes equal full forwards, the gradient
ranking's labels land where the letterbox puts the objects, and bad input fails in one line before any work."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from qarep_det.cli.main import main as cli_main
from qarep_det.quant.backends.simulated import quantize_torch
from qarep_det.quant.calibration import calibration_set
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.runner import first_output
from qarep_det.sensitivity.analysis import add_detection, set_quantizers
from qarep_det.sensitivity.diagnostics import NoisePower
from qarep_det.sensitivity.rankings import RANKINGS, check_ranking, labelled_batches, rank_sensitivity, revert_noise
from qarep_det.ultralytics.checkpoint import load_fused

CALIB, RANKED = 8, 4


@pytest.fixture(scope="module")
def planted(known_answer):
    """The planted detector fused, its calibration set and recipe."""
    fused = load_fused(known_answer.planted).fused
    recipe = QuantRecipe(calib_images=CALIB)
    calib = calibration_set(
        known_answer.data, known_answer.imgsz, n=CALIB, seed=recipe.seed, batch_size=4, progress=False
    )
    return fused, calib, recipe


@pytest.mark.parametrize("rank_by", list(RANKINGS))
def test_every_ranking_puts_the_planted_conv_first(known_answer, planted, rank_by: str) -> None:
    fused, calib, recipe = planted
    sensitivity = rank_sensitivity(fused, calib, recipe, progress=False, rank_images=RANKED, rank_by=rank_by)
    assert sensitivity.rank_by == rank_by
    assert sensitivity.ranking[0] == known_answer.consumer
    assert sorted(sensitivity.ranking) == sorted(rank_sensitivity(fused, calib, recipe, progress=False,
                                                                  rank_images=1).ranking)  # fmt: skip


def test_each_backend_is_ranked_on_its_own_weight_grid_after_one_calibration(
    known_answer, planted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenVINO with NNCF's overflow fix rounds weights to the half range: its ranking sees that grid (what the
    ranking runs on is recorded in its row), the other backends share the reference ranking, and all share one
    calibration; each backend's job keeps the planted conv float (K = 1)."""
    from qarep_det.pipelines.ptq import PTQSettings, backend_jobs
    from qarep_det.sensitivity import rankings

    fused, calib, recipe = planted
    grids = []
    rank = rankings.rank

    def recording(rank_by, fused, calibrated, *args, **kwargs):
        quantizers = [getattr(m, "weight_quantizer", None) for m in calibrated.modules()]
        grids.append({q.num_bits for q in quantizers if q is not None and q.is_enabled})
        return rank(rank_by, fused, calibrated, *args, **kwargs)

    monkeypatch.setattr(rankings, "rank", recording)
    settings = PTQSettings(
        known_answer.data,
        recipe=recipe,
        backends=("torch", "openvino", "onnxruntime"),
        imgsz=known_answer.imgsz,
        keep_float=1,
        rank_images=RANKED,
        overflow_fix=True,
    )
    checkpoint = load_fused(known_answer.planted)

    def jobs(settings: PTQSettings) -> dict:
        chosen = backend_jobs(checkpoint, settings, calib, stem=tmp_path / "m", scratch=tmp_path, progress=False)
        return {backend: (job, choice.rank) for backend, job, choice in chosen}

    ranked = jobs(settings)
    assert grids == [{8}, {7}]  # ModelOpt's num_bits: the reference, then the half range (a narrow 7-bit grid)
    (torch_job, torch_rank), ov_rank = ranked["torch"], ranked["openvino"][1]
    assert ranked["onnxruntime"][1] == torch_rank and not torch_rank.rank_half_range and ov_rank.rank_half_range
    assert ov_rank.calibrate_s == 0 < torch_rank.calibrate_s  # not calibrated again
    assert all(job.calibrated is torch_job.calibrated is not None for job, _ in ranked.values())
    assert all(job.recipe.float_layers == (known_answer.consumer,) for job, _ in ranked.values())
    grids.clear()
    ranked = jobs(replace(settings, overflow_fix=False))
    assert grids == [{8}] and not ranked["openvino"][1].rank_half_range


def test_revert_one_noise_equals_a_full_forward_with_that_conv_float(planted) -> None:
    """The restarted pass is the fully INT8 model with one conv's quantizers off, run from the image."""
    fused, calib, recipe = planted
    qmodel = quantize_torch(fused, calib, recipe)
    batch = next(iter(calib))
    noise = revert_noise(fused, qmodel, [batch], recipe=recipe, progress=False)
    with torch.no_grad():
        reference = first_output(fused.eval()(batch))
        for name in list(noise)[::9]:  # every ninth conv: stem, stages, head
            conv = qmodel.get_submodule(name)
            set_quantizers(conv, False)
            try:
                boxes, scores = NoisePower(), NoisePower()
                add_detection(boxes, scores, reference, first_output(qmodel(batch)))
            finally:
                set_quantizers(conv, True)
            assert noise[name][0].noise == pytest.approx(boxes.noise, rel=1e-3, abs=1e-6)
            assert noise[name][1].noise == pytest.approx(scores.noise, rel=1e-3, abs=1e-9)


def test_labels_are_mapped_into_the_letterbox(tmp_path: Path) -> None:
    """A 200x100 image letterboxed to 96: scale 0.48, 24 px of padding above; a centred half-size box stays centred,
    keeps half the width and takes a quarter of the height."""
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    image = tmp_path / "images" / "a.jpg"
    cv2.imwrite(str(image), np.full((100, 200, 3), 128, np.uint8))
    (tmp_path / "labels" / "a.txt").write_text("2 0.5 0.5 0.5 0.5\n1 0.25 0.2 0.1 0.2\n")
    broken = tmp_path / "images" / "broken.jpg"
    broken.write_bytes(b"not an image")
    (batch,) = labelled_batches([broken, image], 96, 8, nc=3)  # an unreadable image is skipped, as calibration does
    assert batch["img"].shape == (1, 3, 96, 96)
    assert batch["batch_idx"].tolist() == [0.0, 0.0]
    boxes = dict(zip(batch["cls"].flatten().tolist(), batch["bboxes"].tolist(), strict=True))
    assert boxes[2.0] == pytest.approx([0.5, 0.5, 0.5, 0.25], abs=1e-6)
    assert boxes[1.0] == pytest.approx([0.25, (20 * 0.48 + 24) / 96, 0.1, 0.1], abs=1e-6)


def test_an_unknown_ranking_fails_naming_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match="unknown ranking 'sqnr': choose from isolated, revert, fisher"):
        check_ranking("sqnr")


def test_bad_rank_by_and_a_gradient_ranking_without_labels_fail_before_any_work(
    known_answer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    common = ["--weights", str(known_answer.planted), "--imgsz", str(known_answer.imgsz), "--calib-images", "8",
              "--max-drop", "1", "--out", str(out)]  # fmt: skip
    assert cli_main(["ptq-eval", *common, "--data", str(known_answer.data), "--rank-by", "sqnr"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown ranking 'sqnr': choose from isolated, revert, fisher"

    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(known_answer.data.parent, unlabelled)
    shutil.rmtree(unlabelled / "labels" / "train")
    data = unlabelled / known_answer.data.name
    data.write_text(data.read_text().replace(str(known_answer.data.parent), str(unlabelled)))
    assert cli_main(["ptq-eval", *common, "--data", str(data), "--rank-by", "fisher"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rank-by fisher needs the calibration images' YOLO labels" in err[0]
    assert not out.exists()
