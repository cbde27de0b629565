"""Time of one QAT training step, fused form against training form (``qarep-det qat --form``), interleaved.

  python benchmarks/qat_form_step_time.py --weights best.pt --data data.yaml --imgsz 320 --batch 8 --out step_time

Both forms start from the same calibrated student (ptq_eval's recipe, learned ranges as ``qarep-det qat`` learns
them); each step is Ultralytics' detection loss on one batch of the calibration draw (one made-up box per image:
the loss's cost, not its value, matters here), its backward and an Adam step. The forms alternate step by step, so
a shared host's load hits both alike; the result is the median step time of each and their ratio
(``results.json`` in ``--out``).
"""

from __future__ import annotations

import copy
import json
import statistics
import time

import torch
from benchmark_args import benchmark_parser
from torch import nn
from ultralytics.cfg import get_cfg

from qarep_det import reparameterize_model
from qarep_det.qat.training_form import to_training_form, unfused_blocks
from qarep_det.quant.calibration import calibration_set
from qarep_det.quant.lsq import learn_ranges
from qarep_det.quant.qat import make_student
from qarep_det.quant.recipe import QuantRecipe
from qarep_det.ultralytics.checkpoint import load_detector


def step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    """One training step; its wall time in seconds."""
    start = time.perf_counter()
    optimizer.zero_grad()
    loss, _ = model.loss(batch)
    loss.sum().backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = benchmark_parser(__doc__, imgsz=320, calib_images=8, out="runs/benchmarks/qat_form_step_time")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per form, after one untimed")
    args = parser.parse_args()
    fp32 = load_detector(args.weights)
    images = torch.cat(list(calibration_set(args.data, args.imgsz, max(args.batch, args.calib_images), 0)))
    fused = make_student(reparameterize_model(fp32), [images], QuantRecipe(calib_images=args.calib_images))
    training = copy.deepcopy(fused)
    to_training_form(training, copy.deepcopy(unfused_blocks(fp32)))
    n = args.batch
    batch = {"img": images[:n], "batch_idx": torch.arange(n, dtype=torch.float32), "cls": torch.zeros(n, 1),
             "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]]).repeat(n, 1)}  # fmt: skip
    forms = {"fused": fused, "training": training}
    optimizers = {}
    for name, model in forms.items():
        learn_ranges(model)
        model.args = get_cfg()  # the loss gains, as the trainer sets them
        model.train()
        optimizers[name] = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        step(model, optimizers[name], batch)  # untimed: first-call allocations
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(args.steps):
        for name, model in forms.items():
            times[name].append(step(model, optimizers[name], batch))
    medians = {name: statistics.median(t) for name, t in times.items()}
    results = {
        "median_s": medians,
        "training_over_fused": medians["training"] / medians["fused"],
        "steps_s": times,
        "threads": torch.get_num_threads(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: results[k] for k in ("median_s", "training_over_fused")}))


if __name__ == "__main__":
    main()
