"""FP32 vs INT8 result tables: console text, Markdown, and results.json / results.md in a run folder.

Pure formatting (no torch), so tools and docs can rebuild tables from a results.json alone
(:meth:`~qarep_det.evaluation.results.PTQRow.from_json`). A row's cells are its JSON fields (one name for a column
everywhere); all outputs go through one rounding step, so the console, the Markdown and the json always show the
same numbers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from qarep_det.evaluation.protocol import EvalProtocol
from qarep_det.evaluation.results import PTQRow

# (row field, column header); results.md shows the other fields after these, those with a value in some row
COLUMNS: tuple[tuple[str, str], ...] = (
    ("model", "model"),
    ("params", "params"),
    ("backend", "backend"),
    ("method", "method"),  # ptq: calibrated here; qat: a QAT checkpoint's fine-tuned INT8 model
    ("ranges", "ranges"),  # calibrated (ptq), or the QAT run's: frozen (calibrated) or learned
    ("calib_method", "calib"),
    ("calib_images", "calib imgs"),
    ("float_layers", "float convs"),  # partial quantization: the list in results.json, its length in tables
    ("fp32_map50_95", "FP32 mAP50-95"),
    ("int8_map50_95", "INT8 mAP50-95"),
    ("drop", "drop"),
    ("fp32_map50", "FP32 mAP50"),
    ("int8_map50", "INT8 mAP50"),
    ("fp32_ms", "FP32 ms"),
    ("int8_ms", "INT8 ms"),
)
# --max-drop rows add these to the console table (results.md shows every field with a value anyway)
MAX_DROP_COLUMNS: tuple[tuple[str, str], ...] = (
    ("max_drop", "max drop"),
    ("tune_drop", "tune drop"),
    ("shortfall", "short by"),  # 0 when the tuning drop met max drop; else how far above it the kept K is
    ("tune_evals", "tune evals"),
)
TWO_DECIMALS = {
    "fp32_map50_95",
    "int8_map50_95",
    "drop",
    "fp32_map50",
    "int8_map50",
    "fp32_ms",
    "int8_ms",
    "tune_drop",
    "shortfall",
    "fp32_tune_map50_95",
    "int8_tune_map50_95",
}
PROTOCOL_KEY = "protocol"  # a row's protocol is a footnote, not a column: it is one long line


def _rounded(key: str, value: Any) -> Any:
    """mAP (percent), drop and ms to 2 decimals, other floats to 4 significant digits; NaN becomes None (json)."""
    if not isinstance(value, float):
        return value
    if math.isnan(value):
        return None
    return round(value, 2) if key in TWO_DECIMALS else float(f"{value:.4g}")


def normalize_rows(rows: Sequence[PTQRow]) -> list[dict[str, Any]]:
    """The JSON records of ``rows``, rounded."""
    return [{k: _rounded(k, v) for k, v in row.to_json().items()} for row in rows]


def _columns(records: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """The standard columns, then every other field with a value in some row (header = field name)."""
    known = {k for k, _ in COLUMNS} | {PROTOCOL_KEY}
    extra = dict.fromkeys(k for row in records for k, v in row.items() if k not in known and v is not None)
    return [*COLUMNS, *((k, k) for k in extra)]


def _cell(key: str, value: Any) -> str:
    """Display text of one value: '-' for missing, parameter counts in millions, lists by their length."""
    if value is None:
        return "-"
    if isinstance(value, list):
        return str(len(value))
    if key == "params" and isinstance(value, int):
        return f"{value / 1e6:.2f}M"
    if isinstance(value, float):
        return f"{value:.2f}" if key in TWO_DECIMALS else f"{value:g}"
    return str(value)


def _footnotes(rows: Sequence[PTQRow], protocol: EvalProtocol | str | None) -> list[str]:
    """Protocol lines, each once: the argument's, then any rows carry."""
    lines = [protocol.describe() if isinstance(protocol, EvalProtocol) else protocol]
    lines += [row.protocol for row in rows]
    return [f"protocol: {line}" for line in dict.fromkeys(x for x in lines if x)]


def _numeric(records: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> list[bool]:
    """Per column, whether every value is a number or missing (right-aligned)."""
    return [all(isinstance(row[k], (int, float)) or row[k] is None for row in records) for k, _ in columns]


def format_console(rows: Sequence[PTQRow], protocol: EvalProtocol | str | None = None) -> str:
    """Fixed-width text table of the standard columns (and --max-drop's, when a row searched), numbers
    right-aligned; the other fields (paths, sizes, timings) would make it too wide for a terminal, so they are left
    to results.json and results.md."""
    records = normalize_rows(rows)
    columns = [*COLUMNS, *(MAX_DROP_COLUMNS if any(row.search is not None for row in rows) else ())]
    cells = [[_cell(k, row[k]) for k, _ in columns] for row in records]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, (_, h) in enumerate(columns)]
    numeric = _numeric(records, columns)

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    out = [line([h for _, h in columns]), "  ".join("-" * w for w in widths), *(line(r) for r in cells)]
    return "\n".join(out + _footnotes(rows, protocol)) + "\n"


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], right_aligned: Sequence[bool] | None = None
) -> list[str]:
    """The lines of a GitHub Markdown table; ``right_aligned`` marks numeric columns (default: none)."""
    right_aligned = right_aligned or [False] * len(header)
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if right else "---" for right in right_aligned) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def format_markdown(rows: Sequence[PTQRow], protocol: EvalProtocol | str | None = None) -> str:
    """GitHub Markdown table, protocol as a note below it."""
    records = normalize_rows(rows)
    columns = _columns(records)
    cells = [[_cell(k, row[k]) for k, _ in columns] for row in records]
    out = markdown_table([h for _, h in columns], cells, _numeric(records, columns))
    notes = _footnotes(rows, protocol)
    return "\n".join(out + ([""] + notes if notes else [])) + "\n"


def write_results(
    rows: Sequence[PTQRow], out_dir: str | os.PathLike, protocol: EvalProtocol | str | None = None
) -> tuple[Path, Path]:
    """Write ``results.json`` (a list of rounded row objects: docs/results-json.md) and ``results.md`` into
    ``out_dir``.

    A ``protocol`` given here is stored in every json row that has none, so each row stays self-describing.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    described = protocol.describe() if isinstance(protocol, EvalProtocol) else protocol
    rows = [replace(row, protocol=row.protocol or described) for row in rows]
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(normalize_rows(rows), indent=2) + "\n", encoding="utf-8")
    md_path.write_text(format_markdown(rows), encoding="utf-8")
    return json_path, md_path


def read_results(path: str | os.PathLike) -> list[PTQRow]:
    """The rows of a ``results.json`` (as written: rounded)."""
    return [PTQRow.from_json(record) for record in json.loads(Path(path).read_text(encoding="utf-8"))]
