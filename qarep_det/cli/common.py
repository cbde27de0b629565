"""What the tools share: a parser whose errors are one ``error: ...`` line, the flags of one idea, and the exit
status of a training run."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from qarep_det.quant.recipe import CALIB_METHODS, QuantRecipe


class OneLineErrorParser(argparse.ArgumentParser):
    """Report bad arguments as a single ``error: ...`` line (exit 2), like every other bad input of our tools,
    instead of argparse's usage block followed by the message."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag; the description's usage examples keep their lines. A default of None is not
    shown: such a flag's help says what happens without it (e.g. "default 512, demo 64")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def tool_parser(doc: str | None, prog: str | None, **kwargs: Any) -> OneLineErrorParser:
    """A tool's parser: its module docstring as the description, ``prog`` as it was invoked (``tools/train.py`` or
    ``qarep-det train``), defaults shown, one-line errors."""
    return OneLineErrorParser(prog=prog, description=doc, formatter_class=HelpFormatter, **kwargs)


def explicit_flags(argv: Sequence[str]) -> set[str]:
    """The destinations of the flags present in ``argv`` (exact long flags only: build parsers with
    ``allow_abbrev=False``), so a tool can tell a flag given on purpose from its default."""
    return {token[2:].split("=", 1)[0].replace("-", "_") for token in argv if token.startswith("--")}


def add_recipe_args(parser: argparse.ArgumentParser, calib_images: int | None, calib_help: str) -> None:
    """The INT8 recipe flags ptq_eval, diagnose and qat share (one spelling, one meaning); ``calib_images`` is the
    default of ``--calib-images`` (None: the tool decides, e.g. ptq_eval's demo)."""
    parser.add_argument("--calib-images", type=int, default=calib_images, help=calib_help)
    parser.add_argument("--calib-method", choices=CALIB_METHODS, default="max", help="activation range calibrator")
    parser.add_argument("--percentile", type=float, default=99.99, help="for --calib-method percentile")
    parser.add_argument("--keep-head-float", action="store_true", help="leave the Detect head's convs in float")
    parser.add_argument("--seed", type=int, default=0, help="calibration image draw")


def add_partial_args(parser: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """``--keep-float K`` or ``--keep-float-layers NAME ...``: partial quantization, as ptq_eval and qat take it.
    Returns their group, so a tool can add another way to choose the float convs that excludes both."""
    partial = parser.add_mutually_exclusive_group()
    partial.add_argument(
        "--keep-float",
        type=int,
        default=0,
        metavar="K",
        help="keep the K most sensitive convs float (ptq-eval: by --rank-by; qat: diagnose's isolated ranking; on the "
        "calibration images, each model its own)",
    )
    partial.add_argument(
        "--keep-float-layers",
        nargs="+",
        default=[],
        metavar="NAME",
        help="keep these convs float (module paths of the fused model, e.g. model.8.1.conv, as diagnose lists them)",
    )
    return partial


def add_rank_args(parser: argparse.ArgumentParser, default_help: str) -> None:
    """``--rank-images M``: the images of the calibration draw the per-conv analysis runs on (ptq_eval, diagnose)."""
    parser.add_argument(
        "--rank-images",
        type=int,
        metavar="M",
        help=f"analyse each conv's INT8 sensitivity on the first M images of the calibration draw (a seeded subset; "
        f"calibration still uses all); at most --calib-images (default: {default_help})",
    )


def recipe_from_args(args: argparse.Namespace, calib_images: int | None = None) -> QuantRecipe:
    """The recipe the flags of :func:`add_recipe_args` (and :func:`add_partial_args`, if added) describe."""
    return QuantRecipe(
        calib_method=args.calib_method,
        percentile=args.percentile,
        quantize_head=not args.keep_head_float,
        calib_images=calib_images or args.calib_images,
        seed=args.seed,
        float_layers=tuple(getattr(args, "keep_float_layers", ())),
    )


def unexpected_flags(argv: Sequence[str], allowed: set[str]) -> str:
    """The flags of ``argv`` outside ``allowed`` (destinations), spelled as typed, e.g. ``--epochs, --lr0``;
    empty when there are none."""
    return ", ".join(f"--{d.replace('_', '-')}" for d in sorted(explicit_flags(argv) - allowed))


def add_output_args(parser: argparse.ArgumentParser, default: str) -> None:
    """``--out`` and ``--exist-ok`` of the report tools (ptq_eval, diagnose): see :func:`output_folder`."""
    parser.add_argument("--out", type=Path, default=Path(default), help="output folder (incremented if it exists)")
    parser.add_argument("--exist-ok", action="store_true", help="write into --out even if it exists, replacing files")


def output_folder(args: argparse.Namespace) -> Path:
    """The folder a report tool writes: ``--out``, or Ultralytics' next free ``--out-2``, ``--out-3``, ... unless
    ``--exist-ok``."""
    from ultralytics.utils.files import increment_path

    return Path(increment_path(args.out, exist_ok=args.exist_ok))


def add_run_args(parser: argparse.ArgumentParser, project: str) -> None:
    """Where a training run goes and how an interrupted one continues (tools/train.py and tools/qat.py)."""
    parser.add_argument(
        "--project", type=Path, default=Path(project), help="folder that holds the runs (relative to the current one)"
    )
    parser.add_argument("--name", default="exp", help="run name: the run directory is PROJECT/NAME")
    parser.add_argument("--exist-ok", action="store_true", help="reuse PROJECT/NAME, overwriting its results")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="LAST_PT",
        help="continue an interrupted run from its weights/last.pt (the newest under --project if no path), with "
        "the run's own settings; only --device, --workers and --data may be given again",
    )


def train_to_end(trainer: Any, outputs: str) -> int:
    """Run a tool's training to the end; returns its exit status: 0 done (naming the run and its ``outputs``), 130
    on Ctrl-C, naming the ``--resume`` that continues from the last epoch saved."""
    try:
        trainer.train()
    except KeyboardInterrupt:
        if trainer.last.exists():
            print(f"interrupted: continue with --resume {trainer.last}", file=sys.stderr)
        return 130
    print(f"done: {trainer.save_dir} ({outputs})")
    return 0


@contextlib.contextmanager
def library_noise_hidden() -> Iterator[None]:
    """Our own warnings stay (e.g. fewer calibration images than asked); the libraries' deprecation notices and the
    tracer's warnings from exporting a model, many per run, do not."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning, torch.jit.TracerWarning):
            warnings.simplefilter("ignore", category)
        yield
