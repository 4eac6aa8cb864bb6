"""decompose_lstm: torch.nn.LSTM -> fxreduce's decomposed LSTM.

The decomposed LSTM computes the same function (its parameters keep nn.LSTM's names while dense), but
its input-to-hidden and hidden-to-hidden projections are separate, replaceable modules with a fast
fused recurrence, and it has a place for training-time keep sets. The AntMan and structured-dropout
rewrites build on it.
"""

from __future__ import annotations

import torch.fx as fx

from ..graph import find_layers, replace_layer
from ..modules.lstm import DecomposedLSTM
from .base import Contract, LayerSelection, Pass, PassOutcome, Rewrite, Skipped, register


@register
class DecomposeLSTM(Pass):
    name = "decompose_lstm"
    summary = "swap torch.nn.LSTM for fxreduce's decomposed LSTM (fused recurrence, replaceable projections)"
    contract = Contract("exact", "outputs and final states equal torch.nn.LSTM's (float tolerance)", tolerance=1e-4)
    Options = LayerSelection
    needs = frozenset({"lstm"})

    def rewrite(self, gm: fx.GraphModule, outcome: PassOutcome) -> None:
        for layer in find_layers(gm, ["lstm"]):
            if not self.options.selects(layer) or isinstance(layer.module, DecomposedLSTM):
                continue
            reason = layer.why_not_decomposable()
            if reason:
                outcome.skipped.append(Skipped(layer.node.name, reason))
                continue
            new = replace_layer(gm, layer, DecomposedLSTM.from_torch(layer.module), pass_name=self.name,
                                args=tuple(layer.node.args), kwargs=dict(layer.node.kwargs))
            outcome.rewrites.append(Rewrite([layer.node.name], [new.name], "nn.LSTM decomposed", self.contract))
