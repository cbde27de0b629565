"""Readers of exported INT8 files that only the tests need: which convs carry Q/DQ pairs and with which scales, how
a QDQ file's outputs compare with its torch model, and what makes an OpenVINO IR INT8; and a results.json row made
without running a model."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from qarep_det.evaluation.results import PTQRow


@dataclass(frozen=True)
class QDQPair:
    """One exported quantizer: scale(s), zero point(s) and axis (None = per-tensor)."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None


def qdq_convs(path: str | Path) -> dict[str, tuple[QDQPair | None, QDQPair | None]]:
    """The ``(input, weight)`` quantizers of every Conv in a QDQ file, keyed by torch module name (``model.0.conv``).

    Convs are named through their weight initializer (``model.<module>.weight``, ``model.`` being the export
    wrapper), since TorchScript's node scopes do not spell module paths unambiguously. A file of onnxruntime's
    quantizer stores weights quantized (``<weight>_quantized`` feeding the DQ, no Q): read the same way.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    values |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    producer = {out: n for n in graph.node for out in n.output}

    def quantizer(tensor: str) -> tuple[QDQPair | None, str]:
        """The Q/DQ pair feeding ``tensor`` (or None) and the tensor it quantizes."""
        dq = producer.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None, tensor
        q = producer.get(dq.input[0])  # None: a stored quantized weight
        scale, zero_point = values[dq.input[1]], values[dq.input[2]]
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) if scale.size > 1 else None
        return QDQPair(scale, zero_point, axis), dq.input[0].removesuffix("_quantized") if q is None else q.input[0]

    convs = {}
    for node in graph.node:
        if node.op_type == "Conv":
            weight_pair, weight_name = quantizer(node.input[1])
            input_pair, _ = quantizer(node.input[0])
            convs[weight_name.removeprefix("model.").removesuffix(".weight")] = (input_pair, weight_pair)
    return convs


@dataclass(frozen=True)
class QDQCheck:
    """How an exported QDQ file compares with the torch model it came from."""

    quantize_nodes: int
    dequantize_nodes: int
    max_abs_diff: float
    output_sqnr_db: float


def check_qdq_onnx(path: str | Path, qmodel, images) -> QDQCheck:
    """Count Q/DQ nodes and run the file on onnxruntime (CPU) against the torch fake-quant model on ``images``."""
    import onnx
    import torch

    from qarep_det.quant.backends.onnx_qdq import onnx_runner
    from qarep_det.quant.runner import DecodedOutput
    from qarep_det.sensitivity.diagnostics import sqnr_db

    nodes = [n.op_type for n in onnx.load(str(path)).graph.node]
    with torch.no_grad():
        reference = DecodedOutput(qmodel).eval()(images.to(next(qmodel.parameters()).device)).float().cpu()
    output = onnx_runner(path)(images)
    return QDQCheck(
        quantize_nodes=nodes.count("QuantizeLinear"),
        dequantize_nodes=nodes.count("DequantizeLinear"),
        max_abs_diff=float((output - reference).abs().max()),
        output_sqnr_db=sqnr_db(reference, output),
    )


def int8_summary(ov_model) -> dict[str, int]:
    """What makes an IR INT8: FakeQuantize ops (activations), int8 weight constants, and the largest |int8 weight|
    (``weight_levels``: 127 for 8-bit weights, 64 when NNCF's overflow fix halved them)."""
    ops = ov_model.get_ordered_ops()
    int8_weights = [o for o in ops if o.get_type_name() == "Constant" and o.get_element_type().get_type_name() == "i8"]
    return {
        "fake_quantize": sum(op.get_type_name() == "FakeQuantize" for op in ops),
        "int8_weights": len(int8_weights),
        "weight_levels": max((int(np.abs(op.get_data().astype(np.int32)).max()) for op in int8_weights), default=0),
        "convolutions": sum(op.get_type_name() in ("Convolution", "GroupConvolution") for op in ops),
    }


PLANT = ("model.2.0", "model.2.1")  # producer -> consumer inside yolo_qarep_n's first stage (fused, ReLU between)


@dataclass(frozen=True)
class KnownAnswer:
    """A dataset labelled by a detector itself, that detector as a fused checkpoint (and unfused, as training leaves
    it), and its twin with an FP32-exact planted outlier: on it FP32 scores well by construction, and which INT8 score
    must collapse is known."""

    data: Path
    clean: Path
    unfused: Path
    planted: Path
    consumer: str  # the planted conv (module path in the fused model)
    imgsz: int


def known_answer_detector(root: Path, imgsz: int = 96, n_train: int = 24, n_val: int = 8) -> KnownAnswer:
    """Build :class:`KnownAnswer` under ``root``.

    An untrained detector's scores barely differ (Ultralytics initialises the class bias to about -10) and its boxes
    are ~120 px, so its Detect outputs are rescaled first: class logits x10 around 0, box bins peaked at small
    distances. Its top 3 detections per image then become that image's YOLO labels (train and val), so FP32 mAP is
    high (63 on the val split at 96 px, measured), the clean model's INT8 stays close, and the planted consumer's
    INT8 collapses it (to about 1).
    """
    import json

    import torch
    from PIL import Image
    from ultralytics.data.utils import img2label_paths
    from ultralytics.nn.tasks import DetectionModel

    from qarep_det.data.images import list_images
    from qarep_det.data.synthetic import make_dataset
    from qarep_det.evaluation.predict import predict_to_json
    from qarep_det.quant.calibration import calibration_set
    from qarep_det.quant.runner import torch_runner
    from qarep_det.reparam import reparameterize_model
    from qarep_det.sensitivity.planted import plant_outlier
    from qarep_det.ultralytics.checkpoint import save_detector

    data = make_dataset(root / "data", n_train=n_train, n_val=n_val, imgsz=imgsz, seed=3)
    torch.manual_seed(0)
    model = DetectionModel("yolo_qarep_n.yaml", nc=6, verbose=False)
    head = model.model[-1]
    with torch.no_grad():
        for branch in head.cv3:
            branch[-1].weight.mul_(10.0)
            branch[-1].bias.zero_()
        for branch in head.cv2:
            branch[-1].weight.mul_(0.3)
            branch[-1].bias.copy_((-0.5 * torch.arange(head.reg_max, dtype=torch.float32)).repeat(4))
    unfused = root / "unfused.pt"
    torch.save({"model": model, "train_args": {}}, unfused)
    fused = reparameterize_model(model)
    images = list_images(root / "data" / "images")
    ids = {path: i for i, path in enumerate(images)}
    predictions = root / "self_labels.json"
    predict_to_json(torch_runner(fused), images, imgsz, predictions, image_id_fn=ids.__getitem__,
                    category_id_fn=int, max_det=3, multi_label=False, progress=False)  # fmt: skip
    by_image: dict[int, list[dict]] = {}
    for det in json.loads(predictions.read_text()):
        by_image.setdefault(det["image_id"], []).append(det)
    for path, label in zip(images, img2label_paths([str(p) for p in images]), strict=True):
        with Image.open(path) as im:
            w, h = im.size
        rows = [
            f"{d['category_id']} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}"
            for d in by_image.get(ids[path], [])
            for x, y, bw, bh in [d["bbox"]]
        ]
        Path(label).write_text("\n".join(rows) + "\n")
    calib = torch.cat(list(calibration_set(data, imgsz, n=8, batch_size=8, progress=False)))
    clean = save_detector(fused, root / "clean.pt", calib)
    planted, info = plant_outlier(fused, *PLANT, calib)
    return KnownAnswer(data, clean, unfused, save_detector(planted, root / "planted.pt", calib), info.consumer, imgsz)


def ptq_row(**fields: Any) -> PTQRow:
    """A results.json row of a plain torch PTQ run with made-up figures, ``fields`` replacing them."""
    return replace(
        PTQRow(
            model="m",
            params=1000,
            backend="torch",
            calib_method="max",
            method="ptq",
            ranges="calibrated",
            calib_images=8,
            fp32_map50_95=50.0,
            int8_map50_95=49.0,
            drop=1.0,
            fp32_map50=70.0,
            int8_map50=69.0,
            fp32_ms=2.0,
            int8_ms=3.0,
            quantize_head=True,
            float_layers=(),
            quantize_s=1.5,
            weights="m.pt",
        ),
        **fields,
    )
