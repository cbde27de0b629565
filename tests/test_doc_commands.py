"""Every command line the README and docs/ show (``qarep-det ...``, ``python tools/...``, ``python benchmarks/...``, in
code blocks and inline code) parses with its tool's own argparse parser, so a renamed or removed flag cannot rot in
the docs. Nothing is run: each tool's ``main`` is started with ``ArgumentParser.parse_args`` replaced by a raise that
hands back the parser, which then parses the documented line.

Synopsis notation is read as a reader reads it: ``[...]`` marks optional parts, ``a|b`` alternative values and
``--x A | --y B`` alternative flags (each alternative is parsed), ``...`` elided arguments (the tool's required flags
may then be missing), an upper-case word such as ``N`` or ``DATA`` a placeholder (accepted where a number or a choice
is due; one that opens an optional part or an alternative, ``[HURT]``, stands for flags the text describes and is
dropped). In a code block, a command continues after a ``\\`` and on the indented lines of a wrapped synopsis.
``qarep-det yolo ...`` is Ultralytics' own CLI and is not parsed; an inline ``qarep-det qat`` without arguments names
the tool and only the subcommand is checked.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import runpy
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from test_docs import FENCED, pages

from qarep_det.cli.main import main as qarep_det_main

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = r"(qarep-det|python3? (?:tools|benchmarks)/\w+\.py)(?![\w.-])"
# a command starts its line or code span, after an optional prompt, variable settings and a timer
COMMAND = re.compile(
    r"[ \t]*(?:\$[ \t]+)?(?:[A-Za-z_]\w*=\S*[ \t]+)*(?:(?:/usr/bin/)?time(?:[ \t]+-v)?[ \t]+)?" + PROGRAM
)
INLINE = re.compile(r"`((?:[^`\n]|\n(?![ \t]*\n))+)`")  # a code span may wrap, within its paragraph
COMMENT = re.compile(r"(?:^|[ \t])#.*$")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")
SHELL_OPERATORS = {"&&", "||", ";", ">", ">>", "<", "2>", "2>&1", "&>"}
ELLIPSIS = "..."


@dataclass(frozen=True)
class DocCommand:
    """One documented command line, where it is written and whether it stands in prose (inline code)."""

    where: str
    text: str
    inline: bool


def _code_block_commands(block: str) -> Iterator[tuple[int, str]]:
    r"""(line index in the block, command) of a code block's commands: a line that starts with a program, joined
    with the lines that continue it (after a ``\``, or indented as a wrapped synopsis is: a flag or ``[`` first, or
    inside an open ``[``; other lines, such as a command's output, end it); comments dropped."""
    command: list[str] = []
    start, continued = 0, False
    for i, raw in enumerate(block.splitlines()):
        line = COMMENT.sub("", raw).rstrip()
        so_far = " ".join(command)
        wrapped = line[:1] in {" ", "\t"} and (line.lstrip()[0] in "-[" or so_far.count("[") > so_far.count("]"))
        if COMMAND.match(line):
            if command:
                yield start, so_far
            command, start = [line.removesuffix("\\")], i
        elif command and line and (continued or wrapped):
            command.append(line.removesuffix("\\"))
        elif command:
            yield start, " ".join(command)
            command = []
        continued = line.endswith("\\")
    if command:
        yield start, " ".join(command)


def commands_in(text: str, page: str) -> list[DocCommand]:
    """The command lines of a Markdown text: those of its code blocks, then the inline code spans that start with a
    program; each from its program name on, whitespace collapsed."""
    found = []
    for block in FENCED.finditer(text):
        first_line = text.count("\n", 0, block.start()) + 1
        for index, command in _code_block_commands(block.group(0)):
            program = COMMAND.match(command)
            found.append(
                DocCommand(f"{page}:{first_line + index}", " ".join(command[program.start(1) :].split()), False)
            )
    prose = FENCED.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)  # code blocks blanked, offsets kept
    for span in INLINE.finditer(prose):
        if program := COMMAND.match(span.group(1)):
            line = text.count("\n", 0, span.start(1)) + 1
            found.append(DocCommand(f"{page}:{line}", " ".join(span.group(1)[program.start(1) :].split()), True))
    return found


class _Caught(BaseException):
    """Raised instead of parsing: carries the parser a tool built (BaseException: no tool's handler catches it)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


def _hand_back(parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
    raise _Caught(parser)


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parser and those of its subcommands."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _subparsers(sub)


class _ChoicesOrPlaceholder(list):
    def __contains__(self, value: object) -> bool:
        return (isinstance(value, str) and PLACEHOLDER.fullmatch(value) is not None) or super().__contains__(value)


def _typed_or_placeholder(convert):
    @functools.wraps(convert)  # argparse names the type in its message ("invalid int value")
    def convert_unless_placeholder(value: str):
        return value if PLACEHOLDER.fullmatch(value) else convert(value)

    return convert_unless_placeholder


def _accept_placeholders(parser: argparse.ArgumentParser) -> None:
    """Let an upper-case placeholder stand where a number or one of the choices is due."""
    for p in _subparsers(parser):
        for action in p._actions:
            if callable(action.type):
                action.type = _typed_or_placeholder(action.type)
            if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
                action.choices = _ChoicesOrPlaceholder(action.choices)


@functools.cache
def parser_of(program: str, subcommand: str = "") -> argparse.ArgumentParser:
    """The parser ``qarep-det SUBCOMMAND`` or ``python tools/X.py`` / ``python benchmarks/X.py`` builds, not run."""
    with mock.patch.object(argparse.ArgumentParser, "parse_args", _hand_back):
        try:
            if program == "qarep-det":
                status = qarep_det_main([subcommand])
                raise ValueError(f"unknown subcommand (qarep-det exits {status})")
            script = ROOT / program.split()[1]
            if not script.is_file():
                raise ValueError(f"no script {script.relative_to(ROOT)}")
            sys.path.insert(0, str(script.parent))  # a benchmark imports its folder's benchmark_args
            try:
                runpy.run_path(str(script), run_name="__main__")
            finally:
                sys.path.remove(str(script.parent))
        except _Caught as caught:
            _accept_placeholders(caught.parser)
            return caught.parser
    raise ValueError(f"{program} never parsed its arguments")


@contextlib.contextmanager
def _nothing_required(parser: argparse.ArgumentParser) -> Iterator[None]:
    """For a line with elided arguments: the tool's required flags (not its subcommand) may be missing."""
    actions = [a for p in _subparsers(parser) for a in p._actions if a.required and a.option_strings]
    groups = [g for p in _subparsers(parser) for g in p._mutually_exclusive_groups if g.required]
    for item in actions + groups:
        item.required = False
    try:
        yield
    finally:
        for item in actions + groups:
            item.required = True


def _is_flag(token: str) -> bool:
    return token.startswith("-") and not re.fullmatch(r"-[\d.]+", token)


def _separate_brackets(tokens: list[str]) -> list[str]:
    """``[--imgsz 640]`` as ``[``, ``--imgsz``, ``640``, ``]``."""
    separated: list[str] = []
    for token in tokens:
        opened, closed = len(token) - len(token.lstrip("[")), len(token) - len(token.rstrip("]"))
        separated += ["["] * opened + [token[opened : len(token) - closed]] * (opened + closed < len(token))
        separated += ["]"] * closed
    return separated


def _stands_for_flags(tokens: list[str], i: int) -> bool:
    """An upper-case word that opens an optional part or an alternative (``[HURT]``, ``| HURT``) stands for flags
    the text describes."""
    return i > 0 and tokens[i - 1] in {"[", "|"} and PLACEHOLDER.fullmatch(tokens[i]) is not None


def _alternative_chains(tokens: list[str]) -> list[list[tuple[int, int]]]:
    """The spans (start, end) of each ``A | B | C`` chain: an alternative is a flag and its values, or a word that
    stands for flags (the left one starts at the last flag before the bar)."""
    chains: list[list[tuple[int, int]]] = []
    for bar in (i for i, token in enumerate(tokens) if token == "|"):
        if not chains or chains[-1][-1][1] != bar:
            start = bar
            while start > 0 and not _is_flag(tokens[start]) and tokens[start - 1] not in {"[", "|"}:
                start -= 1
            chains.append([(start, bar)])
        end = bar + 1
        if end < len(tokens) and (_is_flag(tokens[end]) or _stands_for_flags(tokens, end)):
            end += 1
        while end < len(tokens) and not _is_flag(tokens[end]) and tokens[end] not in {"[", "]", "|"}:
            end += 1
        chains[-1].append((bar + 1, end))
    return chains


def _synopsis_variants(tokens: list[str]) -> list[list[str]]:
    """Concrete argument lists of a synopsis, one per alternative: the i-th list takes the i-th (or last) choice of
    each ``A | B`` chain and of each ``a|b`` value; brackets, ``...`` and words standing for flags dropped."""
    tokens = _separate_brackets(tokens)
    chains = _alternative_chains(tokens)
    values = [t.split("|") if "|" in t.strip("|") else [t] for t in tokens]
    syntax = {j for j, token in enumerate(tokens) if token in {"[", "]", "|", ELLIPSIS} or _stands_for_flags(tokens, j)}
    variants = []
    for i in range(max([1] + [len(chain) for chain in chains] + [len(v) for v in values])):
        dropped = set(syntax)
        for chain in chains:
            kept = chain[min(i, len(chain) - 1)]
            dropped |= {j for start, end in chain if (start, end) != kept for j in range(start, end)}
        variants.append([v[min(i, len(v) - 1)] for j, v in enumerate(values) if j not in dropped])
    return variants


def check(command: DocCommand) -> str:
    """Why a documented command does not parse ('' when it does)."""
    try:
        tokens = shlex.split(command.text, comments=True)
    except ValueError as e:
        return f"not a shell line: {e}"
    if cut := next((i for i, t in enumerate(tokens) if t in SHELL_OPERATORS), None):
        tokens = tokens[:cut]
    if tokens[0] == "qarep-det":
        program, args = "qarep-det", tokens[1:]
        if not args:
            return ""  # the command's name in prose
        if args[0].startswith("-"):
            return "" if args[0] in {"-h", "--help", "-V", "--version"} else f"qarep-det has no option {args[0]}"
        if args[0] == "yolo":
            return ""  # Ultralytics' CLI, not ours to parse
        subcommand, args = args[0], args[1:]
    else:
        program, subcommand, args = " ".join(tokens[:2]), "", tokens[2:]
    try:
        parser = parser_of(program, subcommand)
    except ValueError as e:
        return str(e)
    if command.inline and not args:
        return ""  # the tool's name in prose
    elided = ELLIPSIS in _separate_brackets(args)
    for variant in _synopsis_variants(args):
        stderr = io.StringIO()
        with _nothing_required(parser) if elided else contextlib.nullcontext(), contextlib.redirect_stderr(stderr):
            try:
                parser.parse_args(variant)
            except SystemExit as e:
                if e.code:
                    return (stderr.getvalue().strip().splitlines() or [f"exit {e.code}"])[-1]
    return ""


@pytest.mark.parametrize("page", [str(p.relative_to(ROOT)) for p in pages(ROOT)])
def test_documented_commands_parse(page: str) -> None:
    text = (ROOT / page).read_text(encoding="utf-8")
    assert [f"{c.where}: {c.text} -> {why}" for c in commands_in(text, page) if (why := check(c))] == []


def test_the_docs_show_commands_of_every_kind() -> None:
    """The extraction finds what the docs hold (an empty list would pass the test above for nothing)."""
    found = [c for page in pages(ROOT) for c in commands_in(page.read_text(encoding="utf-8"), page.name)]
    assert {c.text.split()[0] for c in found} == {"qarep-det", "python"}
    assert any(c.text.startswith("python benchmarks/") for c in found)
    assert any(c.inline for c in found) and any(not c.inline for c in found)


SAMPLE = """Run `qarep-det make-dataset --out DIR --train N`, or `qarep-det qat` alone; see the `qarep-det` command,
`python tools/make_dataset.py --out d
--seed 3` (wrapped), `qarep-det ptq-eval ... --max-drop D` or `qarep-det yolo train model=x.yaml`.

```bash
$ OMP_NUM_THREADS=1 qarep-det export --weights W.pt --format onnx|openvino [--imgsz 640 \\
    --overwrite]   # a comment
  0.5 mAP (output, not a flag)
qarep-det ptq-eval --weights A.pt [--keep-float K | --keep-float-layers NAME ... | HURT]
  --backend torch [--device cpu|0] --calib-images 8 | HURT --seed 1
qarep-det export --format onnx
qarep-det make-dataset --trian 3
python tools/make_dataset.py --train many
qarep-det export --weights W.pt --format tflite
qarep-det exprot --weights W.pt
qarep-det ptq-eval --keep-float 1 --keep-float-layers model.2
python benchmarks/ranking_stability.py --weights W.pt --data DATA --sizes 8 [HURT] --keep 1
python benchmarks/no_such.py
tree/  `qarep-det` is not a command here
```
"""

ROT = {
    "qarep-det export --format onnx": "required: --weights",
    "qarep-det make-dataset --trian 3": "unrecognized arguments: --trian 3",
    "python tools/make_dataset.py --train many": "invalid int value: 'many'",
    "qarep-det export --weights W.pt --format tflite": "invalid choice: 'tflite'",
    "qarep-det exprot --weights W.pt": "unknown subcommand (qarep-det exits 2)",
    "qarep-det ptq-eval --keep-float 1 --keep-float-layers model.2": "not allowed with argument",
    "python benchmarks/no_such.py": "no script benchmarks/no_such.py",
}


def test_the_check_sees_rot_and_reads_synopses() -> None:
    commands = commands_in(SAMPLE, "page.md")
    assert [(c.where, c.text) for c in commands] == [
        ("page.md:6", "qarep-det export --weights W.pt --format onnx|openvino [--imgsz 640 --overwrite]"),
        ("page.md:9", "qarep-det ptq-eval --weights A.pt [--keep-float K | --keep-float-layers NAME ... | HURT] "
                      "--backend torch [--device cpu|0] --calib-images 8 | HURT --seed 1"),
        ("page.md:11", "qarep-det export --format onnx"),
        ("page.md:12", "qarep-det make-dataset --trian 3"),
        ("page.md:13", "python tools/make_dataset.py --train many"),
        ("page.md:14", "qarep-det export --weights W.pt --format tflite"),
        ("page.md:15", "qarep-det exprot --weights W.pt"),
        ("page.md:16", "qarep-det ptq-eval --keep-float 1 --keep-float-layers model.2"),
        ("page.md:17", "python benchmarks/ranking_stability.py --weights W.pt --data DATA --sizes 8 [HURT] --keep 1"),
        ("page.md:18", "python benchmarks/no_such.py"),
        ("page.md:1", "qarep-det make-dataset --out DIR --train N"),
        ("page.md:1", "qarep-det qat"),
        ("page.md:1", "qarep-det"),
        ("page.md:2", "python tools/make_dataset.py --out d --seed 3"),
        ("page.md:3", "qarep-det ptq-eval ... --max-drop D"),
        ("page.md:3", "qarep-det yolo train model=x.yaml"),
    ]  # fmt: skip
    for command in commands:
        why = check(command)
        assert (ROT[command.text] in why) if command.text in ROT else why == "", (command.text, why)
    synopsis = shlex.split(commands[1].text)[2:]
    assert _synopsis_variants(synopsis) == [
        ["--weights", "A.pt", "--keep-float", "K", "--backend", "torch", "--device", "cpu", "--calib-images", "8",
         "--seed", "1"],
        ["--weights", "A.pt", "--keep-float-layers", "NAME", "--backend", "torch", "--device", "0", "--seed", "1"],
        ["--weights", "A.pt", "--backend", "torch", "--device", "0", "--seed", "1"],
    ]  # fmt: skip
