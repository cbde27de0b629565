"""The INT8 backends of ptq_eval, each owning its quantize step and its runner.

A :class:`Job` is what they all quantize for one checkpoint: the fused FP32 model, the calibration set and a recipe.
It makes each artefact once, on first use, so backends share them: the torch and onnxruntime backends one
calibration and one QDQ ONNX file; both onnxruntime backends one FP32 ONNX; every OpenVINO model of a checkpoint one
FP32 IR. A QAT checkpoint's student replaces the calibration: every backend but onnxruntime-int8 (which calibrates
its own ranges) runs the student (OpenVINO from its QDQ ONNX, learned scales kept, since NNCF would calibrate anew).

Each backend gives the row's INT8 runner (with its artefacts saved and the backend's own FP32 runner, for a
like-for-like latency) and a search candidate (nothing saved).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import nn

from qarep_det.quant.calibration import CalibrationSet
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.quant.runner import Runner, torch_runner


def file_size_mb(*paths: Path) -> float:
    """Total size of files in MB (an OpenVINO IR is an .xml plus a .bin)."""
    return sum(p.stat().st_size for p in paths) / 1e6


@dataclass(kw_only=True)
class Job:
    """What every backend quantizes, for one checkpoint and one set of float convs."""

    fused: nn.Module | None  # on the CPU; None: a QAT checkpoint's FP32 model is unknown (no FP32 latency, no FP32 IR)
    calib: CalibrationSet
    recipe: QuantRecipe
    imgsz: int
    device: str  # of the simulated (torch) model; the other backends run on the CPU
    stem: Path  # artefacts are written as <stem>_<suffix>
    save: bool  # whether the row's artefacts are kept (else stem is in a scratch folder)
    overwrite: bool  # replace artefacts an earlier run left
    student: nn.Module | None = None  # a QAT checkpoint's INT8 model: the simulated model, nothing is calibrated
    calibrated: nn.Module | None = None  # the simulated model calibrated once with every conv quantized
    shared: dict[Any, Any] = field(default_factory=dict)  # what the jobs of one checkpoint share (FP32 IR, NNCF IRs)
    overflow_fix: bool | None = None  # OpenVINO: NNCF's overflow fix (7-bit weights); None: on if this CPU lacks VNNI
    asymmetric_activations: bool = False  # OpenVINO: NNCF's preset MIXED grid, not TensorRT's signed one

    def with_recipe(self, recipe: QuantRecipe, stem: Path | None = None) -> Job:
        """This job for another set of float convs, sharing its calibration, FP32 IR and OpenVINO models."""
        return replace(self, recipe=recipe, stem=stem or self.stem)

    def path(self, suffix: str) -> Path:
        return self.stem.with_name(f"{self.stem.name}_{suffix}")

    def onnx(self, model: nn.Module, suffix: str) -> Path:
        """``model`` exported the way TensorRT gets it (QDQ for a fake-quantized model, plain for a float one)."""
        from qarep_det.quant.backends.onnx_qdq import export_qdq_onnx

        return export_qdq_onnx(model, self.path(suffix), self.imgsz, overwrite=self.overwrite)

    @cached_property
    def simulated(self) -> nn.Module:
        """The fake-quantized model: the student, the calibrated model with this job's convs switched float, or
        (nothing ranked) the fused model calibrated with the recipe."""
        if self.student is not None:
            return self.student.to(self.device).eval()
        from qarep_det.quant.backends import simulated

        if self.calibrated is not None:
            return simulated.with_float_layers(self.calibrated, self.recipe)
        return simulated.quantize_torch(self.fused, self.calib, self.recipe, self.device)

    @cached_property
    def qdq_onnx(self) -> Path:
        return self.onnx(self.simulated, "int8_qdq.onnx")

    @property
    def fp32_onnx(self) -> Path:
        """The fused model as plain ONNX, exported once per checkpoint (the onnxruntime backends' FP32 model and the
        file onnxruntime's own quantizer starts from)."""
        if "fp32_onnx" not in self.shared:
            self.shared["fp32_onnx"] = self.onnx(self.fused, "fp32.onnx")
        return self.shared["fp32_onnx"]

    @property
    def fp32_ir(self):
        """The fused model as an FP32 OpenVINO IR, converted once per checkpoint."""
        from qarep_det.quant.backends.openvino import convert_openvino

        if "fp32_ir" not in self.shared:
            self.shared["fp32_ir"] = convert_openvino(self.fused, self.imgsz)
        return self.shared["fp32_ir"]

    @property
    def openvino_int8(self):
        """The NNCF INT8 IR for this job's float convs, made once per float set (a search's candidate is the row's
        model when it is chosen); a QAT student's QDQ ONNX converted, its learned scales kept."""
        from qarep_det.quant.backends.openvino import convert_qdq_onnx, quantize_openvino

        if self.student is not None:
            return convert_qdq_onnx(self.qdq_onnx)
        key = ("openvino", self.recipe.float_layers)
        if key not in self.shared:
            self.shared[key] = quantize_openvino(
                self.fused,
                self.calib,
                self.imgsz,
                self.recipe,
                asymmetric_activations=self.asymmetric_activations,
                overflow_fix=self.overflow_fix,
                fp32=self.fp32_ir,
            )
        return self.shared[key]


@dataclass(frozen=True)
class Quantized:
    """A row's INT8 model on one backend: its runner, the backend's own FP32 runner if it has one (like-for-like
    latency), and what the backend's row reports of it (files saved, their sizes, integer convs)."""

    runner: Runner
    fp32_runner: Runner | None = None
    int8_file: Path | None = None  # the INT8 artefact, when the job saves it
    fp32_file: Path | None = None  # the backend's own FP32 twin of it, when saved (benchmark int8 times the pair)
    int8_mb: float | None = None
    fp32_mb: float | None = None
    integer_convs: int | None = None  # convs that run as integer kernels, where the backend counts them


class Backend:
    """One INT8 backend: :meth:`quantize` for a row, :meth:`candidate` for a search step."""

    runs_qat = True  # whether it can score a QAT checkpoint (its student), not only calibrate an FP32 model

    def check_recipe(self, recipe: QuantRecipe) -> None:
        """``ValueError`` for a recipe this backend cannot follow, raised before any model runs."""

    def quantize(self, job: Job) -> Quantized:
        raise NotImplementedError

    def candidate(self, job: Job, scratch: Path) -> Runner:
        """The job's INT8 runner with nothing saved (files it needs go to ``scratch``)."""
        raise NotImplementedError

    def half_range(self, overflow_fix: bool | None) -> bool:
        """Whether this backend rounds weights to NNCF's half-range grid (a ranking for it must see that grid's
        errors: :func:`qarep_det.quant.backends.simulated.half_range_weights`); the reference grid otherwise."""
        return False


class TorchBackend(Backend):
    """Simulated INT8 (ModelOpt fake quant) on the chosen device; saved as QDQ ONNX for TensorRT."""

    def quantize(self, job: Job) -> Quantized:
        int8_file = job.qdq_onnx if job.save else None  # exported before the runner takes the device
        return Quantized(torch_runner(job.simulated, job.device), int8_file=int8_file)

    def candidate(self, job: Job, scratch: Path) -> Runner:
        return torch_runner(job.simulated, job.device)


class OnnxRuntimeBackend(Backend):
    """The torch backend's QDQ ONNX (the TensorRT hand-off) on onnxruntime's CPU provider, beside the fused FP32
    model exported the same way: proves the file computes what the simulation computed.

    onnxruntime fuses Q/DQ into integer kernels only around a conv whose output is quantized too; TensorRT's scheme
    quantizes conv inputs alone, so every conv runs in float on dequantized INT8 values (exactly the simulated
    arithmetic), and the INT8 latency is not an integer-kernel latency.
    """

    def quantize(self, job: Job) -> Quantized:
        from qarep_det.quant.backends.onnx_qdq import onnx_runner

        fp32_runner = None if job.fused is None else onnx_runner(job.fp32_onnx)
        saved_fp32 = job.fp32_onnx if job.save and job.fused is not None else None
        return Quantized(
            onnx_runner(job.qdq_onnx), fp32_runner, int8_file=job.qdq_onnx if job.save else None, fp32_file=saved_fp32
        )

    def candidate(self, job: Job, scratch: Path) -> Runner:
        from qarep_det.quant.backends.onnx_qdq import export_qdq_onnx, onnx_runner

        return onnx_runner(export_qdq_onnx(job.simulated, scratch / "candidate_qdq.onnx", job.imgsz, overwrite=True))


class OpenVINOBackend(Backend):
    """Real INT8 on the CPU: the NNCF-quantized OpenVINO IR (a QAT student: its QDQ ONNX converted), the FP32 IR's
    latency and both IRs' file sizes beside it."""

    def quantize(self, job: Job) -> Quantized:
        from qarep_det.quant.backends.openvino import openvino_runner, save_openvino

        int8 = job.openvino_int8
        fp32 = None if job.fused is None else job.fp32_ir
        int8_xml = int8_mb = fp32_xml = fp32_mb = None
        if job.save:
            if fp32 is not None:
                fp32_xml = save_openvino(fp32, job.path("fp32.xml"), overwrite=job.overwrite)
                fp32_mb = file_size_mb(fp32_xml, fp32_xml.with_suffix(".bin"))
            int8_xml = save_openvino(int8, job.path("int8.xml"), overwrite=job.overwrite)
            int8_mb = file_size_mb(int8_xml, int8_xml.with_suffix(".bin"))
        fp32_runner = None if fp32 is None else openvino_runner(fp32)
        return Quantized(
            openvino_runner(int8), fp32_runner, int8_file=int8_xml, int8_mb=int8_mb, fp32_file=fp32_xml, fp32_mb=fp32_mb
        )

    def candidate(self, job: Job, scratch: Path) -> Runner:
        from qarep_det.quant.backends.openvino import openvino_runner

        return openvino_runner(job.openvino_int8)

    def half_range(self, overflow_fix: bool | None) -> bool:
        from qarep_det.quant.backends.openvino import overflow_fix_on

        return overflow_fix_on(overflow_fix)


class OnnxRuntimeInt8Backend(Backend):
    """Real INT8 on onnxruntime's CPU provider: the FP32 ONNX quantized by onnxruntime's own ``quantize_static``
    (uint8 activations at conv inputs and outputs, int8 per-channel weights, MinMax ranges), so every quantized conv
    runs as an integer ``QLinearConv`` (:mod:`~qarep_det.quant.backends.onnx_int8`: the scheme and where it differs
    from the reference), beside the FP32 ONNX. It calibrates its own ranges on the FP32 model, so a QAT student (learned
    ranges at conv inputs only) has no file here. Weights are 7-bit (``reduce_range``) where the overflow fix is on:
    a CPU without VNNI, unless told (the same decision as OpenVINO's). A search recalibrates every candidate."""

    runs_qat = False

    def check_recipe(self, recipe: QuantRecipe) -> None:
        from qarep_det.quant.backends.onnx_int8 import check_recipe

        check_recipe(recipe)

    def _quantize(self, job: Job, path: Path, overwrite: bool) -> Path:
        from qarep_det.quant.backends.onnx_int8 import quantize_onnxruntime
        from qarep_det.quant.backends.openvino import overflow_fix_on

        return quantize_onnxruntime(
            job.fused,
            job.fp32_onnx,
            job.calib,
            path,
            job.recipe,
            reduce_range=overflow_fix_on(job.overflow_fix),
            overwrite=overwrite,
        )

    def quantize(self, job: Job) -> Quantized:
        from qarep_det.quant.backends.onnx_int8 import integer_convs
        from qarep_det.quant.backends.onnx_qdq import onnx_runner

        int8 = self._quantize(job, job.path("int8_ort.onnx"), job.overwrite)
        quantized = Quantized(onnx_runner(int8), onnx_runner(job.fp32_onnx), integer_convs=integer_convs(int8))
        if job.save:
            return replace(
                quantized,
                int8_file=int8,
                int8_mb=file_size_mb(int8),
                fp32_mb=file_size_mb(job.fp32_onnx),
                fp32_file=job.fp32_onnx,
            )
        return quantized

    def candidate(self, job: Job, scratch: Path) -> Runner:
        from qarep_det.quant.backends.onnx_qdq import onnx_runner

        return onnx_runner(self._quantize(job, scratch / "candidate_int8_ort.onnx", overwrite=True))

    def half_range(self, overflow_fix: bool | None) -> bool:
        """With ``reduce_range`` the weights sit on a 7-bit grid (step ``max/64``) half a code from NNCF's
        half-range grid (step ``max/63.5``): the ranking sees that grid then, the reference grid otherwise."""
        from qarep_det.quant.backends.openvino import overflow_fix_on

        return overflow_fix_on(overflow_fix)


BACKENDS: dict[str, Backend] = {
    "torch": TorchBackend(),
    "openvino": OpenVINOBackend(),
    "onnxruntime": OnnxRuntimeBackend(),
    "onnxruntime-int8": OnnxRuntimeInt8Backend(),
}
