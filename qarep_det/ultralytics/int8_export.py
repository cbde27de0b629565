"""An INT8 model of ours written as Ultralytics' own exporter writes its format, so Ultralytics loads it.

The model is a backend's artefact (:mod:`qarep_det.quant.backends`): the exact model ptq_eval scores on that backend.
What Ultralytics needs beside it (its ``metadata.yaml`` or ONNX metadata: names, stride, image size, batch, task,
its export arguments) comes from Ultralytics' exporter itself, run on the same fused model with ``quantize=8`` and
stopped where it would convert (:func:`export_contract`): by then it has checked its arguments, traced a dry run
and made that metadata. Its dry run also gives the input and output shapes its own export would have, which the INT8
model is checked against before anything is written.

:data:`INT8_WRITERS` maps a ptq_eval backend to its writer; another backend slots in as one more entry.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics.engine.exporter import Exporter
from ultralytics.utils import LOGGER, YAML

from qarep_det.errors import InputError
from qarep_det.logs import quiet
from qarep_det.quant.backends.base import Job


@dataclass(frozen=True)
class ExportContract:
    """What Ultralytics' exporter makes of a model before converting it: the metadata it writes beside the export,
    and the shapes of its dry run (input ``(1, 3, H, W)``, output ``(1, 4 + nc, anchors)``)."""

    metadata: dict[str, Any]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    stem: str  # what it names the files of an export: the checkpoint's stem


class _ContractExporter(Exporter):
    """Ultralytics' exporter that records :class:`ExportContract` where it would convert, and writes nothing (its
    ``__call__`` reports no export when the format's method returns no file)."""

    contract: ExportContract | None = None

    def _record(self, prefix: str = "") -> None:
        shapes = tuple(self.im.shape), tuple(self.output_shape)
        self.contract = ExportContract(dict(self.metadata), *shapes, self.file.stem)

    export_onnx = export_openvino = _record


def export_contract(model: nn.Module, fmt: str, imgsz: int, data: str | os.PathLike) -> ExportContract:
    """The metadata and shapes of Ultralytics' INT8 export of ``model`` as ``fmt`` (static batch 1, no NMS, as its
    default export), calibrated on ``data``; nothing is converted or written."""
    overrides = {
        "mode": "export",
        "format": fmt,
        "imgsz": imgsz,
        "batch": 1,
        "quantize": 8,
        "data": str(data),
        "dynamic": False,
        "nms": False,
        "device": "cpu",
        "verbose": False,
    }
    exporter = _ContractExporter(overrides=overrides)
    threads = torch.get_num_threads()
    try:
        with quiet(LOGGER):  # its export steps at INFO (input shape, the file it starts from): none is ours
            exporter(model)
    finally:  # its device selection sets torch's CPU threads, whose count changes a calibration's float sums
        torch.set_num_threads(threads)
    if exporter.contract is None:
        raise RuntimeError(f"Ultralytics' exporter did not reach its '{fmt}' step (its internals changed?)")
    return exporter.contract


def _check_io(what: str, input_shape: tuple, output_shape: tuple, contract: ExportContract) -> None:
    """Refuse an INT8 model whose input or output differs from what Ultralytics' own export would have
    (``None`` in a shape: a dynamic dimension, accepted for the batch only)."""
    got = (input_shape[1:], output_shape[1:], {input_shape[0], output_shape[0]} - {None})
    want = (contract.input_shape[1:], contract.output_shape[1:], {contract.input_shape[0]})
    if got[:2] != want[:2] or not got[2] <= want[2]:
        raise RuntimeError(
            f"{what} maps {input_shape} to {output_shape}; Ultralytics' export of the same model maps "
            f"{contract.input_shape} to {contract.output_shape}"
        )


def write_openvino(job: Job, contract: ExportContract, folder: Path) -> None:
    """The job's NNCF IR (ptq_eval's openvino model) as Ultralytics' ``*_openvino_model`` folder: ``<stem>.xml``,
    ``<stem>.bin`` (the checkpoint's stem) and ``metadata.yaml``. Its batch is fixed to Ultralytics' static batch of
    1 (ptq_eval's IR keeps it dynamic); nothing else changes."""
    from qarep_det.quant.backends.openvino import save_openvino

    ir = job.openvino_int8.clone()  # shared by the jobs of a checkpoint: never reshaped in place
    ir.reshape(list(contract.input_shape))
    _check_io("the OpenVINO INT8 model", tuple(ir.input(0).shape), tuple(ir.output(0).shape), contract)
    save_openvino(ir, folder / f"{contract.stem}.xml")
    YAML.save(folder / "metadata.yaml", contract.metadata)


def write_qdq_onnx(job: Job, contract: ExportContract, path: Path) -> None:
    """The job's QDQ ONNX (ptq_eval's torch and onnxruntime model, TensorRT's scheme) with Ultralytics' metadata in
    its ``metadata_props``, as Ultralytics' ONNX export stores it. Its input and output are declared with Ultralytics'
    static shapes (ptq_eval's file leaves the batch dynamic and the output undeclared): Ultralytics reads a dynamic
    output as a dynamic model and would feed it rectangular batches of other sizes."""
    import onnx

    from qarep_det.quant.backends.onnx_qdq import onnx_runner

    model = onnx.load(str(job.qdq_onnx))
    graph_input, graph_output = model.graph.input[0], model.graph.output[0]
    declared = tuple(d.dim_value or None for d in graph_input.type.tensor_type.shape.dim)
    output = onnx_runner(job.qdq_onnx)(torch.zeros(contract.input_shape))  # the file declares no output shape
    _check_io("the QDQ ONNX", declared, tuple(output.shape), contract)
    for value, shape in (graph_input, contract.input_shape), (graph_output, contract.output_shape):
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for size in shape:
            dims.add().dim_value = size
    for key, value in contract.metadata.items():
        model.metadata_props.add(key=key, value=str(value))
    onnx.checker.check_model(model, full_check=True)  # its shape inference must agree with the declared shapes
    onnx.save(model, str(path))


@dataclass(frozen=True)
class Int8Writer:
    """How one backend's INT8 model is written: in which Ultralytics format's layout, under which name."""

    format: str  # the Ultralytics export format whose layout and metadata it writes
    suffix: str  # appended to the checkpoint's stem: the file or folder written beside it
    write: Callable[[Job, ExportContract, Path], None]

    def path(self, weights: Path) -> Path:
        return weights.with_name(f"{weights.stem}{self.suffix}")


INT8_WRITERS: dict[str, Int8Writer] = {
    "openvino": Int8Writer("openvino", "_int8_openvino_model", write_openvino),
    "onnxruntime": Int8Writer("onnx", "_int8_qdq.onnx", write_qdq_onnx),
}
"""ptq_eval backend -> the writer of its INT8 model."""


def int8_writer(fmt: str, backend: str | None = None) -> tuple[str, Int8Writer]:
    """The backend and writer for an INT8 export as ``fmt``: ``backend`` if given (it must write ``fmt``), else the
    one backend that writes ``fmt``; one-line errors for a format or backend without an INT8 writer."""
    if backend is not None:
        if backend not in INT8_WRITERS:
            raise InputError(f"no INT8 export for backend '{backend}'; choose from {', '.join(INT8_WRITERS)}")
        if INT8_WRITERS[backend].format != fmt:
            raise InputError(f"backend '{backend}' is exported as {INT8_WRITERS[backend].format}, not {fmt}")
        return backend, INT8_WRITERS[backend]
    found = [name for name, writer in INT8_WRITERS.items() if writer.format == fmt]
    formats = sorted({writer.format for writer in INT8_WRITERS.values()})
    if not found:
        raise InputError(f"no INT8 export as '{fmt}'; choose from {', '.join(formats)}", field="format")
    if len(found) > 1:
        raise InputError(f"{fmt} is written by the backends {', '.join(found)}: choose one", field="backend")
    return found[0], INT8_WRITERS[found[0]]


@contextlib.contextmanager
def staged(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """A path to write ``target`` at, in a hidden folder beside it, moved to ``target`` when the block ends without
    an error (an existing ``target`` is replaced only with ``overwrite``, and only then); on an error nothing is left
    behind and ``target`` is untouched."""
    if target.exists() and not overwrite:
        raise FileExistsError(f"'{target}' exists; pass overwrite=True (--overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))  # same file system: renames
    try:
        yield stage / target.name
        old = stage / "replaced"
        if target.exists():
            target.rename(old)
        try:
            (stage / target.name).rename(target)
        except OSError:
            if old.exists():
                old.rename(target)
            raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
