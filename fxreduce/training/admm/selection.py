"""Which weights ADMM constrains, found on the model's own trace, and each weight's option values.

ADMM runs on the user's model, not on a rewritten graph, so it traces the model itself (tracing's
LeafTracer keeps fxreduce's runtime LSTMs whole) only to find the layers and their parameters.
Per-layer options ({name or glob: value}) are matched against parameter and layer names here, so a key
that matches nothing fails with what does exist.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.fx as fx
from torch import Tensor, nn

from ...errors import InputError, OptionError, TraceError, UnsupportedError
from ...graph import find_layers
from ...text import error_summary
from ...tracing import LeafTracer
from .projections import MAX_LEVELS

_LSTM_WEIGHT = "weight_[ih]h_l[0-9]*"


@dataclass
class Selection:
    """The selected weights as (parameter name, layer name, parameter) in the model's parameter order, and
    the matched layers whose weight the graph computes (nothing to constrain)."""

    model: nn.Module
    found: list[tuple[str, str, nn.Parameter]]
    weightless: set[str]

    def unknown_key(self, key: str, what: str) -> None:
        """A key that names no selected layer: say whether it has no weight or does not exist."""
        if key in self.weightless:
            raise UnsupportedError(f"layer {key!r} computes its weight in the graph: it has no weight to {what}",
                                   where=f"ADMM({what}={{{key!r}: ...}})",
                                   fix="make the weight an nn.Parameter of the model")
        try:
            module = self.model.get_submodule(key)
        except AttributeError:
            module = None
        if module is not None and getattr(module, "weight", None) is None:
            raise UnsupportedError(f"layer {key!r} ({type(module).__name__}) has no weight to {what}",
                                   where=f"ADMM({what}={{{key!r}: ...}})",
                                   fix="name Linear, Conv2d or LSTM layers only")
        layers = ", ".join(sorted({layer for _, layer, _ in self.found})) or "none"
        raise InputError(f"no selected Linear / Conv2d / LSTM layer matches {key!r}",
                         where=f"ADMM({what}={{{key!r}: ...}})", fix=f"the selected layers are: {layers}")

    def _per_layer(self, value: Any, what: str, check: Callable[[Any, str], None]) -> list[Any]:
        """Expand a scalar or {name/glob: value} option to one value (or None) per found weight."""
        found = self.found
        if value is None:
            return [None] * len(found)
        if not isinstance(value, Mapping):
            for _, layer, _ in found:
                check(value, layer)
            return [value] * len(found)
        for key in value:
            if not any(_matches(key, (name, layer)) for name, layer, _ in found):
                self.unknown_key(key, what)
        result = []
        for name, layer, _ in found:
            chosen = next((value[key] for key in value if key in (name, layer)), None)
            if chosen is None:
                chosen = next((value[key] for key in value if _matches(key, (name, layer))), None)
            if chosen is not None:
                check(chosen, layer)
            result.append(chosen)
        return result

    def levels(self, levels: Any) -> list[int | None]:
        """Quantization levels n of each weight (None: not quantized)."""
        return self._per_layer(levels, "levels", _check_levels)

    def keeps(self, prune: Any, reduction: Any) -> list[int | None]:
        """Non-zeros each weight may keep: from the global ``reduction`` target or per-layer ``prune`` ratios."""
        found = self.found
        if reduction is not None:
            if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or not reduction >= 1:
                raise OptionError(f"reduction={reduction!r} must be a number >= 1 (weights before / after)",
                                  where="ADMM(reduction=...)", fix="e.g. reduction=20 keeps 5% of the weights")
            magnitudes = torch.cat([p.detach().abs().flatten() for _, _, p in found])
            total = max(1, int(round(magnitudes.numel() / reduction)))
            threshold = torch.topk(magnitudes, total).values.min()
            keeps = [int((p.detach().abs() >= threshold).sum()) for _, _, p in found]
            for (name, layer, p), keep in zip(found, keeps):
                if keep == 0:
                    raise InputError(f"the global target {reduction:g}x keeps none of the {p.numel()} weights of "
                                     f"layer {layer} ({name}): the layer would be pruned away", where=f"layer {layer}",
                                     fix="lower the target, or give per-layer ratios with prune={...}")
            return keeps
        ratios = self._per_layer(prune, "prune", _check_ratio)
        keeps = []
        for (name, layer, p), ratio in zip(found, ratios):
            if ratio is None:
                keeps.append(None)
                continue
            keep = int(round((1 - ratio) * p.numel()))
            if keep == 0:
                raise InputError(f"prune ratio {ratio} keeps none of the {p.numel()} weights of layer {layer} "
                                 f"({name}): the layer would be pruned away", where=f"layer {layer}",
                                 fix=f"use a ratio below {1 - 0.5 / p.numel():.6g}")
            keeps.append(keep)
        return keeps


def select(model: nn.Module, graph: fx.GraphModule | None, pattern: str) -> Selection:
    """The Linear, Conv2d and LSTM weights of ``model`` whose layer matches the glob ``pattern``."""
    if graph is None:
        try:
            graph = fx.GraphModule(model, LeafTracer().trace(model))
        except Exception as error:
            raise TraceError(f"cannot trace {type(model).__name__} to find its layers: "
                             f"{error_summary(error)}", where="ADMM(model)",
                             fix="pass graph=torch.fx.symbolic_trace(model, ...) traced your way") from error
    names = {id(p): name for name, p in model.named_parameters()}
    found, seen, weightless = [], set(), set()

    def add(parameter: Tensor | None, layer: str) -> None:
        if parameter is None or id(parameter) not in names or id(parameter) in seen:
            return
        seen.add(id(parameter))
        found.append((names[id(parameter)], layer, parameter))

    for layer in find_layers(graph, ["linear", "conv2d", "lstm"]):
        if not layer.matches(pattern):
            continue
        if layer.kind == "lstm" and layer.module is not None:
            for name, parameter in layer.module.named_parameters():
                if fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], _LSTM_WEIGHT):
                    add(parameter, layer.name)
        elif layer.weight is None:
            weightless.add(layer.name)
        else:
            add(layer.parameter, layer.name)
    order = {name: index for index, name in enumerate(names.values())}
    found.sort(key=lambda item: order[item[0]])
    return Selection(model, found, weightless)


def _check_ratio(ratio: Any, layer: str) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise OptionError(f"prune ratio {ratio!r} of layer {layer} is outside [0, 1)", where=f"layer {layer}",
                          fix="the ratio is the fraction of weights removed: 0 keeps all, 0.9 keeps 10%")


def _check_levels(levels: Any, layer: str) -> None:
    if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= MAX_LEVELS:
        raise OptionError(f"quantization levels n={levels!r} of layer {layer} must be an integer in 1..127",
                          where=f"layer {layer}", fix="levels are ±q..±nq; n <= 127 fits int8")


def _matches(pattern: str, names: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for name in names)
