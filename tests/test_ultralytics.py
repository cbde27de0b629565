"""Integration with Ultralytics: YAML registration, width/depth scaling, fuse(), ONNX export, checkpoints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_bn
from torch import nn
from ultralytics import YOLO
from ultralytics.nn.tasks import DetectionModel

from qarep_det import output_difference, reparameterize_model
from qarep_det.nn import YAML_MODULES, CSPRepStage, RepBlock, RepStage
from qarep_det.ultralytics import registration as integration

YAMLS = Path(__file__).resolve().parents[1] / "model_yamls"

# Hand-computed from the YAMLs: (layer index, output channels, blocks in the stage or None for a single layer).
# width: n 0.25, s 0.50, m 0.75; depth: n/s 0.33, m 0.60 (6 -> 2/2/4, 12 -> 4/4/7, 18 -> 6/6/11).
EXPECTED = {
    "n": [(0, 16, None), (1, 32, None), (2, 32, 2), (3, 64, None), (4, 64, 4), (5, 128, None), (6, 128, 6),
          (7, 256, None), (8, 256, 2), (9, 256, None), (10, 64, None), (13, 64, 4), (14, 32, None), (17, 32, 4),
          (18, 32, None), (20, 64, 4), (21, 64, None), (23, 128, 4)],
    "s": [(0, 32, None), (1, 64, None), (2, 64, 2), (3, 128, None), (4, 128, 4), (5, 256, None), (6, 256, 6),
          (7, 512, None), (8, 512, 2), (9, 512, None), (10, 128, None), (13, 128, 4), (14, 64, None), (17, 64, 4),
          (18, 64, None), (20, 128, 4), (21, 128, None), (23, 256, 4)],
    "m": [(0, 48, None), (1, 96, None), (2, 96, 4), (3, 192, None), (4, 192, 7), (5, 384, None), (6, 384, 11),
          (7, 768, None), (8, 768, 4), (9, 768, None), (10, 192, None), (13, 192, 7), (14, 96, None), (17, 96, 7),
          (18, 96, None), (20, 192, 7), (21, 192, None), (23, 384, 7)],
}  # fmt: skip


def out_channels(layer: nn.Module) -> int:
    return [m for m in layer.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def blocks_in(layer: nn.Module) -> int:
    if isinstance(layer, CSPRepStage):
        return 2 * len(layer.m)  # n blocks as n // 2 bottlenecks of two
    assert isinstance(layer, RepStage)
    return len(layer)


@pytest.mark.parametrize("family", ["qarep", "qarepv2", "repvgg"])
@pytest.mark.parametrize("size", ["n", "s", "m"])
def test_channels_and_repeats_follow_width_and_depth(family: str, size: str) -> None:
    model = DetectionModel(str(YAMLS / f"yolo_{family}_{size}.yaml"), nc=80, verbose=False)
    block = {"qarep": "QARepBlock", "qarepv2": "QARepBlockV2", "repvgg": "RepVGGBlock"}[family]
    for i, channels, blocks in EXPECTED[size]:
        layer = model.model[i]
        assert out_channels(layer) == channels, f"layer {i}"
        if blocks is not None:
            assert blocks_in(layer) == (blocks if size != "m" else 2 * (blocks // 2)), f"layer {i}"
        reps = [m for m in layer.modules() if isinstance(m, RepBlock)]
        assert all(type(m).__name__ == block for m in reps)
    first = model.model[0]
    assert (first.c1, first.s) == (3, 2)
    assert model.model[-1].nl == 3


@pytest.mark.parametrize("name", sorted(p.name for p in YAMLS.glob("*.yaml")))
def test_whole_detector_fuses_exactly(name: str) -> None:
    model = randomize_bn(DetectionModel(str(YAMLS / name), nc=4, verbose=False))
    fused = reparameterize_model(model)
    diff = output_difference(model, fused, torch.rand(1, 3, 64, 64))
    assert diff.max_rel < 1e-4, diff
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    blocks = [m for m in fused.modules() if isinstance(m, RepBlock)]
    assert blocks and all(len([c for c in b.modules() if isinstance(c, nn.Conv2d)]) == 1 for b in blocks)
    assert not any(b.fused for b in model.modules() if isinstance(b, RepBlock))  # argument untouched


def test_ultralytics_fuse_fuses_our_blocks() -> None:
    model = YOLO(str(YAMLS / "yolo_qarep_n.yaml"))
    assert not model.model.is_fused()
    model.fuse()
    assert model.model.is_fused()
    assert all(b.fused for b in model.model.modules() if isinstance(b, RepBlock))


def test_fused_detector_exports_to_onnx_without_batchnorm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    onnx = pytest.importorskip("onnx")
    monkeypatch.chdir(tmp_path)  # Ultralytics writes a YAML-built model's export into the working directory
    yaml = shutil.copy(YAMLS / "yolo_qarep_n.yaml", tmp_path)
    model = YOLO(yaml)
    model.model.nc = 2
    path = model.export(format="onnx", imgsz=64, simplify=False, verbose=False)
    graph = onnx.load(path).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("BatchNormalization") == 0
    fused = reparameterize_model(DetectionModel(str(yaml), verbose=False))
    assert ops.count("Conv") == sum(isinstance(m, nn.Conv2d) for m in fused.modules())


def test_unknown_module_is_named_with_our_list() -> None:
    cfg = {"nc": 2, "backbone": [[-1, 1, "QARepBlok", [64, 2]]], "head": [[[-1], 1, "Detect", ["nc"]]]}
    with pytest.raises(KeyError, match=r"layer 0: unknown module 'QARepBlok' \(not an Ultralytics module") as e:
        DetectionModel(cfg, verbose=False)
    assert e.value.args[0].endswith(f"qarep_det provides: {', '.join(YAML_MODULES)})")  # every one, registry order


def test_wrong_block_arguments_name_layer_and_module() -> None:
    cfg = {"nc": 2, "backbone": [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "RepVGGBlock", [32, 3]]], "head": []}
    with pytest.raises(ValueError, match=r"layer 1 \(RepVGGBlock, args \[32, 3\]\): .*stride s must be one of"):
        DetectionModel(cfg, verbose=False)
    cfg["backbone"][1] = [-1, 1, "QARepStage", ["wide"]]
    with pytest.raises(ValueError, match=r"layer 1 \(QARepStage\): first argument must be the output channels"):
        DetectionModel(cfg, verbose=False)


def test_self_test_fails_loudly_when_ultralytics_scaling_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    integration.self_test()
    monkeypatch.setattr(integration, "_scaled_depth", lambda d: 1.0)  # as if Ultralytics changed its depth rule
    with pytest.raises(integration.RegistrationError, match=r"ultralytics 8\.\d+\.\d+"):
        integration.self_test()


def test_checkpoint_loads_in_fresh_process_without_importing_qarep_det(tmp_path: Path) -> None:
    model = YOLO(str(YAMLS / "yolo_qarep_n.yaml"))
    model.save(tmp_path / "qarep_n.pt")
    code = (
        "import sys, torch\n"
        "from ultralytics import YOLO\n"
        "m = YOLO(sys.argv[1]).model.eval()\n"
        "assert 'qarep_det' in sys.modules\n"
        "m.fuse(verbose=False)\n"
        "from qarep_det.nn import RepBlock\n"
        "blocks = [b for b in m.modules() if isinstance(b, RepBlock)]\n"
        "assert blocks and all(b.fused for b in blocks)\n"
        "print('ok', m(torch.rand(1, 3, 64, 64))[0].shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "qarep_n.pt")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok torch.Size([1, 84, 84])" in result.stdout


def activations(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if isinstance(m, (nn.ReLU, nn.SiLU, nn.LeakyReLU))}


@pytest.mark.parametrize(("family", "block"), [("qarep", "QARepBlock"), ("repvgg", "RepVGGBlock")])
def test_yolov7_style_models_have_yolov7s_structure(family: str, block: str) -> None:
    v7 = DetectionModel(f"yolov7_{family}.yaml", verbose=False)
    assert activations(v7) == {"SiLU"}  # one activation throughout, our blocks and SPPCSPC included
    assert type(v7.model[51]).__name__ == "SPPCSPC"
    heads = [v7.model[i] for i in (102, 103, 104)]  # YOLOv7's RepConv positions
    assert [type(m).__name__ for m in heads] == [block] * 3 and [m.c2 for m in heads] == [256, 512, 1024]
    assert not any(m.has_identity for m in heads) and v7.model[-1].f == [102, 103, 104]
    tiny = DetectionModel(f"yolov7_tiny_{family}.yaml", verbose=False)
    assert activations(tiny) == {"LeakyReLU"}
    assert {m.negative_slope for m in tiny.modules() if isinstance(m, nn.LeakyReLU)} == {0.1}
    assert [type(tiny.model[i]).__name__ for i in (74, 75, 76)] == [block] * 3
    assert activations(DetectionModel("yolov8n.yaml", verbose=False)) == {"SiLU"}  # tiny's activation: not global


YOLOV7_CASES = {
    "MP": ([-1, 1, "MP", []], r"layer 1: MP is a YOLOv7 module; .*write \[-1, 1, nn\.MaxPool2d, \[2, 2\]\]"),
    "SP": ([-1, 1, "SP", [5]], r"layer 1: SP is a YOLOv7 module; .*nn\.MaxPool2d, \[k, 1, k // 2\]"),
    "IDetect": ([[0], 1, "IDetect", ["nc", "anchors"]], r"layer 1: IDetect is a YOLOv7 module; .*Detect, \[nc\]"),
    "RepConv": ([-1, 1, "RepConv", [32, 3, 1]], r"RepConv \[256, 3, 1\] -> QARepBlock \[256, 1, 1, silu\]"),
    "Conv act": ([-1, 1, "Conv", [32, 3, 1, None, 1, "nn.LeakyReLU(0.1)"]], r"'activation: nn\.LeakyReLU\(0\.1\)'"),
    "block args": ([-1, 1, "QARepBlock", [32, 3, 1]],
                   r"RepConv \[c2, k, s\]\? ours is \[c2, s, g, act\]: write \[32, 1, 1, silu\]"),
    "act": ([-1, 1, "QARepBlock", [32, 1, 1, "mish"]],
            r"layer 1 \(QARepBlock.*act must be one of relu, silu, lrelu, got 'mish'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(YOLOV7_CASES))
def test_yolov7_constructs_fail_with_what_to_write_instead(case: str) -> None:
    layer, message = YOLOV7_CASES[case]
    cfg = {"nc": 2, "backbone": [[-1, 1, "Conv", [16, 3, 2]], layer], "head": []}
    with pytest.raises((KeyError, ValueError), match=message) as error:
        DetectionModel(cfg, verbose=False)
    assert "\n" not in str(error.value)  # one line


def test_sppcspc_and_act_arguments_scale_like_built_ins() -> None:
    cfg = {
        "nc": 2,
        "depth_multiple": 0.5,
        "width_multiple": 0.5,
        "backbone": [
            [-1, 1, "Conv", [64, 3, 2]],
            [-1, 4, "QARepStage", [128, 2, 1, "lrelu"]],
            [-1, 1, "SPPCSPC", [512, "silu"]],
            [-1, 1, "SPPCSPC", [128]],
        ],
        "head": [],
    }
    model = DetectionModel(cfg, verbose=False).model
    stage, spp, spp_relu = model[1], model[2], model[3]
    assert len(stage) == 2 and stage[0].s == 2 and activations(stage) == {"LeakyReLU"}
    assert spp.cv7.branch[0].out_channels == 256 and spp.cv1.branch[0].in_channels == 64  # c2 x width, c1 from before
    assert activations(spp) == {"SiLU"} and activations(spp_relu) == {"ReLU"}  # act last and optional
