"""error_map_pruning, on-device CNN training (Wu et al., arXiv 2007.03213): a sparser backward.

Conv2d (and, as an option, Linear) layers become versions whose backward keeps only the top fraction of
output channels of the error map and runs the input- and weight-gradient convolutions on those channels
only. Eval and the forward are left alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from ..errors import OptionError
from ..graph import Layer, find_layers, replace_layer
from ..modules.error_map import ErrorMapConv2d, ErrorMapLinear, ErrorMapPruningModule, check_score
from ..testing.kit import compare_outputs, run_eval, seeded_forward, seeded_gradients
from .base import Contract, LayerSelection, Pass, PassOutcome, Rewrite, Skipped, option, register

SEED = 1234


def _valid_score(score) -> bool:
    try:
        check_score(score, "error_map_pruning")
    except OptionError:
        return False
    return True


@dataclass
class ErrorMapOptions(LayerSelection):
    keep: float = option(0.3, "fraction of each layer's output channels whose error map the backward keeps",
                         check=("0 < keep <= 1", lambda value: 0 < value <= 1))
    score: tuple = option((1.0, 1.0), "(g1, g2): weights of a channel's weight-norm share and error-map-norm share "
                                      "in its score", check=("two non-negative weights, not both 0", _valid_score))
    linear: bool = option(False, "also prune the error maps of Linear layers (per output feature)")
    multiple: int = option(1, "round each kept count up to a multiple of this (1: ceil(keep * channels))",
                           check=("an int >= 1", lambda value: value >= 1))
    sync: bool = option(True, "under torch.distributed, all-reduce channel scores so every rank prunes the same ones")


def _trainable_upstream(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a trainable parameter feeds ``node``: only then does a training step need its gradient."""
    parameters = dict(gm.named_parameters())
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "get_attr" and current.target in parameters and parameters[current.target].requires_grad:
            return True
        if current.op == "call_module" and any(p.requires_grad for p in gm.get_submodule(current.target).parameters()):
            return True
        stack.extend(current.all_input_nodes)
    return False


def _as_torch_layer(layer: Layer) -> nn.Module:
    """An nn.Conv2d / nn.Linear view of a layer of any dialect, holding the layer's own parameters."""
    if layer.kind == "linear":
        return layer.as_linear()
    if layer.module is not None:
        return layer.module
    weight, a = layer.weight, layer.attrs
    module = nn.Conv2d(weight.shape[1] * a["groups"], weight.shape[0], tuple(weight.shape[2:]), a["stride"],
                       a["padding"], a["dilation"], a["groups"], layer.bias is not None, device="meta")
    module.weight, module.bias = layer.weight, layer.bias
    return module


def _why_not_prunable(layer: Layer) -> str | None:
    if layer.weight is None:
        return f"{layer.describe()} computes its weight in the graph; only parameter weights are pruned"
    if not all(isinstance(t, nn.Parameter) for t in (layer.parameter, layer.bias) if t is not None):
        return f"{layer.describe()} has constant (non-parameter) weights: nothing to train"
    if layer.kind == "linear" and layer.why_shared(keeps_weight=True):
        return layer.why_shared(keeps_weight=True)
    if layer.kind == "conv2d" and layer.weight.shape[0] == layer.attrs["groups"]:
        return "one output channel per group (depthwise): no channel of a group can be pruned"
    return None


def _emp_modules(gm: nn.Module) -> dict[str, ErrorMapPruningModule]:
    return {name: m for name, m in gm.named_modules() if isinstance(m, ErrorMapPruningModule)}


@register
class ErrorMapPruning(Pass):
    name = "error_map_pruning"
    summary = "training backward keeps the top channels of each conv's error map; gradient convs run on those only"
    contract = Contract("reference", "forward outputs equal the original's; in training, input/weight/bias "
                                     "gradients equal the dense ones computed from the error map zeroed outside the "
                                     "kept channels (the same channels for the batch); keep=1 gives the dense "
                                     "gradients",
                        tolerance=1e-5)
    Options = ErrorMapOptions
    needs = frozenset({"conv2d", "linear"})
    invalidates = frozenset({"conv2d", "linear"})

    def rewrite(self, gm: fx.GraphModule, outcome: PassOutcome) -> None:
        o = self.options
        settings = dict(keep=o.keep, score=o.score, multiple=o.multiple, sync=o.sync)
        for layer in find_layers(gm, ["conv2d", "linear"] if o.linear else ["conv2d"]):
            if not o.selects(layer):
                continue
            reason = _why_not_prunable(layer)
            if reason:
                outcome.skipped.append(Skipped(layer.node.name, reason))
                continue
            source = _as_torch_layer(layer)
            if layer.kind == "conv2d":
                module = ErrorMapConv2d.from_conv(source, **settings)
            else:
                module = ErrorMapLinear.from_linear(source, **settings)
            module.train(gm.training)
            module.input_grad = _trainable_upstream(gm, layer.input)
            channels = module.weight.shape[0]
            replaced = layer.node.name
            new = replace_layer(gm, layer, module, pass_name=self.name)
            kept = f"{module.kept_channels} of {channels} channels" if module.prunes else f"all {channels} channels"
            outcome.rewrites.append(Rewrite([replaced], [new.name], f"backward keeps the error map of {kept} "
                                            f"(keep={o.keep:g}); forward unchanged", self.contract))

    def check(self, before: fx.GraphModule, after: fx.GraphModule, inputs: tuple) -> str | None:
        """Eval outputs equal; training outputs equal; gradients equal the masked-dense reference."""
        failure = compare_outputs(run_eval(before, inputs), run_eval(after, inputs), self.contract.tolerance)
        if failure:
            return f"eval: {failure}"
        original, pruned, reference = (copy.deepcopy(m) for m in (before, after, after))
        failure = compare_outputs(seeded_forward(original, inputs, SEED), seeded_forward(pruned, inputs, SEED),
                                  self.contract.tolerance)
        if failure:
            return f"training forward: {failure}"
        # Gradients in float64: the contract's 1e-5 is about which channels are kept, not float32 summation order.
        pruned, reference = pruned.double(), reference.double()
        inputs = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
        _, grads = seeded_gradients(pruned, inputs, SEED)
        references = _emp_modules(reference)
        for name, module in _emp_modules(pruned).items():
            references[name].fixed_channels = module.last_kept
            references[name].reference = True
        _, expected = seeded_gradients(reference, inputs, SEED)
        failure = compare_outputs(expected, grads, self.contract.tolerance)
        return f"training gradients vs the masked-error-map reference: {failure}" if failure else None
