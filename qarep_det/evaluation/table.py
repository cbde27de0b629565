"""FP32 vs INT8 result tables: console text, Markdown, and results.json / results.md in a run folder.

Pure formatting (no torch), so tools and docs can rebuild tables from a results.json alone. All outputs go through
one rounding step, so the console, the Markdown and the json always show the same numbers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qarep_det.evaluation.protocol import EvalProtocol

# (row key, column header); rows may carry extra keys, shown after these in order of first appearance
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
# --max-drop rows add these to the console table (results.md shows every key anyway)
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


def normalize_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rounded copies of ``rows``; ``drop`` (FP32 - INT8 mAP50-95) is filled in where missing and computable."""
    out = []
    for row in rows:
        row = dict(row)
        fp32, int8 = row.get("fp32_map50_95"), row.get("int8_map50_95")
        if row.get("drop") is None and fp32 is not None and int8 is not None:
            row["drop"] = fp32 - int8
        out.append({k: _rounded(k, v) for k, v in row.items()})
    return out


def _columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """The standard columns, then extra keys (header = key)."""
    known = {k for k, _ in COLUMNS} | {PROTOCOL_KEY}
    extra = dict.fromkeys(k for row in rows for k in row if k not in known)
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


def _footnotes(rows: Sequence[dict[str, Any]], protocol: EvalProtocol | str | None) -> list[str]:
    """Protocol lines, each once: the argument's, then any rows carry."""
    lines = [protocol.describe() if isinstance(protocol, EvalProtocol) else protocol]
    lines += [row.get(PROTOCOL_KEY) for row in rows]
    return [f"protocol: {line}" for line in dict.fromkeys(x for x in lines if x)]


def format_console(rows: Sequence[dict[str, Any]], protocol: EvalProtocol | str | None = None) -> str:
    """Fixed-width text table of the standard columns (and --max-drop's, when a row has them), numbers
    right-aligned; other extra keys (paths, sizes, timings) would make it too wide for a terminal, so they are left
    to results.json and results.md."""
    rows = normalize_rows(rows)
    columns = [*COLUMNS, *(c for c in MAX_DROP_COLUMNS if any(c[0] in row for row in rows))]
    cells = [[_cell(k, row.get(k)) for k, _ in columns] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, (_, h) in enumerate(columns)]
    numeric = [all(isinstance(row.get(k), (int, float)) or row.get(k) is None for row in rows) for k, _ in columns]

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


def format_markdown(rows: Sequence[dict[str, Any]], protocol: EvalProtocol | str | None = None) -> str:
    """GitHub Markdown table, protocol as a note below it."""
    rows = normalize_rows(rows)
    columns = _columns(rows)
    numeric = [all(isinstance(row.get(k), (int, float)) or row.get(k) is None for row in rows) for k, _ in columns]
    cells = [[_cell(k, row.get(k)) for k, _ in columns] for row in rows]
    out = markdown_table([h for _, h in columns], cells, numeric)
    notes = _footnotes(rows, protocol)
    return "\n".join(out + ([""] + notes if notes else [])) + "\n"


def write_results(
    rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike, protocol: EvalProtocol | str | None = None
) -> tuple[Path, Path]:
    """Write ``results.json`` (a list of rounded row objects) and ``results.md`` into ``out_dir``.

    A ``protocol`` given here is stored in every json row that has none, so each row stays self-describing.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    described = protocol.describe() if isinstance(protocol, EvalProtocol) else protocol
    records = [{**row, PROTOCOL_KEY: row.get(PROTOCOL_KEY) or described} if described else row for row in rows]
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(normalize_rows(records), indent=2) + "\n", encoding="utf-8")
    md_path.write_text(format_markdown(records), encoding="utf-8")
    return json_path, md_path
