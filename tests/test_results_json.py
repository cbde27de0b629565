"""results.json's rows: the schema docs/results-json.md documents is the one PTQRow writes, and a row survives
its JSON form unchanged."""

from __future__ import annotations

import json
import re
from dataclasses import fields, replace
from pathlib import Path

from helpers import ptq_row

from qarep_det.evaluation.results import PTQRow, Ranking, Search, TuneStep, json_fields
from qarep_det.evaluation.table import read_results, write_results

DOC = Path(__file__).resolve().parents[1] / "docs" / "results-json.md"
FIELD_ROW = re.compile(r"^\| `(\w+)` \|", flags=re.M)


def documented() -> list[list[str]]:
    """The field names of each table of the page, in order."""
    tables = re.split(r"\n(?!\|)", DOC.read_text(encoding="utf-8"))  # a table is a run of lines starting with |
    return [names for block in tables if (names := FIELD_ROW.findall(block))]


def searched_row() -> PTQRow:
    """A --max-drop row on OpenVINO: every group present, a refinement step among the steps."""
    steps = (
        TuneStep(k=0, tune_map50_95=20.5, tune_drop=30.25, int8_ms=4.5),
        TuneStep(k=1, tune_map50_95=48.0, tune_drop=2.75, int8_ms=4.75, float_gmacs=0.5, reverted="model.3.conv"),
        TuneStep(k=1, tune_map50_95=49.5, tune_drop=1.25, int8_ms=4.75),
    )
    rank = Ranking(
        calibrate_s=3.5,
        rank_images=32,
        rank_by="isolated",
        rank_s=7.25,
        rank_half_range=True,
        float_cost="latency",
        float_gmacs=0.125,
        float_mac_share=0.25,
    )
    search = Search(
        max_drop=2.0,
        refine=1,
        tune_drop=1.25,
        tune_drop_se=0.4,
        tune_images_needed=None,
        tune_evals=4,
        shortfall=0.0,
        fp32_tune_map50_95=50.75,
        int8_tune_map50_95=49.5,
        tune_steps=steps,
        tune_images=256,
        tune_split="train",
        search_s=12.5,
    )
    return ptq_row(
        backend="openvino",
        float_layers=("model.3.conv",),
        rank=rank,
        search=search,
        int8_file="out/m_openvino_int8.xml",
        fp32_mb=12.5,
        int8_mb=3.25,
        fp32_backend_map50_95=50.5,
        protocol="640 px letterbox",
    )


def test_the_documented_fields_are_the_rows_fields() -> None:
    """docs/results-json.md lists every field a row writes, in order (its tables: the row's own fields, the ranking
    and search, each tuning step, the backend's); a field added to PTQRow and not documented fails here."""
    row, ranked, step, backend = documented()
    assert row + ranked + backend == json_fields() == list(searched_row().to_json())
    assert len(set(json_fields())) == len(json_fields())  # a group's field never shadows the row's
    assert ranked == [f.name for f in fields(Ranking)] + [f.name for f in fields(Search)]
    assert step == [f.name for f in fields(TuneStep)]


def test_a_row_survives_its_json_form() -> None:
    """Every group present or absent, through json text: the same row; absent groups are nulls, not missing keys."""
    searched = searched_row()
    plain = ptq_row(calib_images=None, fp32_map50_95=None, drop=None, fp32_map50=None, fp32_ms=None)
    for row in (searched, plain, replace(searched, search=None)):
        record = json.loads(json.dumps(row.to_json()))
        assert PTQRow.from_json(record) == row
        assert list(record) == json_fields()
    record = plain.to_json()
    assert record["rank_by"] is None and record["tune_steps"] is None and record["int8_file"] is None
    steps = searched.to_json()["tune_steps"]
    assert steps[1] == {
        "k": 1,
        "tune_map50_95": 48.0,
        "tune_drop": 2.75,
        "int8_ms": 4.75,
        "float_gmacs": 0.5,
        "reverted": "model.3.conv",
    }
    assert steps[0]["reverted"] is None and steps[0]["float_gmacs"] is None


def test_results_json_reads_back_as_written(tmp_path: Path) -> None:
    """write_results rounds (mAP to 2 decimals) and fills in the protocol; read_results gives those rows back."""
    rows = [searched_row(), ptq_row(int8_map50_95=49.123456, protocol=None)]
    json_path, _ = write_results(rows, tmp_path, "the protocol")
    back = read_results(json_path)
    assert back[0] == rows[0]  # its figures are already round
    assert back[1] == replace(rows[1], int8_map50_95=49.12, protocol="the protocol")
