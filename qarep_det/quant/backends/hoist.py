"""Activation quantizers of an INT8 OpenVINO model moved above the ops that commute with them, so the CPU runs those
ops on 8-bit data. The moved model computes exactly what the unmoved one does.

Why: the recipe (TensorRT's scheme) quantizes the input of each conv only. Where that input is a Concat (fed by
MaxPools or a nearest Upsample) the IR holds ``Relu -> MaxPool -> Concat -> FakeQuantize -> Conv``. OpenVINO's
low-precision transformations then run the Concat on u8 but the MaxPools and Upsamples before it in FP32, with
quantizers executed as ops of their own (on yolo_qarep_s: 3 max-pools and 2 upsamples in f32, 11 such quantizers;
after the move all on u8, 5 left). Ultralytics' own ``format=openvino int8=True`` export puts the quantizers on the
inputs (NNCF's default placement), and ran faster than our IR at the same mAP (docs/int8.md). Quantizing with one
grid commutes with these three ops:
``concat(q(a), q(b)) == q(concat(a, b))``, ``maxpool(q(x)) == q(maxpool(x))`` (a quantizer never reverses an
order), ``upsample(q(x)) == q(upsample(x))`` (nearest only copies values). So a quantizer that every path out of such
an op ends in (the same grid on all of them) can be put on the op's inputs instead, with no value changed.

Why by hand: NNCF places its quantizers above these ops only when it quantizes them as ops of their own (its ranges,
unified across a Concat's inputs), which is not the recipe's; OpenVINO's own transformations stop at the Concat.
The move is a graph rewrite of a few lines, checked by tests: same outputs, no quantizer left below a Concat.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import openvino as ov

_COMMUTING = ("Concat", "MaxPool", "Interpolate")


def _commutes(op) -> bool:
    """Whether ``op`` commutes with a per-tensor quantizer: Concat, MaxPool (its indices output unused), nearest
    Interpolate."""
    kind = op.get_type_name()
    if kind == "Interpolate":
        return op.get_attributes().get("mode") == "nearest"
    if kind == "MaxPool":
        return all(not out.get_target_inputs() for out in op.outputs()[1:])
    return kind in _COMMUTING


def _data_inputs(op) -> range:
    """The inputs of a commuting op that carry activations (Interpolate's and MaxPool's others are shapes)."""
    return range(op.get_input_size()) if op.get_type_name() == "Concat" else range(1)


def _grid(fake_quantize) -> tuple | None:
    """A FakeQuantize's grid (levels and its four range constants), or None where a range is not a constant."""
    ranges = [fake_quantize.input_value(i).get_node() for i in range(1, 5)]
    if any(r.get_type_name() != "Constant" for r in ranges):
        return None
    return (fake_quantize.get_attributes()["levels"], *(r.get_data().tobytes() for r in ranges))


def _consumers(op) -> list:
    return [target.get_node() for target in op.output(0).get_target_inputs()]


def _region(start, grid: tuple) -> dict | None:
    """The commuting ops above a quantizer by node name (the Python objects for one node differ from call to call),
    as far up as every path out of them ends in the same ``grid``; None if ``start`` itself has a consumer that is
    neither in the region nor such a quantizer."""

    def closed(op, region: dict) -> bool:
        return all(
            c.get_name() in region or (c.get_type_name() == "FakeQuantize" and _grid(c) == grid) for c in _consumers(op)
        )

    region = {start.get_name(): start}
    if not closed(start, region):
        return None
    grown = True
    while grown:
        grown = False
        for op in list(region.values()):
            for i in _data_inputs(op):
                source = op.input_value(i).get_node()
                if source.get_name() not in region and _commutes(source) and closed(source, region):
                    region[source.get_name()] = source
                    grown = True
    return region


def hoist_quantizers(ov_model: ov.Model) -> int:
    """Move each activation FakeQuantize that sits below a Concat, MaxPool or nearest Interpolate onto that op's
    inputs, as far up as the move keeps every value (module docstring); in place. Returns how many quantizers were
    removed from below such ops."""
    from openvino import opset13

    moved = 0
    done: set[str] = set()
    for fake_quantize in ov_model.get_ordered_ops():
        if fake_quantize.get_type_name() != "FakeQuantize" or fake_quantize.get_name() in done:
            continue
        start, grid = fake_quantize.input_value(0).get_node(), _grid(fake_quantize)
        if grid is None or not _commutes(start):
            continue
        region = _region(start, grid)
        if region is None:
            continue
        ranges = [fake_quantize.input_value(i) for i in range(1, 5)]
        levels = fake_quantize.get_attributes()["levels"]
        inserted: dict[tuple[str, int], object] = {}
        for op in region.values():  # a quantizer on every edge that enters the region, one per source tensor
            for i in _data_inputs(op):
                source = op.input_value(i)
                if source.get_node().get_name() in region:
                    continue
                key = (source.get_node().get_name(), source.get_index())
                if key not in inserted:
                    inserted[key] = opset13.fake_quantize(source, *ranges, levels).output(0)
                op.input(i).replace_source_output(inserted[key])
        for op in region.values():  # the quantizers below the region now see quantized values: bypass them
            for below in [c for c in _consumers(op) if c.get_type_name() == "FakeQuantize"]:
                done.add(below.get_name())
                for target in list(below.output(0).get_target_inputs()):
                    target.replace_source_output(op.output(0))
                moved += 1
    ov_model.validate_nodes_and_infer_types()
    return moved


def quantizers_below_commuting_ops(ov_model: ov.Model) -> int:
    """How many activation FakeQuantize ops read a Concat, MaxPool or nearest Interpolate: 0 after the hoist where
    every such op's consumers share one grid."""
    return sum(
        op.get_type_name() == "FakeQuantize" and _commutes(op.input_value(0).get_node())
        for op in ov_model.get_ordered_ops()
    )
