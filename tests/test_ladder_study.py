"""``qarep-det ladder``: the QARepVGG ablation ladder as a study, end to end on a tiny generated dataset (2 steps x 2
seeds, 1 epoch at 64 px, torch backend), then resumed; its summary on known numbers; C2 on a known answer; bad input.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
import torch
import yaml
from conftest import randomize_bn
from torch import nn

from qarep_det import reparameterize_model
from qarep_det.cli.main import main as cli_main
from qarep_det.data.synthetic import make_dataset
from qarep_det.errors import InputError
from qarep_det.evaluation.ladder_report import TRACE_COLUMNS, growth_rows
from qarep_det.models import model_yaml
from qarep_det.nn import QARepBlock, RepVGGBlock
from qarep_det.pipelines import ladder
from qarep_det.pipelines.ladder import (
    ROW_FILE,
    STEPS,
    TRAIN_MARKER,
    LadderSettings,
    mean_leaves,
    resumable,
    spread,
    summarize,
    train_run,
)
from qarep_det.sensitivity.diagnostics import block_outputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEEDS = (0, 1)
STUDY_STEPS = ("S0", "S4")  # RepVGG with its custom L2 (its own trainer) and QARepVGG
FLAGS = ["--epochs", "1", "--imgsz", "64", "--batch", "8", "--device", "cpu", "--workers", "0", "--calib-images", "4",
         "--activation-images", "2", "--eval-batch", "4"]  # fmt: skip


class Calls:
    """Counts the trainings and ptq-evaluations a study makes, keeping what each training was given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.trainings: list[Any] = []
        self.evaluations = 0
        train, evaluate = ladder.train, ladder.run_ptq_eval

        def counted_train(options, *args, **kwargs):
            self.trainings.append(options)
            return train(options, *args, **kwargs)

        def counted_evaluate(*args, **kwargs):
            self.evaluations += 1
            return evaluate(*args, **kwargs)

        monkeypatch.setattr(ladder, "train", counted_train)
        monkeypatch.setattr(ladder, "run_ptq_eval", counted_evaluate)


def run_cli(data: Path, out: Path, *extra: str) -> int:
    return cli_main(["ladder", "--data", str(data), "--steps", *STUDY_STEPS, "--seeds", *map(str, SEEDS), *FLAGS,
                     "--out", str(out), *extra])  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The study run once through the CLI, then again in the same folder; what each run trained and evaluated."""
    root = tmp_path_factory.mktemp("ladder")
    data = make_dataset(root / "data", n_train=8, n_val=4, imgsz=64, seed=0)
    out = root / "study"
    with pytest.MonkeyPatch.context() as monkeypatch:
        first = Calls(monkeypatch)
        assert run_cli(data, out) == 0
    first_json = json.loads((out / "ladder.json").read_text())
    with pytest.MonkeyPatch.context() as monkeypatch:
        second = Calls(monkeypatch)
        assert run_cli(data, out) == 0
    return {"data": data, "out": out, "json": first_json, "first": first, "second": second,
            "rerun_json": json.loads((out / "ladder.json").read_text())}  # fmt: skip


def test_the_study_trains_and_evaluates_every_step_and_seed_once(study: dict[str, Any]) -> None:
    first = study["first"]
    assert [(Path(o.cfg).name, o.rep_l2, o.seed) for o in first.trainings] == [
        ("yolo_repvgg_n.yaml", "custom", 0), ("yolo_repvgg_n.yaml", "custom", 1),
        ("yolo_qarep_n.yaml", "plain", 0), ("yolo_qarep_n.yaml", "plain", 1),
    ]  # fmt: skip
    assert first.evaluations == 4
    for step in STUDY_STEPS:
        for seed in SEEDS:
            args = yaml.safe_load((study["out"] / "runs" / f"{step}_seed{seed}" / "args.yaml").read_text())
            assert (args["seed"], args["deterministic"], args["epochs"], args["imgsz"]) == (seed, True, 1, 64)
    weights = [torch.load(study["out"] / "runs" / f"S4_seed{s}" / "weights" / "last.pt", weights_only=False)
               for s in SEEDS]  # fmt: skip
    a, b = (w["model"].state_dict() for w in weights)
    assert any(not torch.equal(a[k], b[k]) for k in a), "two seeds trained the same model"


def test_the_json_holds_settings_machine_seeds_rows_and_per_step_summaries(study: dict[str, Any]) -> None:
    doc = study["json"]
    assert doc["seeds"] == list(SEEDS) and [s["step"] for s in doc["steps"]] == list(STUDY_STEPS)
    settings = doc["settings"]
    assert settings["steps"] == list(STUDY_STEPS) and settings["groups"] == 1 and settings["epochs"] == 1
    assert settings["backends"] == ["torch"] and settings["calib_images"] == 4
    assert settings["data"] == str(study["data"].resolve())
    assert doc["machine"]["cpu"] and doc["machine"]["torch"] == torch.__version__
    assert "4 imgs" in doc["recipe"] and "64 px" in doc["protocol"]
    assert [(r["step"], r["seed"]) for r in doc["runs"]] == [(s, k) for s in STUDY_STEPS for k in SEEDS]
    for row in doc["runs"]:
        torch_row = row["backends"]["torch"]
        assert math.isclose(torch_row["drop"], torch_row["fp32_map50_95"] - torch_row["int8_map50_95"], abs_tol=0.01)
        assert torch_row["images"] == 4 and torch_row["image_drop_se"] >= 0
        assert row["train_s"] > 0 and row["eval_s"] > 0 and row["epochs"] == 1 and not row["resumed"]
    for summary in doc["steps"]:
        rows = [r for r in doc["runs"] if r["step"] == summary["step"]]
        drops = [r["backends"]["torch"]["drop"] for r in rows]
        drop = summary["backends"]["torch"]["drop"]
        assert drop["values"] == drops and drop["n"] == 2
        assert math.isclose(drop["mean"], statistics.fmean(drops), abs_tol=1e-9)
        assert math.isclose(drop["se"], abs(drops[0] - drops[1]) / 2, abs_tol=1e-9)  # stdev/sqrt(2) of two values
        assert math.isclose(summary["wall_s"], sum(r["train_s"] + r["eval_s"] for r in rows), rel_tol=1e-9)
        assert summary["model"] == rows[0]["model"] and summary["seeds"] == list(SEEDS)


def test_c1_and_c2_name_each_steps_batchnorms_and_rep_blocks(study: dict[str, Any]) -> None:
    """S0 (RepVGG) has an identity BN and S4 (QARep) a post-BN instead; C2 reads every Rep block of the model."""
    s0, s4 = study["json"]["steps"]
    assert {"3x3", "1x1", "identity"} <= set(s0["c1"]["bn_scale_max"]) and "post" not in s0["c1"]["bn_scale_max"]
    assert {"3x3", "post"} <= set(s4["c1"]["bn_scale_max"]) and "identity" not in s4["c1"]["bn_scale_max"]
    assert s0["bn_scale_max"]["identity"]["n"] == 2
    assert s0["c1"]["bns_with_dead_channels"]["identity"] <= s0["c1"]["dead_channels"]["identity"]
    assert 0 <= s0["c1"]["zero_share_max"] <= 1 and s0["c1"]["kernel_max_to_median"] >= 1
    model = torch.load(study["out"] / "runs" / "S4_seed0" / "weights" / "last.pt", weights_only=False)["model"]
    rep_blocks = [name for name, m in model.named_modules() if isinstance(m, QARepBlock)]
    assert list(s4["c2"]["by_block"]) == rep_blocks
    c2 = study["json"]["runs"][-1]["c2"]  # one seed's: the largest over its blocks
    assert c2["max_to_std_max"] == max(b["max_to_std"] for b in c2["by_block"].values())


def test_c1_is_traced_after_every_epoch_on_the_saved_model(study: dict[str, Any]) -> None:
    """The trace after the one epoch is C1 of the model last.pt holds (saved in half precision, hence the tolerance);
    the step's summary averages it over seeds and the Markdown shows it."""
    for row in study["json"]["runs"]:
        (epoch,) = row["c1_by_epoch"]
        traced = row["c1_by_epoch"][epoch]
        assert epoch == "1" and set(traced["bn_scale_max"]) == set(row["c1"]["bn_scale_max"])
        for branch, value in row["c1"]["bn_scale_max"].items():
            assert math.isclose(traced["bn_scale_max"][branch], value, rel_tol=2e-3), (row["step"], branch)
    s0 = study["json"]["steps"][0]
    identity = [r["c1_by_epoch"]["1"]["bn_scale_max"]["identity"] for r in study["json"]["runs"] if r["step"] == "S0"]
    assert math.isclose(s0["c1_by_epoch"]["1"]["bn_scale_max"]["identity"], statistics.fmean(identity))
    text = (study["out"] / "ladder.md").read_text()
    assert "| step | BN | epoch 1 |" in text and "| S0 | identity |" in text


def test_the_growth_table_shows_evenly_spaced_epochs_and_the_identity_bn() -> None:
    trace = {str(e): {"bn_scale_max": {"identity": float(e), "3x3": 100.0 + e}} for e in range(1, 31)}
    post = {str(e): {"bn_scale_max": {"3x3": 1.0, "post": 2.0 * e}} for e in range(1, 31)}
    header, rows = growth_rows({"steps": [{"step": "S0", "c1_by_epoch": trace}, {"step": "S4", "c1_by_epoch": post}]})
    assert header[:3] == ["step", "BN", "epoch 1"] and header[-1] == "epoch 30" and len(header) == 2 + TRACE_COLUMNS
    assert rows[0][:3] == ["S0", "identity", "1"] and rows[0][-1] == "30"  # identity, not the larger 3x3
    assert rows[1][:3] == ["S4", "post", "2"] and rows[1][-1] == "60"
    assert growth_rows({"steps": [{"step": "S0"}]}) == ([], [])


def test_markdown_and_plot_are_written(study: dict[str, Any]) -> None:
    text = (study["out"] / "ladder.md").read_text()
    for step in STUDY_STEPS:
        assert f"| {step} | {STEPS[step].cfg(1)} |" in text
    assert " ± " in text and "identity BN max" in text
    image = matplotlib.image.imread(study["out"] / "ladder.png")
    assert image.shape[0] > 300 and image.shape[1] > 600 and image[..., :3].std() > 0.05  # drawn, not blank


def test_a_rerun_in_the_same_folder_reuses_every_training_and_evaluation(study: dict[str, Any]) -> None:
    assert study["second"].trainings == [] and study["second"].evaluations == 0
    assert study["rerun_json"]["runs"] == study["json"]["runs"]
    assert study["rerun_json"]["steps"] == study["json"]["steps"]


def test_a_missing_row_is_evaluated_again_without_training(study: dict[str, Any], monkeypatch) -> None:
    (study["out"] / "runs" / "S4_seed1" / ROW_FILE).unlink()
    calls = Calls(monkeypatch)
    assert run_cli(study["data"], study["out"]) == 0
    assert calls.trainings == [] and calls.evaluations == 1
    rows = json.loads((study["out"] / "ladder.json").read_text())["runs"]
    assert rows[-1]["backends"] == study["json"]["runs"][-1]["backends"]  # the same model scores the same


def test_a_run_without_its_marker_trains_again_from_scratch_to_the_same_weights(study: dict[str, Any], monkeypatch):
    """The marker is written after training: without it the run starts over (its folder replaced), and the seeded,
    deterministic training reproduces the same weights."""
    run = study["out"] / "runs" / "S4_seed0"
    before = torch.load(run / "weights" / "last.pt", weights_only=False)["model"].state_dict()
    (run / TRAIN_MARKER).unlink()
    calls = Calls(monkeypatch)
    assert run_cli(study["data"], study["out"]) == 0
    assert [(o.seed, o.resume) for o in calls.trainings] == [(0, False)] and calls.evaluations == 1
    after = torch.load(run / "weights" / "last.pt", weights_only=False)["model"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_other_settings_in_a_studys_folder_are_refused_in_one_line(study: dict[str, Any], capsys, monkeypatch) -> None:
    calls = Calls(monkeypatch)
    files = sorted(study["out"].rglob("*"))
    assert run_cli(study["data"], study["out"], "--imgsz", "96") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out: ") and "imgsz 64, not 96" in err[0], err
    assert calls.trainings == [] and sorted(study["out"].rglob("*")) == files


# ---------------------------------------------------------------------------------------------------------------
# Resuming an interrupted training


@pytest.mark.parametrize(
    ("checkpoint", "expected"),
    [
        ({"epoch": 0, "optimizer": {"state": {}}, "train_args": {"epochs": 3}}, True),
        ({"epoch": 1, "optimizer": {"state": {}}, "train_args": {"epochs": 3}}, True),
        ({"epoch": 2, "optimizer": {"state": {}}, "train_args": {"epochs": 3}}, False),  # its last epoch: done
        ({"epoch": -1, "optimizer": None, "train_args": {"epochs": 3}}, False),  # finished and stripped
        ({"epoch": 0, "optimizer": {"state": {}}, "train_args": {"epochs": 5}}, False),  # another schedule
        (None, False),  # no checkpoint
        (b"cut short", False),  # a file the interruption left half written
    ],
)
def test_only_an_interrupted_run_of_the_same_schedule_resumes(tmp_path: Path, checkpoint, expected: bool) -> None:
    last = tmp_path / "last.pt"
    if isinstance(checkpoint, bytes):
        last.write_bytes(checkpoint)
    elif checkpoint is not None:
        torch.save(checkpoint, last)
    assert resumable(last, epochs=3) is expected


@pytest.mark.parametrize("interrupted", [True, False])
def test_train_run_resumes_an_interrupted_run_and_restarts_one_without_an_epoch(tmp_path: Path, monkeypatch,
                                                                                interrupted: bool) -> None:  # fmt: skip
    settings = LadderSettings(data=tmp_path / "data.yaml", steps=("S1",), seeds=(3,), epochs=3, imgsz=64, device="cpu")
    run = tmp_path / "runs" / "S1_seed3"
    (run / "weights").mkdir(parents=True)
    last = run / "weights" / "last.pt"
    torch.save({"epoch": 0 if interrupted else 2, "optimizer": {}, "train_args": {"epochs": 3}}, last)
    (run / ROW_FILE).write_text("{}")  # a row of an earlier model: stale once the run trains
    given = []

    class Trainer:
        def __init__(self, options, callbacks=None) -> None:
            assert list(callbacks) == ["on_fit_epoch_end"]  # the C1 trace
            given.append(options)
            run.mkdir(parents=True, exist_ok=True)  # as Ultralytics makes the run folder
            self.last = last

    monkeypatch.setattr(ladder, "train", Trainer)
    marker = train_run(settings, "S1", 3, tmp_path / "runs")
    (options,) = given
    if interrupted:
        assert options.resume == last and marker["resumed"] and last.exists()
    else:
        assert options.resume is False and options.seed == 3 and not marker["resumed"]
        assert not last.exists()  # the folder was cleared for the fresh run (the fake trainer wrote nothing)
    assert not (run / ROW_FILE).exists() and json.loads((run / TRAIN_MARKER).read_text()) == marker


# ---------------------------------------------------------------------------------------------------------------
# The summary on known numbers


def test_spread_is_the_mean_and_its_standard_error_over_seeds() -> None:
    result = spread([1.0, 2.0, 3.0, 4.0])
    assert result["mean"] == 2.5 and result["n"] == 4 and result["values"] == [1.0, 2.0, 3.0, 4.0]
    assert math.isclose(result["se"], math.sqrt(5 / 3) / 2)  # sample variance 5/3, sqrt(4) seeds
    assert spread([7.0]) == {"mean": 7.0, "se": None, "n": 1, "values": [7.0]}


def test_mean_leaves_averages_matching_numbers_only() -> None:
    trees = [{"a": 1.0, "b": {"x": 2, "y": math.inf}, "only_first": 5, "name": "p"}, {"a": 3.0, "b": {"x": 4, "y": 1}}]
    assert mean_leaves(trees) == {"a": 2.0, "b": {"x": 3, "y": None}}


def _row(seed: int, fp32: float, int8: float, image_se: float, identity: float) -> dict[str, Any]:
    return {"step": "S1", "seed": seed, "train_s": 10.0 * (seed + 1), "eval_s": 1.0,
            "backends": {"torch": {"fp32_map50_95": fp32, "int8_map50_95": int8, "drop": fp32 - int8,
                                   "image_drop_se": image_se}},
            "c1": {"bn_scale_max": {"identity": identity, "3x3": 2.0}, "dead_channels": {"identity": seed}},
            "c2": {"max_to_std_max": 10.0 + seed}}  # fmt: skip


def test_summarize_on_known_numbers() -> None:
    rows = [_row(0, 30.0, 20.0, 0.4, 100.0), _row(1, 32.0, 26.0, 0.6, 300.0), _row(2, 34.0, 26.0, 0.8, 200.0)]
    summary = summarize("S1", 4, rows)
    assert (
        summary["model"] == "yolo_repvgg_g4_n.yaml" and summary["rep_l2"] == "plain" and summary["seeds"] == [0, 1, 2]
    )
    torch_ = summary["backends"]["torch"]
    assert torch_["fp32_map50_95"]["mean"] == 32.0 and math.isclose(torch_["fp32_map50_95"]["se"], 2 / math.sqrt(3))
    assert torch_["drop"]["values"] == [10.0, 6.0, 8.0] and torch_["drop"]["mean"] == 8.0
    assert math.isclose(torch_["drop"]["se"], 2 / math.sqrt(3))  # stdev of 10, 6, 8 is 2
    assert math.isclose(torch_["image_drop_se"], 0.6)
    assert summary["bn_scale_max"]["identity"]["mean"] == 200.0
    assert math.isclose(summary["bn_scale_max"]["identity"]["se"], 100 / math.sqrt(3))
    assert summary["c1"]["dead_channels"] == {"identity": 1.0} and summary["c2"] == {"max_to_std_max": 11.0}
    assert (summary["train_s"], summary["eval_s"], summary["wall_s"]) == (60.0, 3.0, 63.0)


# ---------------------------------------------------------------------------------------------------------------
# C2 on a known answer


def test_block_outputs_are_the_variance_and_max_over_std_of_all_images() -> None:
    """Two batches of a RepVGG block then a QARep block: the hooks' figures equal the ones computed on the
    concatenated outputs, and the fused model gives the same."""
    model = randomize_bn(nn.Sequential(RepVGGBlock(4, 8), QARepBlock(8, 8))).double()
    batches = [torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(3, 4, 6, 6, dtype=torch.float64)]
    with torch.no_grad():
        first = torch.cat([model[0](b) for b in batches])
        second = torch.cat([model[1](model[0](b)) for b in batches])
    rows = block_outputs(model, batches)
    assert [(r.block, r.block_type) for r in rows] == [("0", "RepVGGBlock"), ("1", "QARepBlock")]
    for row, output in zip(rows, (first, second), strict=True):
        variance = float(output.var(unbiased=False))
        assert math.isclose(row.variance, variance, rel_tol=1e-9)
        assert row.max_abs == float(output.abs().max())
        assert math.isclose(row.max_to_std, row.max_abs / math.sqrt(variance), rel_tol=1e-9)
    fused = block_outputs(reparameterize_model(model), batches)
    for a, b in zip(rows, fused, strict=True):
        assert math.isclose(a.variance, b.variance, rel_tol=1e-9) and math.isclose(a.max_to_std, b.max_to_std,
                                                                                   rel_tol=1e-9)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Bad input the library refuses (the one-line CLI error of every tool: tests/test_cli.py's BAD_INPUT)


def test_every_step_ships_both_group_variants() -> None:
    """--groups 4 never meets a step without its _g4 model (nor --groups 1 one without its plain model)."""
    for step in STEPS.values():
        for groups in (1, 4):
            assert model_yaml(step.cfg(groups)).is_file()


def test_the_library_refuses_an_unknown_step_naming_the_field() -> None:
    with pytest.raises(InputError, match="unknown step 'S5'") as error:
        LadderSettings(data=Path("d.yaml"), steps=("S0", "S5"))
    assert error.value.field == "steps"
