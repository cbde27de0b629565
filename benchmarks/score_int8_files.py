"""Every model file ``qarep-det benchmark int8 --out DIR`` wrote, scored on another data YAML's val split: each INT8
file's drop from the FP32 file of its runtime, with its paired standard error.

  python benchmarks/score_int8_files.py --files DIR --data held_out_2048.yaml --imgsz 320 --out runs/score

``benchmark int8`` scores its files on the val split it calibrated beside (64 images in docs/int8.md), where two
INT8 files a tenth of a point apart are not resolved. A larger val split of the same distribution resolves them
(2048 images: a standard error of about 0.04 on a drop), without calibrating, exporting or timing anything again.
The scoring is ptq-eval's own (``evaluate_runner``: letterbox, NMS, pycocotools), at batch 8; the SE is the standard
error of the per-image AP50-95 differences (``per_image_map50_95``, ``Resolution.paired``). OpenVINO runs with the
environment's ``ONEDNN_MAX_CPU_ISA``, as the benchmark did. Writes ``scores.json`` and ``scores.md``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from qarep_det.evaluation.coco import load_ground_truth, per_image_map50_95
from qarep_det.evaluation.predict import evaluate_runner
from qarep_det.evaluation.protocol import EvalProtocol
from qarep_det.evaluation.table import markdown_table
from qarep_det.quant.backends.onnx_qdq import onnx_runner
from qarep_det.quant.backends.openvino import openvino_runner, read_openvino
from qarep_det.sensitivity.resolution import Resolution


def model_files(folder: Path) -> dict[str, Path]:
    """The benchmark's files by label: FP32 and INT8 IRs (ours, each grid's folder, the anchors'), FP32 and INT8
    ONNX (onnxruntime-int8, quantize_static); the TensorRT QDQ file is not a CPU model and is left out."""
    files = {}
    for xml in sorted(folder.rglob("*.xml")):
        if xml.parent == folder or not xml.stem.endswith("_fp32"):  # each grid's folder repeats the FP32 IR
            files[f"OpenVINO {xml.relative_to(folder)}"] = xml
    for onnx in sorted(folder.glob("*.onnx")):
        if not onnx.name.endswith("_int8_qdq.onnx"):
            files[f"onnxruntime {onnx.name}"] = onnx
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=Path, required=True, help="benchmark int8's --out folder")
    parser.add_argument("--data", type=Path, required=True, help="data YAML whose val split scores every file")
    parser.add_argument("--imgsz", type=int, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/score_int8_files"))
    args = parser.parse_args()
    if not (files := model_files(args.files)):
        parser.error(f"--files {args.files}: no .xml or .onnx model files (benchmark int8's --out folder)")
    ground_truth = load_ground_truth(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    protocol = EvalProtocol(imgsz=args.imgsz)
    scores: dict[str, dict] = {}
    for label, path in files.items():
        if path.suffix == ".xml":
            model = read_openvino(path)
            model.reshape({model.input(0): [-1, 3, args.imgsz, args.imgsz]})  # Ultralytics' IR has batch 1
            runner = openvino_runner(model)
        else:
            runner = onnx_runner(path)
        detections = args.out / f"{label.replace(' ', '_').replace('/', '_')}.json"
        metrics = evaluate_runner(runner, ground_truth, detections, protocol=protocol, batch=8, progress=False)
        scores[label] = {"file": str(path.relative_to(args.files)), "map50_95": metrics["map50_95"],
                         "per_image": per_image_map50_95(ground_truth, detections)}  # fmt: skip
        print(f"{label}: {metrics['map50_95']:.2f}", flush=True)
    for label, score in scores.items():
        fp32 = next(k for k in scores if k.split()[0] == label.split()[0] and "_fp32." in k)
        score["drop"] = scores[fp32]["map50_95"] - score["map50_95"]
        score["drop_se"] = Resolution.paired(scores[fp32]["per_image"], score["per_image"]).standard_error
    rows = [[label, f"{s['map50_95']:.2f}", f"{s['drop']:.2f} ± {s['drop_se']:.2f}"] for label, s in scores.items()]
    table = markdown_table(["file", "mAP50-95", "drop ± SE"], rows, [False, True, True])
    meta = {"val_images": len(ground_truth.image_files), "onednn_cap": os.environ.get("ONEDNN_MAX_CPU_ISA")}
    (args.out / "scores.json").write_text(json.dumps({**meta, "scores": scores}, indent=1))
    (args.out / "scores.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
