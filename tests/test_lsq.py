"""qarep_det.quant.lsq: learned quantizer ranges on ModelOpt (forward, LSQ gradients, positivity, export, freezing)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import randomize_bn
from helpers import qdq_convs
from torch import nn
from ultralytics.nn.tasks import DetectionModel

from qarep_det import reparameterize_model
from qarep_det.quant.backends.onnx_qdq import export_qdq_onnx
from qarep_det.quant.backends.simulated import import_modelopt, modelopt_config
from qarep_det.quant.lsq import (
    AMAX_FLOOR,
    BACKEND,
    LogDomainSteps,
    clamp_ranges_,
    freeze_ranges,
    learn_ranges,
    range_parameters,
)
from qarep_det.quant.qat import make_student, quantizer_ranges
from qarep_det.quant.recipe import QuantRecipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QAREP_N = Path(__file__).resolve().parents[1] / "model_yamls" / "yolo_qarep_n.yaml"


class TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.c1(x)))


def quantized_two_convs() -> TwoConvs:
    """The project's ModelOpt config on two convs, max-calibrated on images in [0, 1]."""
    mtq = import_modelopt()
    model = TwoConvs()
    calib = torch.rand(2, 3, 16, 16)
    mtq.quantize(model, modelopt_config([]), lambda m: m(calib))
    return model


def test_max_calibrated_weights_are_inside_their_range() -> None:
    """Max calibration puts one weight of every channel exactly at amax: that weight keeps its gradient."""
    model = quantized_two_convs()
    learn_ranges(model)
    model(torch.rand(2, 3, 16, 16)).sum().backward()
    weight = model.c1.weight
    at_amax = weight.detach().abs() == model.c1.weight_quantizer.amax
    assert at_amax.sum() >= 8 and (weight.grad[at_amax] != 0).all()


def lsq_reference(x: torch.Tensor, amax: torch.Tensor, elements: int) -> torch.Tensor:
    """LSQ as its paper writes it (step s = amax / 127, grid [-128, 127], gradient scale g = 1/sqrt(N * 127)), in
    plain autograd: amax gets dL/damax scaled by g."""
    g = 1.0 / math.sqrt(elements * 127)
    step = amax / 127
    step = (step - step * g).detach() + step * g
    v = torch.clamp(x / step, -128, 127)
    return ((v.round() - v).detach() + v) * step


def test_forward_is_modelopts_and_gradients_are_lsqs() -> None:
    model = quantized_two_convs()
    with torch.no_grad():  # weights clip too, none at amax: LSQ's clip test is then the same in any float rounding
        for conv in (model.c1, model.c2):
            conv.weight_quantizer.amax = conv.weight_quantizer.amax * 0.9
    x = torch.rand(2, 3, 16, 16) * 3  # most inputs beyond the calibrated range: clipped
    with torch.no_grad():
        modelopt_out = model(x)
    learning = copy.deepcopy(model)
    ranges = learn_ranges(learning)
    assert [tuple(a.shape) for a in ranges] == [(), (8, 1, 1, 1), (), (4, 1, 1, 1)]
    xs = x.clone().requires_grad_(True)
    out = learning(xs)
    assert torch.equal(out.detach(), modelopt_out)  # ModelOpt's own fake quant, bit for bit
    out.square().sum().backward()

    quantizers = [learning.c1.input_quantizer, learning.c1.weight_quantizer]
    quantizers += [learning.c2.input_quantizer, learning.c2.weight_quantizer]
    amax = [q.amax.detach().clone().requires_grad_(True) for q in quantizers]
    xr = x.clone().requires_grad_(True)
    h = lsq_reference(xr, amax[0], 3 * 16 * 16)  # per image: C * H * W
    h = torch.relu(nn.functional.conv2d(h, lsq_reference(model.c1.weight, amax[1], 3 * 9), model.c1.bias, padding=1))
    h = lsq_reference(h, amax[2], 8 * 16 * 16)
    ref = nn.functional.conv2d(h, lsq_reference(model.c2.weight, amax[3], 8 * 9), model.c2.bias, padding=1)
    torch.testing.assert_close(ref.detach(), modelopt_out, rtol=0, atol=1e-6)
    ref.square().sum().backward()
    for quantizer, reference in zip(quantizers, amax, strict=True):  # amax trains in amax units: 127^2 x dL/damax
        assert quantizer.amax.grad.abs().min() > 0
        torch.testing.assert_close(quantizer.amax.grad, reference.grad * 127**2, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(xs.grad, xr.grad)  # clipped inputs get no gradient
    assert (xs.grad == 0).any()

    before = [a.detach().clone() for a in ranges]
    torch.optim.SGD(ranges, lr=1e-3).step()
    assert all(not torch.equal(a, b) for a, b in zip(ranges, before, strict=True))  # every range moved in one step


def test_modelopts_own_backward_passes_clipped_inputs_and_no_range_gradient() -> None:
    """What frozen ranges train with (the project's config): a plain straight-through estimator."""
    model = quantized_two_convs()
    x = (torch.rand(2, 3, 16, 16) * 3).requires_grad_(True)
    model(x).sum().backward()
    clipped = x.detach() > model.c1.input_quantizer.amax
    assert clipped.any() and (x.grad[clipped] != 0).all()
    assert all(q.amax.grad is None for q in (model.c1.input_quantizer, model.c1.weight_quantizer))


def test_ranges_stay_positive_and_a_dead_channel_stays_finite() -> None:
    model = quantized_two_convs()
    with torch.no_grad():
        model.c1.weight_quantizer.amax[0] = 0.0  # a channel max calibration saw all-zero
        model.c1.weight[0] = 0.0
    ranges = learn_ranges(model)
    model(torch.rand(2, 3, 16, 16)).sum().backward()
    assert all(torch.isfinite(a.grad).all() for a in ranges)
    assert model.c1.weight_quantizer.amax.grad[0] == 0
    optimizer = torch.optim.SGD(ranges, lr=1e6)  # a step far past zero
    optimizer.register_step_post_hook(lambda *_: clamp_ranges_(ranges))
    optimizer.step()
    assert all((a > 0).all() for a in ranges)


def test_ranges_step_by_the_same_factor_whatever_their_size() -> None:
    """The log-domain step: Adam's first step is lr in the parameter's units, here in log(amax) units."""
    ranges = [nn.Parameter(torch.tensor(1e-3)), nn.Parameter(torch.tensor([[20.0], [0.5]]))]
    optimizer = torch.optim.Adam(ranges, lr=0.1)
    LogDomainSteps(ranges).attach(optimizer)
    for amax in ranges:
        amax.grad = -torch.ones_like(amax)  # every range should grow
    optimizer.step()
    torch.testing.assert_close(ranges[0].detach(), torch.tensor(1e-3 * math.exp(0.1)), rtol=1e-4, atol=0)
    torch.testing.assert_close(ranges[1].detach(), torch.tensor([[20.0], [0.5]]) * math.exp(0.1), rtol=1e-4, atol=0)
    optimizer.param_groups[0]["lr"] = 1e3  # then a step far down: exp underflows, the floor holds
    for amax in ranges:
        amax.grad = torch.ones_like(amax)
    optimizer.step()
    assert all((amax == AMAX_FLOOR).all() for amax in ranges)


def test_freezing_gives_back_plain_modelopt_with_the_same_keys_and_values() -> None:
    model = quantized_two_convs()
    keys = list(model.state_dict())
    ranges = learn_ranges(model)
    assert learn_ranges(model) == ranges and range_parameters(model) == ranges  # idempotent
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        ranges[0].mul_(2)
    learned = quantizer_ranges(model)
    freeze_ranges(model)
    assert not range_parameters(model) and list(model.state_dict()) == keys
    assert all(torch.equal(quantizer_ranges(model)[k], v) for k, v in learned.items())
    quantizers = [m for m in model.modules() if type(m).__name__ == "TensorQuantizer"]
    assert all(q.backend is None and not isinstance(q._amax, nn.Parameter) for q in quantizers if q.is_enabled)
    assert BACKEND not in repr(model)


def test_qdq_export_of_a_learning_student_carries_the_learned_scales(tmp_path: Path) -> None:
    fused = reparameterize_model(randomize_bn(DetectionModel(str(QAREP_N), nc=6, verbose=False)))
    student = make_student(fused, [torch.rand(2, 3, 64, 64)], QuantRecipe(calib_images=2))
    calibrated = quantizer_ranges(student)
    ranges = learn_ranges(student)
    student.eval()(torch.rand(2, 3, 64, 64))[0].square().mean().backward()  # grad on: the backend learns in eval too
    torch.optim.SGD(ranges, lr=1e-4).step()
    clamp_ranges_(ranges)
    learned = {k: v for k, v in quantizer_ranges(student).items() if not torch.equal(v, calibrated[k])}
    assert len(learned) > len(calibrated) // 2  # most ranges moved: the export below must show the new ones

    path = export_qdq_onnx(student, tmp_path / "student.onnx", imgsz=64)  # backend still set: ModelOpt's Q/DQ
    convs = qdq_convs(path)
    for key, amax in quantizer_ranges(student).items():
        conv, kind = key.removesuffix("_quantizer._amax").rsplit(".", 1)
        pair = convs[conv][0 if kind == "input" else 1]
        torch.testing.assert_close(torch.tensor(pair.scale), amax.flatten().squeeze() / 127, rtol=1e-7, atol=0)
