"""Dead-code elimination: nodes whose values nothing uses, and the submodules only they called."""

from __future__ import annotations

import torch.fx as fx

from .base import Contract, Pass, PassOutcome, Rewrite, register


@register
class EliminateDeadCode(Pass):
    name = "eliminate_dead_code"
    summary = "remove nodes whose results are never used (and submodules no node calls any more)"
    contract = Contract("exact", "outputs equal the original's (only unused, side-effect-free nodes go)")

    def rewrite(self, gm: fx.GraphModule, outcome: PassOutcome) -> None:
        before = [node.name for node in gm.graph.nodes]
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        remaining = {node.name for node in gm.graph.nodes}
        for name in before:
            if name not in remaining:
                outcome.rewrites.append(Rewrite([name], [], "unused result", self.contract))
