"""A detector's forward pass that can restart anywhere: what makes the per-conv INT8 analysis affordable.

It re-walks Ultralytics' graph (``_predict_once``'s ``f`` / ``i`` wiring and ``Detect``'s per-level branches), so
it lives with the other Ultralytics adapters; its test compares it with the model's own forward, bit for bit.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from ultralytics.nn.modules.head import Detect


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
