"""Per-conv INT8 analysis, the planted outlier, tools/diagnose.py and tools/plant_outlier.py on tiny detectors.

The analysis model is a yolo_qarep_n at 64 px whose BatchNorms took their statistics from the calibration images
before fusion, so activations keep unit scale through the depth (at random init they vanish and every conv looks
harmless), and whose head's last convs have zero bias and 4x the init weights: Ultralytics' bias init pins every
score near 0 and a zero-bias, init-scale head pins them near 0.5, and either way a constant output hides any error.
A random BN network is chaotic (early convs' INT8 noise grows ~20 dB on its way to the output) while one destroyed
deep conv costs ~10 dB, so the planted outlier sits on the P3 path (model.4), where it must beat every early conv.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn
from ultralytics import YOLO
from ultralytics.nn.tasks import DetectionModel

from qarep_det import reparameterize_model
from qarep_det.data.synthetic import make_dataset
from qarep_det.quant.backends.simulated import quantize_torch
from qarep_det.quant.calibration import calibration_set, first_images
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.scope import quantized_conv_names
from qarep_det.sensitivity.analysis import analyze, enclosing_block, isolated_noise, rank_by_noise
from qarep_det.sensitivity.planted import plant_outlier
from qarep_det.ultralytics.checkpoint import load_detector, save_detector
from qarep_det.ultralytics.restartable import RestartableForward

ROOT = Path(__file__).resolve().parents[1]
IMGSZ = 64
PRODUCER, CONSUMER = "model.4.2", "model.4.3.conv"  # two QARep blocks in a row, on the P3 path
LAYER_KEYS = {
    "name", "block", "block_type", "weight_sqnr_db", "weight_max_to_median", "act_amax", "act_sqnr_db",
    "isolated_sqnr_db", "isolated_boxes_sqnr_db", "isolated_scores_sqnr_db", "cumulative_input_sqnr_db",
    "cumulative_sqnr_db", "cumulative_added_sqnr_db",
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=12, n_val=6, imgsz=IMGSZ, seed=3)


@pytest.fixture(scope="module")
def calib(data: Path):
    return calibration_set(data, IMGSZ, n=8, seed=0, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def images(calib) -> torch.Tensor:
    return torch.cat(list(calib))


@pytest.fixture(scope="module")
def trained_form(images: torch.Tensor) -> DetectionModel:
    """Training-form yolo_qarep_n with BN statistics of the images (see module docstring)."""
    torch.manual_seed(0)
    model = DetectionModel(str(ROOT / "model_yamls/yolo_qarep_n.yaml"), nc=3, verbose=False)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.momentum = 1.0
    with torch.no_grad():
        for branch in (*model.model[-1].cv2, *model.model[-1].cv3):
            branch[-1].bias.zero_()
            branch[-1].weight.mul_(4.0)
        model.train()(images)
    return model.eval()


@pytest.fixture(scope="module")
def fused(trained_form: DetectionModel) -> nn.Module:
    model = reparameterize_model(trained_form)
    for m in model.modules():  # in-place activations, as Ultralytics' checkpoint loader leaves every model
        if hasattr(m, "inplace"):
            m.inplace = True
    return model


@pytest.fixture(scope="module")
def baseline(fused, calib):
    return analyze(fused, calib, QuantRecipe(calib_images=8), progress=False)


@pytest.fixture(scope="module")
def planted(fused, images):
    return plant_outlier(fused, PRODUCER, CONSUMER.removesuffix(".conv"), images)


# --- restartable forward ------------------------------------------------------------------------------------


def test_restart_recomputes_exactly_what_a_full_forward_would(fused, images):
    graph = RestartableForward(fused)
    with torch.no_grad():
        cache = graph.forward(images)
        assert torch.equal(cache.output, fused(images)[0])
        names = [n for n, m in fused.named_modules() if isinstance(m, nn.Conv2d) and "dfl" not in n]
        for name in names:
            assert torch.equal(graph.restart(cache, name, fused), cache.output), name  # unchanged node: same output
            perturbed = copy.deepcopy(fused)
            perturbed.get_submodule(name).weight.mul_(1.5)
            expected = perturbed(images)[0]
            torch.testing.assert_close(graph.restart(cache, name, perturbed), expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="no restartable node"):
        graph.node_of("model.24.dfl.conv")


# --- the analysis ---------------------------------------------------------------------------------------------


def test_analysis_rows_follow_the_recipe(fused, calib, baseline):
    names = quantized_conv_names(fused, QuantRecipe())
    assert [r.name for r in baseline.layers] == names
    assert sorted(baseline.ranking) == sorted(baseline.cumulative_ranking) == sorted(names)
    assert baseline.images == 8
    rows = {r.name: r for r in baseline.layers}
    assert (rows["model.6.2.conv"].block, rows["model.6.2.conv"].block_type) == ("model.6.2", "QARepBlock")
    assert (rows["model.9.cv1.conv"].block, rows["model.9.cv1.conv"].block_type) == ("model.9.cv1", "ConvBNReLU")
    assert rows["model.24.cv2.0.0.conv"].block_type == "Conv"
    assert enclosing_block(fused, "model.24.cv2.0.2") == ("model.24.cv2.0.2", "Conv2d")
    first = rows["model.0.conv"]  # its input is the image, its output carries its own INT8 noise only
    assert first.cumulative_input_sqnr_db == float("inf") and first.cumulative_sqnr_db > 25
    head_cls = rows["model.24.cv3.0.2"]  # a class-branch conv cannot move the boxes
    assert head_cls.isolated_boxes_sqnr_db == float("inf") and head_cls.isolated_scores_sqnr_db < 80
    for r in baseline.layers:
        assert 10 < r.weight_sqnr_db < 60 and r.weight_max_to_median >= 1 and r.act_amax > 0, r
        assert 15 < r.act_sqnr_db < 60, r  # measured on its exact FP32 input, by its own input quantizer
        assert r.isolated_sqnr_db < 80 and r.cumulative_sqnr_db < 80, r  # every conv adds real noise
    # fewer quantized convs: the head stays float, and a kept-float conv gets no row
    recipe = QuantRecipe(calib_images=8, quantize_head=False, float_layers=("model.8.1.conv",))
    smaller = analyze(fused, calib, recipe, progress=False)
    assert [r.name for r in smaller.layers] == quantized_conv_names(fused, recipe)
    assert not any(r.name.startswith("model.24.") or r.name == "model.8.1.conv" for r in smaller.layers)


def test_ranking_alone_is_the_analysis_ranking_on_the_first_images(fused, calib, baseline):
    """--rank-images M: calibration sees every image, the per-conv passes the first M; ptq_eval's ranking (one
    calibration shared with the torch backend, no cumulative figures) is diagnose's, bit for bit."""
    recipe = QuantRecipe(calib_images=8)
    partial = analyze(fused, calib, recipe, progress=False, rank_images=4)
    assert partial.images == 4
    assert [r.act_amax for r in partial.layers] == [r.act_amax for r in baseline.layers]  # calibrated on all 8
    qmodel = quantize_torch(fused, calib, recipe)
    noise = isolated_noise(fused, qmodel, first_images(calib, 4), recipe=recipe, progress=False)
    assert rank_by_noise(noise) == partial.ranking
    assert rank_by_noise(isolated_noise(fused, qmodel, calib, recipe=recipe, progress=False)) == baseline.ranking
    batches = [torch.zeros(4, 3, 8, 8), torch.ones(4, 3, 8, 8)]
    assert [b.shape[0] for b in first_images(batches, 6)] == [4, 2] and first_images(batches, None) is batches


def test_planted_outlier_is_exact_in_fp32_and_ranked_first_by_both_metrics(fused, calib, images, baseline, planted):
    model, info = planted
    assert info.consumer == CONSUMER and info.fp32_max_rel_change == 0.0
    assert len(info.channels) == round(0.25 * fused.get_submodule(CONSUMER).in_channels)
    with torch.no_grad():
        assert torch.equal(model(images)[0], fused(images)[0])  # powers of two through ReLU: bit-exact
    result = analyze(model, calib, QuantRecipe(calib_images=8), progress=False)
    assert result.ranking[0] == CONSUMER and result.cumulative_ranking[0] == CONSUMER
    assert baseline.ranking[0] != CONSUMER  # it is the planting, not this conv's place in the network
    before = {r.name: r for r in baseline.layers}[CONSUMER]
    after = {r.name: r for r in result.layers}[CONSUMER]
    assert after.isolated_sqnr_db < before.isolated_sqnr_db - 6
    assert after.act_sqnr_db > 20  # the starved channels carry little input energy: the input SQNR cannot see it
    assert result.int8_output_sqnr_db["combined"] < baseline.int8_output_sqnr_db["combined"]


def test_planting_refuses_what_fp32_would_notice(fused, images):
    with pytest.raises(ValueError, match="changed the FP32 output"):  # model.4's output also feeds the neck
        plant_outlier(fused, "model.4.3", "model.5", images)
    with pytest.raises(ValueError, match="not a module"):
        plant_outlier(fused, "model.8.9", "model.8.1", images)
    with pytest.raises(ValueError, match="cannot consume"):
        plant_outlier(fused, "model.8.0", "model.5", images)
    with pytest.raises(ValueError, match="fraction"):
        plant_outlier(fused, PRODUCER, CONSUMER, images, fraction=0)


def test_planted_checkpoint_is_float32_and_loads_fused(planted, images, tmp_path):
    model, info = planted
    path = save_detector(model, tmp_path / "planted.pt", images, planted_outlier=asdict(info))
    checkpoint = torch.load(path, weights_only=False)
    assert all(p.dtype == torch.float32 for p in checkpoint["model"].parameters())  # fp16 would lose 2^-12 weights
    assert checkpoint["planted_outlier"]["consumer"] == CONSUMER
    loaded = load_detector(path)
    refused = reparameterize_model(loaded)  # fusing a fused model is a no-op
    with torch.no_grad():
        assert torch.equal(refused(images)[0], model(images)[0])
    with pytest.raises(FileExistsError):
        save_detector(model, path, images)


# --- the tools ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("weights")
    paths = []
    for family in ("qarep", "repvgg"):
        path = root / f"{family}_n.pt"
        YOLO(str(ROOT / f"model_yamls/yolo_{family}_n.yaml")).save(path)
        paths.append(path)
    return paths


def run_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / tool), *args], capture_output=True, text=True, timeout=600
    )


def test_diagnose_writes_report_and_plots_for_two_models(data, checkpoints, tmp_path):
    out = tmp_path / "diag"
    args = ["--data", str(data), "--imgsz", "64", "--calib-images", "4", "--batch", "2", "--out", str(out)]
    result = run_tool("diagnose.py", "--weights", *map(str, checkpoints), *args)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert [m["model"] for m in report["models"]] == ["qarep_n", "repvgg_n"]
    for m in report["models"]:
        assert {"model", "weights", "calib_images", "layers", "bn_scales", "ranking", "cumulative_ranking"} <= m.keys()
        assert m["calib_images"] == 4 and len(m["layers"]) == len(m["ranking"]) == 59
        assert all(LAYER_KEYS == row.keys() for row in m["layers"])
        assert {"block", "branch", "max", "median", "outlier"} <= m["bn_scales"][0].keys()
        assert sorted(m["ranking"]) == sorted(row["name"] for row in m["layers"])
        # C1 per fusable block (Rep blocks and ConvBNReLU), C2 per Rep block, in module order
        blocks = [row["block"] for row in m["fused_kernels"]]
        outputs = [row["block"] for row in m["block_outputs"]]
        assert outputs and outputs == [b for b in blocks if b in outputs] and len(outputs) < len(blocks)
        assert all(f"{row['block']}.conv" in m["ranking"] for row in m["fused_kernels"])  # the convs ptq-eval sees
        for row in m["fused_kernels"]:
            assert 0 <= row["zero_share_mean"] <= row["zero_share_max"] <= 1 and row["max_to_median"] >= 1
        assert all(row["variance"] > 0 and row["max_to_std"] >= 1 for row in m["block_outputs"])
    assert {r["branch"] for r in report["models"][1]["bn_scales"]} >= {"3x3", "1x1", "identity"}
    md = (out / "report.md").read_text()
    assert "## Summary" in md and "## qarep_n" in md and "## repvgg_n" in md
    assert md.count("Fused kernels (C1, weights)") == md.count("Block outputs (C2, activations)") == 2
    pngs = sorted(p.name for p in out.glob("*.png"))
    expected = ["bn_scales.png", "c1_c2.png", "cumulative_sqnr.png", "isolated_sqnr.png", "weight_max_to_median.png"]
    assert pngs == expected
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000, png
    again = run_tool("diagnose.py", "--weights", str(checkpoints[0]), *args)  # an existing folder is not reused
    assert again.returncode == 0 and (tmp_path / "diag-2" / "report.json").exists()


def test_tools_fail_with_one_line_and_write_nothing(data, checkpoints, tmp_path):
    out = tmp_path / "out"
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"garbage")
    base = ["--data", str(data), "--imgsz", "64", "--calib-images", "2", "--out", str(out)]
    cases = [
        ("diagnose.py", ["--weights", str(tmp_path / "missing.pt"), *base], "not found"),
        ("diagnose.py", ["--weights", str(checkpoints[0]), str(corrupt), *base], "cannot read weights"),
        ("diagnose.py", ["--weights", str(checkpoints[0]), *base, "--device", "7"], "device"),
        ("diagnose.py", ["--weights", str(checkpoints[0]), *base[2:], "--data", str(tmp_path / "no.yaml")], "no.yaml"),
        ("diagnose.py", ["--weights", str(checkpoints[0]), *base, "--calib-method", "kl"], "calib-method"),
        ("plant_outlier.py", ["--weights", str(checkpoints[0]), "--producer", "model.4.3", "--consumer", "model.5",
                              *base[:4], "--out", str(tmp_path / "p.pt")], "FP32"),
    ]  # fmt: skip
    for tool, args, message in cases:
        result = run_tool(tool, *args)
        assert result.returncode != 0, args
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], (args, result.stderr[-800:])
        assert "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "p.pt").exists()


def test_plant_outlier_tool_writes_a_checkpoint_ptq_eval_can_load(data, checkpoints, tmp_path):
    out = tmp_path / "planted.pt"
    args = ["--weights", str(checkpoints[0]), "--producer", "model.8.0", "--consumer", "model.8.1", "--data", str(data)]
    result = run_tool("plant_outlier.py", *args, "--imgsz", "64", "--images", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model.8.1.conv" in result.stdout and out.exists()
    assert load_detector(out).is_fused()
    again = run_tool("plant_outlier.py", *args, "--imgsz", "64", "--out", str(out))
    assert again.returncode != 0 and "exists" in again.stderr


def test_plant_outlier_unfused_writes_the_training_form_and_refuses_a_fused_start(data, checkpoints, tmp_path):
    """--unfused: the stem shrinks, the next (stride-2, identity-free) block grows; what QAT and quantize=8 start
    from. A fused checkpoint cannot give that training form back: one line, nothing written."""
    out, refused = tmp_path / "unfused.pt", tmp_path / "refused.pt"
    args = ["--producer", "model.0", "--consumer", "model.1", "--data", str(data), "--imgsz", "64", "--unfused"]
    result = run_tool("plant_outlier.py", "--weights", str(checkpoints[0]), *args, "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model.1.conv" in result.stdout and not load_detector(out).is_fused()
    assert torch.load(out, weights_only=False)["planted_outlier"]["consumer"] == "model.1.conv"
    fused = tmp_path / "fused.pt"
    fused_run = run_tool("plant_outlier.py", "--weights", str(checkpoints[0]), *args[:-1], "--out", str(fused))
    assert fused_run.returncode == 0, fused_run.stderr[-2000:]
    again = run_tool("plant_outlier.py", "--weights", str(fused), *args, "--out", str(refused))
    assert again.returncode != 0 and again.stderr.strip().splitlines()[-1].startswith("error: --unfused needs")
    assert not refused.exists() and "Traceback" not in again.stderr
