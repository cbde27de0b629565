"""One row of ptq_eval's ``results.json``: one model on one backend, typed, and its JSON form.

The row is written to JSON in one place (:meth:`PTQRow.to_json`) and read back in one (:meth:`PTQRow.from_json`),
so the tables, the plots, the ladder study and the benchmarks read fields rather than string keys. The JSON object
is flat: the groups a row may carry (:class:`Ranking` with ``keep_float`` or ``max_drop``, :class:`Search` with
``max_drop``) are written beside the other fields, and every field is always written, null where it does not apply,
so every row of every run has one schema (docs/results-json.md, which a test checks against :func:`json_fields`).
Torch-free, like the tables that read it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Ranking:
    """How the convs kept float were chosen from: the rank step (``keep_float`` or ``max_drop``)."""

    calibrate_s: float  # the one calibration of the simulated model the ranking ran on
    rank_images: int  # the first images of the calibration draw the convs were ranked on
    rank_by: str  # the ranking (sensitivity/rankings.py)
    rank_s: float
    rank_half_range: bool  # ranked on NNCF's half-range weight grid (OpenVINO with the overflow fix)
    float_cost: str  # the order the convs were kept float in: latency (harm per MAC) or count (harm alone)
    float_gmacs: float  # multiply-accumulates (G) of the convs kept float, at the evaluation size
    float_mac_share: float  # their share of all quantizable convs' MACs


@dataclass(frozen=True, kw_only=True)
class TuneStep:
    """One tuning evaluation of ``max_drop``'s search, in evaluation order (values rounded to 2 decimals)."""

    k: int  # convs kept float
    tune_map50_95: float
    tune_drop: float
    int8_ms: float  # the candidate's median ms per image on the tuning batches
    float_gmacs: float | None = None  # the candidate's float convs' multiply-accumulates (G); None: not counted
    reverted: str | None = None  # a refinement step: the one conv reverted alone (out of the bisection's order)


@dataclass(frozen=True, kw_only=True)
class Search:
    """``max_drop``'s search on one backend: its target, what it chose, and every step on the tuning set."""

    max_drop: float
    refine: int
    tune_drop: float  # of the candidate kept
    tune_drop_se: float | None  # the tuning drop's standard error; None: not estimated
    tune_images_needed: int | None  # None: the tuning images resolve max_drop (or none would: max_drop 0)
    tune_evals: int  # tuning evaluations, the FP32 one included
    shortfall: float  # 0 when the tuning drop met max_drop, else how far above it the kept candidate is
    fp32_tune_map50_95: float
    int8_tune_map50_95: float
    tune_steps: tuple[TuneStep, ...]
    tune_images: int
    tune_split: str
    search_s: float  # the search on this backend, the FP32 tuning evaluation included


_GROUPS: dict[str, type] = {"rank": Ranking, "search": Search}
"""The fields of :class:`PTQRow` that hold a group, written flat (its fields beside the row's)."""


@dataclass(frozen=True, kw_only=True)
class PTQRow:
    """One model's FP32 and INT8 evaluation on one backend (mAP in percent, latency in ms per image)."""

    model: str
    params: int  # of the fused FP32 model (a QAT checkpoint without one: its student)
    backend: str
    calib_method: str
    method: str  # ptq: calibrated here; qat: a QAT checkpoint's student; qat (ultralytics): Ultralytics' quantize=8
    ranges: str  # calibrated (ptq), or the QAT run's: frozen or learned
    calib_images: int | None  # None: Ultralytics' QAT, which calibrated on its own batches
    fp32_map50_95: float | None  # None: a QAT checkpoint whose FP32 model is unknown
    int8_map50_95: float
    drop: float | None  # FP32 - INT8 mAP50-95, None with the FP32 score
    fp32_map50: float | None
    int8_map50: float
    fp32_ms: float | None  # the backend's own FP32 model where it has one, else the torch FP32 model's
    int8_ms: float
    quantize_head: bool
    float_layers: tuple[str, ...]  # the convs kept float
    quantize_s: float
    weights: str  # the checkpoint
    protocol: str | None = None  # the evaluation protocol in words (EvalProtocol.describe)
    rank: Ranking | None = None
    search: Search | None = None
    int8_file: str | None = None  # the saved INT8 artefact (torch and onnxruntime: one QDQ ONNX); None: not saved
    fp32_file: str | None = None  # the backend's saved FP32 twin (OpenVINO IR, the FP32 ONNX); None: not saved
    fp32_mb: float | None = None  # the backend's saved FP32 file(s) (OpenVINO IR, onnxruntime-int8's ONNX)
    int8_mb: float | None = None  # the backend's saved INT8 file(s)
    integer_convs: int | None = None  # onnxruntime-int8: convs that run as integer QLinearConv
    fp32_backend_map50_95: float | None = None  # the backend's own FP32 model's score, where it runs one

    def to_json(self) -> dict[str, Any]:
        """The row as results.json holds it: flat, every field present (null where it does not apply)."""
        record: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _GROUPS:
                names = [g.name for g in fields(_GROUPS[f.name])]
                record |= {name: _plain(None if value is None else getattr(value, name)) for name in names}
            else:
                record[f.name] = _plain(value)
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> PTQRow:
        """The row a results.json object holds (a field this version added and an older file lacks: None); a group
        is present when any of its fields is not null."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in _GROUPS:
                group = _GROUPS[f.name]
                names = [g.name for g in fields(group)]
                present = any(record.get(name) is not None for name in names)
                values[f.name] = group(**{name: _typed(name, record.get(name)) for name in names}) if present else None
            elif f.name in record:
                values[f.name] = _typed(f.name, record[f.name])
        return cls(**values)


def json_fields() -> list[str]:
    """The keys of a results.json row, in the order they are written (docs/results-json.md lists them)."""
    names = []
    for f in fields(PTQRow):
        names += [g.name for g in fields(_GROUPS[f.name])] if f.name in _GROUPS else [f.name]
    return names


def _plain(value: Any) -> Any:
    """A field's JSON value: tuples as lists, a tuning step as its object."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, TuneStep):
        return {f.name: getattr(value, f.name) for f in fields(value)}
    return value


def _typed(name: str, value: Any) -> Any:
    """A JSON value as its field holds it (the inverse of :func:`_plain`)."""
    if name == "float_layers":
        return tuple(value)
    if name == "tune_steps" and value is not None:
        return tuple(TuneStep(**step) for step in value)
    return value
