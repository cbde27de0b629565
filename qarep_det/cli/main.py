"""qarep-det: every tool of qarep_det as a subcommand, and Ultralytics' own CLI with our modules registered.

  qarep-det train --cfg yolo_qarep_s.yaml --data coco.yaml --epochs 300 --device 0
  qarep-det ptq-eval                          # the embedded demo on the CPU
  qarep-det yolo train model=yolo_qarep_n.yaml data=coco8.yaml epochs=3

Each subcommand takes exactly the flags of tools/<name>.py (same code, same parser); 'qarep-det CMD --help' lists
them. 'qarep-det yolo ARGS' runs Ultralytics' 'yolo ARGS' after importing qarep_det, which the plain 'yolo' command
never does before it parses a model YAML: that is why 'yolo train model=yolo_qarep_n.yaml' alone fails on our module
names, while 'yolo val' of a trained checkpoint works (unpickling the checkpoint imports qarep_det).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable, Iterator

TOOLS: dict[str, str] = {
    "train": "train",
    "ptq-eval": "ptq_eval",
    "export": "export",
    "diagnose": "diagnose",
    "qat": "qat",
    "benchmark": "benchmark",
    "ladder": "ladder",
    "make-dataset": "make_dataset",
    "coco": "coco",
    "plant-outlier": "plant_outlier",
}
"""Subcommand -> module of ``qarep_det.cli`` (and script of ``tools/``)."""


def _summary(module: str) -> str:
    """A tool's one-line description: the first line of its module docstring."""
    return (importlib.import_module(f"qarep_det.cli.{module}").__doc__ or "").strip().splitlines()[0]


def usage() -> str:
    """``qarep-det --help``: this module's docstring and one line per subcommand."""
    lines = [(__doc__ or "").strip(), "", "commands:"]
    lines += [f"  {name:<14} {_summary(module)}" for name, module in TOOLS.items()]
    lines.append(f"  {'yolo':<14} Ultralytics' CLI (yolo train|val|predict|export ...) with qarep_det's modules")
    return "\n".join(lines)


@contextlib.contextmanager
def qarep_detect_trainer() -> Iterator[None]:
    """Let Ultralytics' ``YOLO.train`` build our ``QARepTrainer`` for detection: the same trainer with the AMP check
    that needs no download (Ultralytics' downloads a model on CUDA), and a class that DDP workers import from
    qarep_det, so our modules are registered there too (the stock trainer's workers would not know them)."""
    from ultralytics.models.yolo import detect

    from qarep_det.ultralytics.trainer import QARepTrainer

    original = detect.DetectionTrainer
    detect.DetectionTrainer = QARepTrainer  # YOLO.task_map reads this attribute each time it is asked
    try:
        yield
    finally:
        detect.DetectionTrainer = original


def report_input_errors(run: Callable[[], int]) -> int:
    """Run a tool; bad input (:data:`qarep_det.errors.INPUT_ERRORS`) becomes one ``error: ...`` line and exit status
    2, the setting at fault named by its flag. Any other exception is a fault and keeps its traceback."""
    from qarep_det.errors import INPUT_ERRORS, InputError, one_line

    try:
        return run()
    except INPUT_ERRORS as e:
        field = f"--{e.field.replace('_', '-')}: " if isinstance(e, InputError) and e.field else ""
        print(f"error: {field}{one_line(e)}", file=sys.stderr)
        return 2


def run_yolo(args: list[str]) -> int:
    """Ultralytics' CLI on ``args`` (what follows 'yolo'), in this process, where qarep_det is imported."""
    import ultralytics.cfg

    import qarep_det  # noqa: F401  (registers our modules and YAML names)
    from qarep_det.ultralytics.quantize8 import check_yolo_qat

    check_yolo_qat(args)
    ultralytics.cfg.ARGV = ["yolo", *args]  # entrypoint() reads its arguments from this module attribute
    with qarep_detect_trainer():
        ultralytics.cfg.entrypoint()
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The ``qarep-det`` console command; returns the exit status. ``prog`` names a tool run as a script of
    ``tools/`` in its help (default: ``qarep-det COMMAND``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in {"-V", "--version"}:
        from qarep_det import __version__

        print(f"qarep-det {__version__}")
        return 0
    if command == "yolo":
        return report_input_errors(lambda: run_yolo(rest))
    if command not in TOOLS:
        print(f"error: unknown command '{command}'; choose from {', '.join([*TOOLS, 'yolo'])}", file=sys.stderr)
        return 2
    tool = importlib.import_module(f"qarep_det.cli.{TOOLS[command]}")
    return report_input_errors(lambda: tool.main(rest, prog=prog or f"qarep-det {command}"))
