"""fold_batchnorm: eval-mode BatchNorm folded into the preceding Conv2d / Linear.

Exact in eval mode. A BatchNorm in training mode is left alone with the reason: folding one that still
normalises by batch statistics changes the model.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .. import meta
from ..graph import Layer, bypass, find_chains, replace_layer
from .base import EVAL_EXACT, LayerSelection, Pass, PassOutcome, Rewrite, Skipped, register


def _folded_module(layer: Layer, batchnorm: Layer) -> torch.nn.Module:
    weight = layer.weight.detach()
    mean, var = batchnorm.attrs["running_mean"], batchnorm.attrs["running_var"]
    gamma = batchnorm.weight.detach() if batchnorm.weight is not None else torch.ones_like(mean)
    beta = batchnorm.bias.detach() if batchnorm.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + batchnorm.attrs["eps"])
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros_like(mean)
    if layer.kind == "conv2d":
        a = layer.attrs
        module = torch.nn.Conv2d(weight.shape[1] * a["groups"], weight.shape[0], tuple(weight.shape[2:]),
                                 stride=a["stride"], padding=a["padding"], dilation=a["dilation"],
                                 groups=a["groups"], bias=True, padding_mode=a["padding_mode"],
                                 dtype=weight.dtype, device=weight.device)
        new_weight = weight * scale.reshape(-1, 1, 1, 1)
    else:
        module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=True, dtype=weight.dtype,
                                 device=weight.device)
        new_weight = weight * scale.reshape(-1, 1)
    with torch.no_grad():
        module.weight.copy_(new_weight)
        module.bias.copy_((bias - mean) * scale + beta)
    return module


def _why_not_foldable(layer: Layer, batchnorm: Layer) -> str | None:
    if batchnorm.attrs["training"]:
        return "BatchNorm in training mode uses batch statistics; call model.eval() before tracing"
    if layer.weight is None:
        return f"{layer.describe()} computes its weight in the graph; only parameter weights fold"
    if layer.why_shared():
        return layer.why_shared()
    if isinstance(layer.attrs.get("padding"), str):
        return f"{layer.describe()} uses padding={layer.attrs['padding']!r}; fold needs explicit padding"
    shape = meta.shape(layer.result)
    if layer.kind == "linear" and (shape is None or len(shape) != 2):
        return "a Linear followed by BatchNorm1d folds only for 2-D (batch, features) outputs"
    if batchnorm.attrs["running_mean"].shape[0] != layer.weight.shape[0]:
        return "BatchNorm channels do not match the layer's output channels"
    return None


@register
class FoldBatchNorm(Pass):
    name = "fold_batchnorm"
    summary = "fold eval-mode BatchNorm into the preceding Conv2d / Linear (one GEMM instead of GEMM + scale)"
    contract = EVAL_EXACT
    Options = LayerSelection
    needs = frozenset({"batchnorm"})
    invalidates = frozenset({"batchnorm"})

    def rewrite(self, gm: fx.GraphModule, outcome: PassOutcome) -> None:
        # Folding conv -> bn -> bn makes a new conv -> bn chain: repeat until no chain is left to fold.
        considered: set[str] = set()
        while True:
            chains = [chain for chain in find_chains(gm, ("conv2d", "batchnorm")) + find_chains(gm, ("linear", "batchnorm"))
                      if chain[1].node.name not in considered and self.options.selects(chain[1])]
            if not chains:
                return
            for layer, batchnorm in sorted(chains, key=lambda chain: chain[0].node.name):
                considered.add(batchnorm.node.name)
                reason = _why_not_foldable(layer, batchnorm)
                if reason:
                    outcome.skipped.append(Skipped(batchnorm.name, reason))
                    continue
                replaced = [layer.node.name, batchnorm.node.name]
                new = replace_layer(gm, layer, _folded_module(layer, batchnorm), pass_name=self.name)
                bypass(gm, batchnorm, replacement=new)
                outcome.rewrites.append(Rewrite(replaced, [new.name], "BatchNorm folded into the layer's weight "
                                                                      "and bias", self.contract))
