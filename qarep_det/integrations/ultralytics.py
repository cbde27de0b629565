"""The one place that touches Ultralytics internals: YAML registration of our modules and ``fuse()`` support.

Ultralytics has no registration API. Its ``parse_model`` resolves a YAML name with ``globals()`` of
``ultralytics.nn.tasks`` and scales channels (c1 from the previous layer, c2 by width and max channels)
only for modules in two frozensets that are local to the function. So we wrap ``parse_model``: each of our
layers is first stood in for by a 1x1 ``Conv``, a built-in base module, which makes Ultralytics resolve
c1 and the scaled c2 exactly as for its own layers; we then build our module with those channels and the
depth-scaled repeat count, and put it in the stand-in's place. Everything else (Detect, Concat, the
save list, the scale logic) stays Ultralytics' own. ``BaseModel.fuse`` and ``is_fused`` are wrapped so
that Ultralytics' val and export fuse our blocks too. ``self_test()`` guards all of this.
"""

from __future__ import annotations

import copy
import functools
from collections import ChainMap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import ultralytics
from torch import nn
from ultralytics.nn import tasks
from ultralytics.nn.modules.head import Detect
from ultralytics.utils import LOGGER

import qarep_det.nn as qnn

# YAML name -> (class, takes a repeat count). Repeat modules get ``n`` as their third argument, like C2f.
MODULES: dict[str, tuple[type[nn.Module], bool]] = {
    "QARepBlock": (qnn.QARepBlock, False),
    "QARepBlockV2": (qnn.QARepBlockV2, False),
    "RepVGGBlock": (qnn.RepVGGBlock, False),
    "ConvBNReLU": (qnn.ConvBNReLU, False),
    "SimSPPF": (qnn.SimSPPF, False),
    "SPPCSPC": (qnn.SPPCSPC, False),
    "QARepStage": (qnn.QARepStage, True),
    "QARepStageV2": (qnn.QARepStageV2, True),
    "RepVGGStage": (qnn.RepVGGStage, True),
    "QARepCSPStage": (qnn.QARepCSPStage, True),
    "QARepCSPStageV2": (qnn.QARepCSPStageV2, True),
    "RepVGGCSPStage": (qnn.RepVGGCSPStage, True),
}


class RegistrationError(RuntimeError):
    """Ultralytics' internals no longer behave as this integration expects."""


def _scaled_depth(d: dict[str, Any]) -> float:
    """The depth multiple ``parse_model`` uses: ``depth_multiple``, or the chosen row of ``scales``."""
    scales = d.get("scales")
    if scales:
        return scales[d.get("scale") or next(iter(scales))][0]
    return d.get("depth_multiple", 1.0)


def _check_names(d: dict[str, Any]) -> None:
    """Fail early, naming the layer, for a module name neither Ultralytics nor qarep_det knows."""
    for i, (_, _, name, _) in enumerate(d["backbone"] + d["head"]):
        if not isinstance(name, str) or name.startswith(("nn.", "torchvision.ops.")):
            continue
        if name not in MODULES and name not in vars(tasks):
            raise KeyError(
                f"layer {i}: unknown module '{name}' (not an Ultralytics module; qarep_det provides: "
                f"{', '.join(MODULES)})"
            )


def _build(i: int, name: str, f: Any, n: int, args: list, stand_in: nn.Module) -> nn.Module:
    """Build our module ``name`` for layer ``i`` with the channels Ultralytics resolved for its stand-in."""
    cls, repeats = MODULES[name]
    c1, c2 = stand_in.conv.in_channels, stand_in.conv.out_channels
    full_args = [c1, c2, n, *args[1:]] if repeats else [c1, c2, *args[1:]]
    try:
        if repeats or n == 1:
            module = cls(*full_args)
        else:  # a base module with n > 1 becomes n copies, as Ultralytics does for its own
            module = nn.Sequential(*(cls(*full_args) for _ in range(n)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"layer {i} ({name}, args {args}): {e}") from e
    module.np = sum(p.numel() for p in module.parameters())
    module.i, module.f, module.type = i, f, f"{cls.__module__}.{cls.__name__}"
    module.args = full_args  # shown in the model table, like the arguments Ultralytics prints for its own layers
    return module


def parse_model_with_qarep(parse_model: Callable, d: dict, ch: int, verbose: bool = True):
    """``parse_model`` that also understands our module names (see the module docstring)."""
    _check_names(d)
    layers_spec = d["backbone"] + d["head"]
    ours = {i: spec for i, spec in enumerate(layers_spec) if spec[2] in MODULES}
    if not ours:
        return parse_model(d, ch, verbose)
    d = copy.deepcopy(d)
    n_backbone = len(d["backbone"])
    for i, (f, _, name, args) in ours.items():
        if not isinstance(args, list) or not args or not isinstance(args[0], int):
            raise ValueError(f"layer {i} ({name}): first argument must be the output channels, got args {args!r}")
        section, j = ("backbone", i) if i < n_backbone else ("head", i - n_backbone)
        d[section][j] = [f, 1, "Conv", [args[0], 1]]
    model, save = parse_model(d, ch, False)
    depth = _scaled_depth(d)
    repeats = [max(round(n * depth), 1) if n > 1 else n for _, n, _, _ in layers_spec]  # checked by self_test()
    layers = list(model)
    for i, (f, _, name, args) in ours.items():
        layers[i] = _build(i, name, f, repeats[i], args, layers[i])
    if verbose:  # the same table parse_model prints; built-in layers show their YAML arguments
        LOGGER.info(f"\n{'':>3}{'from':>20}{'n':>3}{'params':>10}  {'module':<45}{'arguments':<30}")
        for (f, _, _, args), n, m in zip(layers_spec, repeats, layers, strict=True):
            LOGGER.info(f"{m.i:>3}{f!s:>20}{n:>3}{m.np:10.0f}  {m.type:<45}{getattr(m, 'args', args)!s:<30}")
    return nn.Sequential(*layers), save


def _fuse_with_qarep(fuse: Callable) -> Callable:
    @functools.wraps(fuse)
    def wrapper(self, *args, **kwargs):
        qnn.reparameterize_modules(self)
        return fuse(self, *args, **kwargs)

    wrapper.__qarep_wrapped__ = fuse
    return wrapper


def _is_fused_with_qarep(is_fused: Callable) -> Callable:
    @functools.wraps(is_fused)
    def wrapper(self) -> bool:
        return is_fused(self) and not any(isinstance(m, qnn.Reparameterizable) and not m.fused for m in self.modules())

    wrapper.__qarep_wrapped__ = is_fused
    return wrapper


def register() -> None:
    """Install the wrappers (idempotent) and run ``self_test()``."""
    if not hasattr(tasks.parse_model, "__qarep_wrapped__"):
        original = tasks.parse_model
        wrapped = functools.wraps(original)(functools.partial(parse_model_with_qarep, original))
        wrapped.__qarep_wrapped__ = original
        tasks.parse_model = wrapped
    if not hasattr(tasks.BaseModel.fuse, "__qarep_wrapped__"):
        tasks.BaseModel.fuse = _fuse_with_qarep(tasks.BaseModel.fuse)
    if not hasattr(tasks.BaseModel.is_fused, "__qarep_wrapped__"):
        tasks.BaseModel.is_fused = _is_fused_with_qarep(tasks.BaseModel.is_fused)
    self_test()


def self_test() -> None:
    """Check on a tiny YAML that our layers get the same c1/c2/repeat scaling as Ultralytics' Conv and C2f.

    Raises ``RegistrationError`` naming the Ultralytics version when its internals changed under us.
    """
    d = {
        "nc": 2,
        "depth_multiple": 0.33,
        "width_multiple": 0.25,
        "backbone": [
            [-1, 1, "Conv", [64, 3, 2]],
            [-1, 1, "QARepBlock", [128, 2]],
            [-2, 1, "Conv", [128, 3, 2]],
            [-1, 6, "QARepStage", [128]],
            [-2, 6, "C2f", [128]],
        ],
        "head": [],
    }
    try:
        model, _ = tasks.parse_model(copy.deepcopy(d), ch=3, verbose=False)
        conv, block, conv2, stage, c2f = model
        ok = (
            isinstance(block, qnn.QARepBlock)
            and (block.c1, block.c2, block.s) == (conv.conv.out_channels, conv2.conv.out_channels, 2)
            and isinstance(stage, qnn.QARepStage)
            and len(stage) == len(c2f.m)
            and stage[0].c1 == conv2.conv.out_channels
            and stage[-1].c2 == c2f.cv2.conv.out_channels
        )
        if ok:
            stand_alone = tasks.DetectionModel.__new__(tasks.DetectionModel)
            nn.Module.__init__(stand_alone)
            stand_alone.model = model
            ok = not stand_alone.is_fused()
            stand_alone.fuse(verbose=False)
            ok = ok and block.fused and all(b.fused for b in stage) and stand_alone.is_fused()
    except Exception as e:  # any failure here means the internals moved
        raise RegistrationError(
            f"qarep_det cannot register its modules with ultralytics {ultralytics.__version__}: {e!r}. "
            "Tested with ultralytics 8.4.190; pin that version or report this."
        ) from e
    if not ok:
        raise RegistrationError(
            f"qarep_det cannot register its modules with ultralytics {ultralytics.__version__}: channel or "
            "repeat scaling of our layers differs from Ultralytics' own. Tested with ultralytics 8.4.190."
        )


@dataclass
class ForwardCache:
    """One forward pass, kept: every node's input and output (for ``nn.Sequential`` nodes each child's output too,
    under ``<node>.<j>``), and the decoded ``(B, 4 + nc, A)`` predictions."""

    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    output: torch.Tensor | None = None


@dataclass(frozen=True)
class _Branch:
    """One per-level branch of the Detect head: a node of its own."""

    name: str
    level: int
    module: nn.Module


class RestartableForward:
    """A detector's forward pass as a graph of nodes that can restart anywhere.

    Nodes are the top-level layers ``model.<i>`` (walked with their ``f`` and ``i`` like ``_predict_once``) and the
    ``Detect`` head's per-level box and class branches ``model.<k>.cv2.<l>`` / ``model.<k>.cv3.<l>``, followed by
    the decode. :meth:`restart` recomputes the node holding one module with the node of another model of the same
    structure (e.g. a fake-quantized copy), only the child holding the module when the node is an ``nn.Sequential``,
    then only what depends on it with this model: a conv in the last stage costs that stage's tail and the head, a
    head conv one branch and the decode.
    """

    def __init__(self, model: nn.Module) -> None:
        head = model.model[-1]
        if type(head) is not Detect or head.end2end:
            raise ValueError(f"restartable forward needs a plain Ultralytics Detect head, got {type(head).__name__}")
        self.model, self.head = model, head
        self.layers = list(model.model)[:-1]
        prefix = f"model.{head.i}"
        self.branches = [
            _Branch(f"{prefix}.{kind}.{level}", level, modules[level])
            for kind, modules in (("cv2", head.cv2), ("cv3", head.cv3))
            for level in range(head.nl)
        ]

    def node_of(self, module_name: str) -> str:
        """The node holding a module given by qualified name (``model.6.3.conv`` -> ``model.6``)."""
        for node in [b.name for b in self.branches] + [f"model.{m.i}" for m in self.layers]:
            if module_name == node or module_name.startswith(f"{node}."):
                return node
        raise ValueError(f"'{module_name}' is in no restartable node (the DFL and the decode are not)")

    @staticmethod
    def _run(module: nn.Module, x: Any, node: str, cache: ForwardCache | None, start: int = 0) -> Any:
        """A node's module on ``x``; a Sequential runs from child ``start``, keeping children's outputs in ``cache``."""
        if not isinstance(module, nn.Sequential):
            return module(x)
        for j in range(start, len(module)):
            x = module[j](x)
            if cache is not None:
                cache.outputs[f"{node}.{j}"] = x
        return x

    @staticmethod
    def _sources(m: nn.Module) -> list[str]:
        """The nodes a layer reads, from its ``f`` (-1: the previous layer; ``model.-1`` is the image)."""
        return [f"model.{m.i - 1 if j == -1 else j}" for j in ([m.f] if isinstance(m.f, int) else m.f)]

    def _input(self, m: nn.Module, outputs: Mapping[str, Any]) -> Any:
        """A layer's input: one tensor for an int ``f``, else a list, as ``_predict_once`` builds it."""
        xs = [outputs[name] for name in self._sources(m)]
        return xs[0] if isinstance(m.f, int) else xs

    def _decode(self, feats: list[torch.Tensor], outputs: Mapping[str, Any]) -> torch.Tensor:
        """``Detect.forward_head`` and ``_inference`` on the branches' outputs."""
        bs, head = feats[0].shape[0], self.head
        raw = [outputs[b.name] for b in self.branches]
        boxes = torch.cat([r.view(bs, 4 * head.reg_max, -1) for r in raw[: head.nl]], dim=-1)
        scores = torch.cat([r.view(bs, head.nc, -1) for r in raw[head.nl :]], dim=-1)
        return head._inference({"boxes": boxes, "scores": scores, "feats": feats})

    def forward(self, x: torch.Tensor) -> ForwardCache:
        """The model's eval-mode forward pass, keeping every node's input and output."""
        cache = ForwardCache(outputs={"model.-1": x})
        for m in self.layers:
            name = f"model.{m.i}"
            cache.inputs[name] = self._input(m, cache.outputs)
            cache.outputs[name] = self._run(m, cache.inputs[name], name, cache)
        feats = self._input(self.head, cache.outputs)
        for b in self.branches:
            cache.inputs[b.name] = feats[b.level]
            cache.outputs[b.name] = self._run(b.module, feats[b.level], b.name, cache)
        cache.output = self._decode(feats, cache.outputs)
        return cache

    def restart(self, cache: ForwardCache, module_name: str, source: nn.Module) -> torch.Tensor:
        """Decoded predictions when the part of a node holding ``module_name`` (the child of a Sequential node, else
        the whole node) is computed by ``source``'s same-named module from its cached input, and everything after it
        by this model; ``cache`` is not modified."""
        node = self.node_of(module_name)
        module = self.model.get_submodule(node)
        child = module_name[len(node) + 1 :].split(".")[0]
        if child and isinstance(module, nn.Sequential):
            j = int(child)
            x = source.get_submodule(f"{node}.{j}")(cache.inputs[node] if j == 0 else cache.outputs[f"{node}.{j - 1}"])
            changed = {node: self._run(module, x, node, None, j + 1)}
        else:
            changed = {node: source.get_submodule(node)(cache.inputs[node])}
        outputs = ChainMap(changed, cache.outputs)  # changed outputs first, the cache's for the rest (no copy)
        for m in self.layers:
            if any(name in changed for name in self._sources(m)):
                changed[f"model.{m.i}"] = m(self._input(m, outputs))
        feats = self._input(self.head, outputs)
        head_sources = self._sources(self.head)
        for b in self.branches:
            if head_sources[b.level] in changed:
                changed[b.name] = b.module(feats[b.level])
        return self._decode(feats, outputs)
