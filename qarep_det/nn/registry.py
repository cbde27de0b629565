"""The one registry of the modules a detector YAML can name.

A class joins it where it is defined, with ``@yaml_module`` (``@yaml_module(repeats=True)`` for a stage that takes a
repeat count). Everything else follows from it: the names ``qarep_det.nn`` and ``qarep_det`` export, the names the
Ultralytics integration resolves in a YAML, and the README's module table (a test checks they agree). A block of
the user's own, decorated the same way before a model is built, is resolved in YAMLs too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, overload

from torch import nn


@dataclass(frozen=True)
class YamlModule:
    """A module usable by name in a YAML, and how its arguments are laid out."""

    cls: type[nn.Module]
    repeats: bool  # takes the depth-scaled repeat count n as its third argument, after c1 and c2 (like C2f)


YAML_MODULES: dict[str, YamlModule] = {}
"""YAML name (the class name) -> module, in registration order."""

M = TypeVar("M", bound=type[nn.Module])


@overload
def yaml_module(cls: M, *, repeats: bool = False) -> M: ...
@overload
def yaml_module(cls: None = None, *, repeats: bool = False) -> Callable[[M], M]: ...


def yaml_module(cls: M | None = None, *, repeats: bool = False) -> M | Callable[[M], M]:
    """Register a module class under its class name; usable bare or with ``repeats=True``.

    Its constructor takes ``(c1, c2, *yaml_args)``, or ``(c1, c2, n, *yaml_args)`` with ``repeats``: c1 and c2 are
    resolved and width-scaled exactly as for Ultralytics' own ``Conv``. A name taken twice is refused: a YAML name
    must mean one class.
    """

    def register(c: M) -> M:
        known = YAML_MODULES.get(c.__name__)
        if known is not None and known.cls is not c:
            raise ValueError(f"YAML module name '{c.__name__}' is taken by {known.cls.__module__}.{c.__name__}")
        YAML_MODULES[c.__name__] = YamlModule(c, repeats)
        return c

    return register if cls is None else register(cls)
