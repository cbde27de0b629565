"""--float-cost: a float conv's cost from its multiply-accumulates, the ranking re-ordered by harm per cost, the
search answering the cheaper of two float sets that both meet D, the rows' cost keys, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from qarep_det.cli.main import main as cli_main
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.sensitivity.float_cost import by_cost, conv_macs
from qarep_det.sensitivity.max_drop import search_float_convs
from qarep_det.sensitivity.rankings import Sensitivity
from qarep_det.ultralytics.checkpoint import load_fused

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Tiny(nn.Module):
    """Three convs whose multiply-accumulates on a 32 x 32 image are known by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # 16 x 16 out: 8 * 3 * 9 * 256 = 55296
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)  # 16 x 16 out: 8 * 2 * 9 * 256 = 36864
        self.head = nn.Conv2d(8, 16, 1, stride=2)  # 8 x 8 out: 16 * 8 * 64 = 8192

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.grouped(self.stem(x))))


def test_a_convs_cost_is_its_multiply_accumulates_at_the_image_size() -> None:
    model = Tiny().train()
    macs = conv_macs(model, 32, ["head", "stem", "grouped"])
    assert macs == {"head": 8192, "stem": 55296, "grouped": 36864}  # in the order asked
    assert sorted(macs, key=macs.get, reverse=True) == ["stem", "grouped", "head"]
    assert conv_macs(model, 64, ["head"]) == {"head": 4 * 8192}  # at twice the size, four times the outputs
    assert model.training and not model.stem._forward_hooks  # the model is left as it was


def test_the_ranking_is_re_ordered_by_harm_per_cost() -> None:
    ranking = ["a", "b", "c", "d", "e"]
    harm = {"a": 10.0, "b": 4.0, "c": 0.0, "d": 2.0, "e": -1.0}
    costs = {"a": 100.0, "b": 1.0, "c": 1.0, "d": 1.0, "e": 1.0}
    # b (4 per MAC), d (2), a (0.1); then c and e, harmless, in ranking order
    assert by_cost(ranking, harm, costs) == ["b", "d", "a", "c", "e"]
    assert by_cost(ranking, dict.fromkeys(ranking, 1.0), dict.fromkeys(ranking, 5.0)) == ranking  # ties: as ranked
    with pytest.raises(ValueError, match="cost must be > 0, got 0"):
        by_cost(ranking, harm, {**costs, "c": 0.0})


def test_the_search_answers_the_cheaper_of_two_float_sets_that_both_meet_the_target() -> None:
    """Fully INT8 drop 3: conv0 alone wins it back but runs at high resolution (100 MACs); conv1 and conv2 together
    win it back too for 2 MACs. By count the search keeps conv0 (one conv); by cost conv1 and conv2 (two convs, 50x
    cheaper), both within D, with the same bisection."""
    names = [f"conv{i}" for i in range(10)]
    harm = {name: 0.05 for name in names} | {"conv0": 3.0, "conv1": 1.5, "conv2": 1.5}
    macs = {name: 10.0 for name in names} | {"conv0": 100.0, "conv1": 1.0, "conv2": 1.0}
    sensitivity = Sensitivity(nn.Identity(), sorted(names, key=lambda n: -harm[n]), 0.0, 0.0, harm=harm)

    def evaluate(float_set: tuple[str, ...]) -> tuple[float, float]:
        return 50.0 - max(0.0, 3.0 - sum(harm[name] for name in float_set)), 1.0

    def search(ranking: list[str]):
        return search_float_convs(
            ranking, fp32_tune_map=50.0, evaluate=evaluate, max_drop=0.3, report=lambda _: None, costs=macs
        )

    by_count, by_latency = search(sensitivity.ranking), search(sensitivity.by_cost(macs).ranking)
    assert by_count.met and by_latency.met
    assert by_count.float_layers == ("conv0",) and by_count.chosen.gmacs == pytest.approx(100e-9)
    assert set(by_latency.float_layers) == {"conv1", "conv2"} and by_latency.chosen.gmacs == pytest.approx(2e-9)
    search_row = by_latency.row(tune_images=10, tune_split="val", search_s=1.0)
    assert [s.float_gmacs for s in search_row.tune_steps] == [0.0] + [round(s.gmacs, 4) for s in by_latency.steps[1:]]
    recipe = QuantRecipe()
    assert sensitivity.by_cost(macs).keep(recipe, 2).float_layers == ("conv1", "conv2")  # --keep-float K too
    assert sensitivity.keep(recipe, 2).float_layers == ("conv0", "conv1")


@pytest.mark.parametrize("float_cost", ["count", "latency"])
def test_ranked_rows_carry_the_float_sets_cost(known_answer, tmp_path: Path, float_cost: str) -> None:
    """--keep-float 2 on the planted detector: the row says how the convs were chosen and what they cost, the MACs
    of exactly the convs it keeps float."""
    out = tmp_path / "out"
    args = ["ptq-eval", "--weights", str(known_answer.planted), "--data", str(known_answer.data), "--imgsz", "96",
            "--calib-images", "8", "--rank-images", "4", "--batch", "4", "--keep-float", "2",
            "--float-cost", float_cost, "--out", str(out)]  # fmt: skip
    assert cli_main(args) == 0
    (row,) = json.loads((out / "results.json").read_text())
    fused = load_fused(known_answer.planted).fused
    macs = conv_macs(fused, 96, [name for name, m in fused.named_modules() if isinstance(m, nn.Conv2d)])
    assert row["float_cost"] == float_cost and len(row["float_layers"]) == 2
    kept = sum(macs[name] for name in row["float_layers"])  # results.json keeps 4 significant digits
    assert row["float_gmacs"] == pytest.approx(kept / 1e9, rel=1e-3)
    assert 0 < row["float_mac_share"] == pytest.approx(kept / sum(macs.values()), rel=1e-3)


def test_an_unknown_float_cost_fails_in_one_line_before_any_work(
    known_answer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    status = cli_main(["ptq-eval", "--weights", str(known_answer.planted), "--data", str(known_answer.data),
                       "--imgsz", "96", "--calib-images", "8", "--max-drop", "0.3", "--float-cost", "speed",
                       "--out", str(out)])  # fmt: skip
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and lines == ["error: --float-cost: unknown float cost 'speed': choose from latency, count"]
    assert not out.exists()
