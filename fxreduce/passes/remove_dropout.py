"""remove_dropout: eval-mode Dropout (the identity) removed from the graph.

Exact in eval mode. A dropout in training mode is left alone with the reason: it still drops.
"""

from __future__ import annotations

import torch.fx as fx

from ..graph import bypass, find_layers
from .base import EVAL_EXACT, LayerSelection, Pass, PassOutcome, Rewrite, Skipped, register


@register
class RemoveDropout(Pass):
    name = "remove_dropout"
    summary = "remove eval-mode Dropout (the identity) from the graph"
    contract = EVAL_EXACT
    Options = LayerSelection
    needs = frozenset({"dropout"})
    invalidates = frozenset({"dropout"})

    def rewrite(self, gm: fx.GraphModule, outcome: PassOutcome) -> None:
        for layer in find_layers(gm, ["dropout"]):
            if not self.options.selects(layer):
                continue
            if layer.attrs["training"] and layer.attrs["p"] > 0:
                outcome.skipped.append(Skipped(layer.name, "dropout in training mode is not the identity; "
                                                           "call model.eval() before tracing"))
                continue
            bypass(gm, layer)
            outcome.rewrites.append(Rewrite([layer.node.name], [], "eval-mode dropout is the identity",
                                            self.contract))
