"""The QARepVGG paper's ablation ladder (Chu et al., AAAI 2024) as blocks, stages and n-scale detectors:
every step fuses exactly, builds and scales in Ultralytics, trains; and the C1 diagnostics give known answers.

S0/S1 RepVGGBlock (custom / plain L2), S2 RepVGGNoIdBNBlock, S3 QARepNoPostBNBlock, S4 QARepBlock.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn, results_epochs
from torch import nn
from ultralytics.nn.tasks import DetectionModel

import qarep_det
from qarep_det import reparameterize_model
from qarep_det.data.synthetic import make_dataset
from qarep_det.nn import (
    QARepBlock,
    QARepCSPStage,
    QARepNoPostBNBlock,
    QARepNoPostBNCSPStage,
    QARepNoPostBNStage,
    QARepStage,
    RepBlock,
    RepVGGBlock,
    RepVGGCSPStage,
    RepVGGNoIdBNBlock,
    RepVGGNoIdBNCSPStage,
    RepVGGNoIdBNStage,
    RepVGGStage,
    ThreeBranchBlock,
)
from qarep_det.sensitivity.diagnostics import bn_scales, dead_channel_mask, fused_kernels, int8_zero_share
from qarep_det.ultralytics.checkpoint import load_detector
from qarep_det.ultralytics.run_options import InputError, TrainOptions, check_model_cfg
from qarep_det.ultralytics.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

YAMLS = Path(__file__).resolve().parents[1] / "model_yamls"
# step -> (block, stage, CSP stage, n-scale YAML stem); S0 and S1 share the block and the YAML (only the L2 differs)
LADDER = {
    "S1": (RepVGGBlock, RepVGGStage, RepVGGCSPStage, "yolo_repvgg"),
    "S2": (RepVGGNoIdBNBlock, RepVGGNoIdBNStage, RepVGGNoIdBNCSPStage, "yolo_repvgg_noidbn"),
    "S3": (QARepNoPostBNBlock, QARepNoPostBNStage, QARepNoPostBNCSPStage, "yolo_qarep_nopostbn"),
    "S4": (QARepBlock, QARepStage, QARepCSPStage, "yolo_qarep"),
}
STEPS = list(LADDER)
YAML_NAMES = [f"{LADDER[step][3]}{g}_n.yaml" for step in STEPS for g in ("", "_g4")]
TOL64 = 1e-8


def max_rel_diff(reference: nn.Module, candidate: nn.Module, x: torch.Tensor) -> float:
    """``max|a - b| / max|a|`` in the models' own dtype (``output_difference`` compares in float32, too coarse for
    float64's 1e-8)."""
    with torch.no_grad():
        a, b = reference.eval()(x), candidate.eval()(x)
    pairs = [(a, b)] if isinstance(a, torch.Tensor) else [(a[0], b[0])]  # a detector: its decoded predictions
    return max(float((p - q).abs().max() / p.abs().max()) for p, q in pairs)


def assert_fuses_in_float64(module: nn.Module, c1: int, size: int = 9) -> nn.Module:
    """Random BN statistics, float64: the fused copy equals the training form within TOL64, no BN left."""
    module = randomize_bn(module).double()
    fused = reparameterize_model(module)
    assert max_rel_diff(module, fused, torch.randn(2, c1, size, size, dtype=torch.float64)) < TOL64
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    return fused


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize(("c1", "c2", "s"), [(8, 8, 1), (8, 16, 1), (8, 16, 2)])
@pytest.mark.parametrize("g", [1, 4])
def test_every_step_block_fuses_exactly_in_float64(step: str, c1: int, c2: int, s: int, g: int) -> None:
    block = LADDER[step][0](c1, c2, s, g)
    fused = assert_fuses_in_float64(block, c1)
    assert fused.conv.groups == g and fused.conv.stride == (s, s) and fused.conv.kernel_size == (3, 3)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("g", [1, 4])
def test_every_step_stage_fuses_exactly_in_float64(step: str, g: int) -> None:
    block, stage, csp, _ = LADDER[step]
    rep = stage(8, 16, 3, 2, g)
    assert len(rep) == 3 and all(type(b) is block for b in rep) and all(b.g == g for b in rep)
    assert_fuses_in_float64(rep, 8)
    cross = csp(8, 16, 4)
    assert [type(m) for m in cross.modules() if isinstance(m, RepBlock)] == [block] * 4
    assert_fuses_in_float64(cross, 8)


@pytest.mark.parametrize(
    ("cls", "branches", "bns"),
    [
        (RepVGGBlock, ["branch_3x3", "branch_1x1", "branch_identity"], ["3x3", "1x1", "identity"]),
        (RepVGGNoIdBNBlock, ["branch_3x3", "branch_1x1"], ["3x3", "1x1"]),
        (QARepNoPostBNBlock, ["branch_3x3", "branch_1x1"], ["3x3"]),
        (QARepBlock, ["branch_3x3", "branch_1x1", "bn"], ["3x3", "post"]),
    ],
)
def test_each_step_has_exactly_the_papers_batchnorms(cls: type[ThreeBranchBlock], branches, bns) -> None:
    """Each step removes one BN (S2 the identity's, S3 the 1x1's) or adds the post-BN (S4); nothing else changes."""
    block = cls(8, 8)
    assert [name for name, _ in block.named_children() if name != "act"] == branches == list(cls.branch_names)
    assert list(block.branch_bns()) == bns
    assert sum(isinstance(m, nn.BatchNorm2d) for m in block.modules()) == len(bns)
    assert isinstance(block.branch_1x1, nn.Sequential) == cls.bn_1x1
    if not cls.bn_1x1:
        assert isinstance(block.branch_1x1, nn.Conv2d) and block.branch_1x1.bias is None


def _bn(t: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    return F.batch_norm(t, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _paper_formula(block: ThreeBranchBlock, x: torch.Tensor, g: int) -> torch.Tensor:
    """Each step written out with functional ops, independently of the block's code (identity: c1 == c2, s == 1)."""
    conv3, bn3 = block.branch_3x3
    y3 = _bn(F.conv2d(x, conv3.weight, None, 1, 1, 1, g), bn3)
    if isinstance(block, (RepVGGBlock, RepVGGNoIdBNBlock)):
        conv1, bn1 = block.branch_1x1
        y1 = _bn(F.conv2d(x, conv1.weight, None, 1, 0, 1, g), bn1)
    else:
        y1 = F.conv2d(x, block.branch_1x1.weight, None, 1, 0, 1, g)
    if isinstance(block, RepVGGBlock):
        return F.relu(y3 + y1 + _bn(x, block.branch_identity))  # S0/S1
    if isinstance(block, QARepBlock):
        return F.relu(_bn(y3 + y1 + x, block.bn))  # S4
    return F.relu(y3 + y1 + x)  # S2 and S3: the identity is the plain tap


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("g", [1, 4])
def test_every_step_computes_the_papers_formula(step: str, g: int) -> None:
    block = randomize_bn(LADDER[step][0](8, 8, 1, g)).double()
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        expected = _paper_formula(block, x, g)
        torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(reparameterize_model(block)(x), expected, rtol=0, atol=1e-9)


def test_grouped_blocks_group_both_convs_and_refuse_indivisible_channels() -> None:
    block = QARepNoPostBNBlock(8, 16, 2, 4)
    assert block.branch_3x3[0].groups == block.branch_1x1.groups == 4
    with pytest.raises(ValueError, match="divisible by groups"):
        RepVGGNoIdBNBlock(6, 8, 1, 4)


@pytest.mark.parametrize("step", ["S2", "S3", "S4"])
def test_custom_l2_is_refused_for_every_step_after_s0(step: str) -> None:
    """--rep-l2 custom is RepVGG's own recipe (S0) and penalizes RepVGGBlocks: the later steps are no RepVGGBlocks,
    so their models are refused in one line rather than trained with a penalty on nothing."""
    data = {"nc": 3, "channels": 3}
    check_model_cfg(YAMLS / "yolo_repvgg_n.yaml", data, "custom")  # S0
    with pytest.raises(InputError, match="--rep-l2 custom acts on RepVGGBlock layers"):
        check_model_cfg(YAMLS / f"{LADDER[step][3]}_n.yaml", data, "custom")


# ---------------------------------------------------------------------------------------------------------------
# The shipped n-scale models of every step


def rep_layers(model: DetectionModel) -> list[tuple[str, str, int, int, int, int]]:
    """(module name, block type, c1, c2, stride, groups) of every Rep block in a detector, in order."""
    return [
        (name, type(m).__name__, m.c1, m.c2, m.s, m.g) for name, m in model.named_modules() if isinstance(m, RepBlock)
    ]


def step_of(name: str) -> str:
    return next(step for step in STEPS if name.replace("_g4", "") == f"{LADDER[step][3]}_n.yaml")


@pytest.fixture(scope="module")
def ladder_models() -> dict[str, DetectionModel]:
    return {name: DetectionModel(str(YAMLS / name), nc=3, verbose=False) for name in YAML_NAMES}


def test_every_step_has_the_same_layout_only_the_block_differs(ladder_models: dict[str, DetectionModel]) -> None:
    """Against yolo_repvgg_n (S0/S1) and its g4 twin: the same YAML once the step's names are swapped back, the same
    Rep blocks (name, c1, c2, stride, groups) and the same shapes of every parameter outside the 1x1 and post BNs."""
    for name, model in ladder_models.items():
        block, stage = (cls.__name__ for cls in LADDER[step_of(name)][:2])
        twin = name.replace(LADDER[step_of(name)][3], "yolo_repvgg")
        reference = ladder_models[twin]
        text = (YAMLS / name).read_text().replace(block, "RepVGGBlock").replace(stage, "RepVGGStage")
        body = (YAMLS / twin).read_text()
        assert text[text.index("nc:") :] == body[body.index("nc:") :], name
        layers, expected = rep_layers(model), rep_layers(reference)
        assert {t for _, t, *_ in layers} == {block}, name
        assert [row[:1] + row[2:] for row in layers] == [row[:1] + row[2:] for row in expected], name

        def shapes(m: DetectionModel) -> list[tuple[str, tuple[int, ...]]]:
            skip = ("branch_1x1", "branch_identity", ".bn.")  # the BNs a step moves, and the 1x1 that may lose its BN
            return [(n, tuple(p.shape)) for n, p in m.named_parameters() if not any(k in n for k in skip)]

        assert shapes(model) == shapes(reference), name


def test_g4_groups_every_rep_block_but_the_stem(ladder_models: dict[str, DetectionModel]) -> None:
    for step in STEPS:
        layers = rep_layers(ladder_models[f"{LADDER[step][3]}_g4_n.yaml"])
        assert layers[0] == ("model.0", LADDER[step][0].__name__, 3, 16, 2, 1)  # the stem reads 3 channels
        assert {row[-1] for row in layers[1:]} == {4}
        assert {row[-1] for row in rep_layers(ladder_models[f"{LADDER[step][3]}_n.yaml"])} == {1}


@pytest.mark.parametrize("name", ["yolo_repvgg_noidbn_n.yaml", "yolo_qarep_nopostbn_g4_n.yaml"])
def test_width_and_depth_scale_like_the_n_model(name: str) -> None:
    """width 0.25 -> 0.5 doubles every Rep block's channels, depth 0.33 -> 0.67 doubles the 6-block stage."""
    base = qarep_det.model_yaml(name)
    cfg = {**DetectionModel(str(base), verbose=False).yaml, "width_multiple": 0.5, "depth_multiple": 0.67}
    small, large = (
        DetectionModel(str(base), nc=3, verbose=False),
        DetectionModel(copy.deepcopy(cfg), nc=3, verbose=False),
    )

    def widths(model: DetectionModel) -> list[int]:
        return [m.c2 for m in model.modules() if isinstance(m, RepBlock)]

    assert len(large.model[2]) == 4 == 2 * len(small.model[2])  # 6 * 0.33 -> 2, 6 * 0.67 -> 4
    assert widths(large)[:2] == [2 * c for c in widths(small)[:2]] == [32, 64]
    assert all(c % 8 == 0 for c in widths(large))
    fused = reparameterize_model(large)
    assert all(b.fused for b in fused.modules() if isinstance(b, RepBlock))


@pytest.mark.parametrize("name", YAML_NAMES)
def test_every_step_model_fuses_with_reparameterize_model(name: str, ladder_models: dict[str, DetectionModel]) -> None:
    model = randomize_bn(copy.deepcopy(ladder_models[name])).double()
    fused = reparameterize_model(model)
    assert max_rel_diff(model, fused, torch.rand(1, 3, 64, 64, dtype=torch.float64)) < TOL64
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert all(b.fused for b in fused.modules() if isinstance(b, RepBlock))


def test_one_step_trains_a_tiny_epoch(tmp_path: Path) -> None:
    """S3, the step with the fewest BNs (the 1x1 and the identity enter the sum unnormalized): one tiny epoch on
    generated data, then the checkpoint unpickles as the step's blocks and fuses."""
    data = make_dataset(tmp_path / "data", n_train=8, n_val=4, imgsz=64, seed=0)
    options = TrainOptions(cfg=Path("yolo_qarep_nopostbn_n.yaml"), data=data, project=tmp_path, epochs=1, imgsz=64,
                           batch=8, device="cpu", workers=0, hyp={"plots": False})  # fmt: skip
    trainer = train(options)
    assert results_epochs(trainer.save_dir) == [1]
    model = load_detector(trainer.last)
    assert {type(m).__name__ for m in model.modules() if isinstance(m, RepBlock)} == {"QARepNoPostBNBlock"}
    assert max_rel_diff(model, reparameterize_model(model), torch.rand(1, 3, 64, 64)) < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# C1 diagnostics: BN scales with dead channels, the fused kernel's outliers and what INT8 rounds away

DEAD, GAMMA = 3, 0.75


def plant_dead_identity_channel(block: RepVGGBlock) -> None:
    """What training does to a post-ReLU input channel that never fires: its identity BN's mean and var reach 0."""
    with torch.no_grad():
        bn = block.branch_identity
        bn.running_var[DEAD], bn.running_mean[DEAD], bn.weight[DEAD] = 0.0, 0.0, GAMMA


@pytest.mark.parametrize("where", ["bare block", "detector"])
def test_a_dead_identity_channel_gives_gamma_over_sqrt_eps_exactly(where: str) -> None:
    """A bare nn.BatchNorm2d has eps 1e-5; Ultralytics' initialize_weights sets 1e-3 in a detector. In float64 the
    scale is exactly the IEEE value of gamma / sqrt(eps), and only the planted channel counts as dead."""
    if where == "bare block":
        model, name, eps = randomize_bn(RepVGGBlock(16, 16)).double(), "", 1e-5
    else:
        detector = DetectionModel(str(YAMLS / "yolo_repvgg_n.yaml"), nc=3, verbose=False)
        model, name, eps = randomize_bn(detector).double(), "model.2.0", 1e-3
    block = model.get_submodule(name)
    assert block.branch_identity.eps == eps
    plant_dead_identity_channel(block)
    rows = {row.branch: row for row in bn_scales(model) if row.block == name}
    identity = rows["identity"]
    assert identity.max == GAMMA / math.sqrt(eps) and identity.channel == DEAD
    assert identity.dead_channels == 1 and identity.outliers == 1
    assert rows["3x3"].dead_channels == rows["1x1"].dead_channels == 0
    assert dead_channel_mask(block.branch_identity).nonzero().flatten().tolist() == [DEAD]


def test_dead_means_a_mean_square_input_at_most_eps() -> None:
    bn = nn.BatchNorm2d(4, eps=1e-3)
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([0.0, 1e-3, 0.0, 5e-4]))
        bn.running_mean.copy_(torch.tensor([0.0, 0.0, 0.1, 0.02]))  # 0.1^2 = 1e-2 > eps: a constant, live channel
    assert dead_channel_mask(bn).tolist() == [True, True, False, True]


def test_one_dominant_tap_rounds_the_predicted_share_to_zero() -> None:
    """Channel 0: one tap of 127 sets the INT8 step to exactly 1, so its ten weights of |w| < 0.5 are lost (an exact
    zero is not lost: it was zero in float); channel 1 has no dominant tap and loses nothing."""
    weight = torch.full((2, 4, 3, 3), 0.6, dtype=torch.float64)
    w0 = weight[0].view(-1)
    w0[0], w0[1] = 127.0, 0.0
    w0[2:12] = torch.tensor([0.3, -0.3, 0.49, -0.49, 0.1, -0.1, 0.01, 0.2, -0.45, 0.25], dtype=torch.float64)
    weight[1] = torch.linspace(0.5, 1.0, 36, dtype=torch.float64).view(4, 3, 3)
    assert int8_zero_share(weight).tolist() == [10 / 36, 0.0]

    block = QARepBlock(4, 2).double()
    block.reparameterize()
    with torch.no_grad():
        block.conv.weight.copy_(weight)
    (row,) = fused_kernels(block)
    assert row.conv == "conv" and row.block_type == "QARepBlock"
    assert row.zero_share == (10 / 36, 0.0) and row.zero_share_max == 10 / 36 and row.zero_share_mean == 5 / 36
    assert row.max_abs == 127.0 and row.channel == 0 and row.channel_max_to_median == 127.0 / 0.6
    assert row.median_abs == float(weight.abs().median()) and row.max_to_median == 127.0 / row.median_abs


def test_fused_kernels_read_the_training_form_as_the_fused_model_deploys_it() -> None:
    """A RepVGG block with a dead identity channel: the same rows before and after fusion, the dead channel's centre
    tap dominates it, and its zero share is the hand count of |w| < amax / 254 (nothing else INT8 rounds to zero)."""
    model = nn.Sequential(randomize_bn(RepVGGBlock(16, 16)), randomize_bn(RepVGGNoIdBNStage(16, 16, 2)))
    plant_dead_identity_channel(model[0])
    before = fused_kernels(model)
    fused = reparameterize_model(model)
    assert [row.conv for row in before] == ["0.conv", "1.0.conv", "1.1.conv"]
    assert before == fused_kernels(fused)
    assert not any(b.fused for b in model.modules() if isinstance(b, RepBlock))  # read without fusing

    kernel = fused[0].conv.weight.detach()
    assert kernel[DEAD].abs().argmax() == DEAD * 9 + 4  # its centre tap on its own input channel
    amax = kernel.abs().flatten(1).amax(1, keepdim=True)
    by_hand = (kernel.abs().flatten(1) < amax / 254).double().mean(1)
    share = torch.tensor(before[0].zero_share, dtype=torch.float64)
    torch.testing.assert_close(share, by_hand, rtol=0, atol=0)
    assert int(share.argmax()) == DEAD and share[DEAD] > 0.5 > share.median()
    assert before[0].channel == DEAD and before[0].channel_max_to_median > 30 * before[1].channel_max_to_median
