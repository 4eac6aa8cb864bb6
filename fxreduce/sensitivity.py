"""How far a model's output moves when some of its weights are replaced: the measurement behind
sparse_lowrank's ``allocation='sensitivity'`` (in the spirit of ASVD's sensitivity-based truncation rank
search, arXiv 2312.05821).

The calibration batches run once through the unchanged graph; their outputs are the reference. A
measurement copies replacement weights into the graph's own tensors, runs the same batches, and copies the
originals back in a ``finally`` (so the graph is unchanged whatever happens), then states the divergence
from the reference over every floating-point output tensor of every batch:

- ``relative_squared``: sum ||y' - y||^2 / sum ||y||^2, needing no labels and no knowledge of the output;
- ``kl``: the mean over output rows of KL(softmax(y) || softmax(y')) over the last dim, for logits.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor
from torch.utils._pytree import tree_leaves

from .calibration import run_calibration
from .errors import InputError

DIVERGENCES = ("relative_squared", "kl")


def _floating(value) -> list[Tensor]:
    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, Tensor) and leaf.is_floating_point()]


class OutputDivergence:
    """The output divergence of ``gm`` with some weights swapped, on calibration ``batches``."""

    def __init__(self, gm: fx.GraphModule, batches: list[tuple], source: str, divergence: str):
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence {divergence!r} is not one of {DIVERGENCES}")
        self.gm, self.batches, self.source, self.divergence = gm, batches, source, divergence
        self.reference = self._outputs()
        if not any(self.reference):
            raise InputError("the model's output holds no floating-point tensor to measure a divergence on",
                             where=source, fix="use allocation='even' or 'global' for this model")
        self.scale = sum(float(out.double().pow(2).sum()) for outputs in self.reference for out in outputs)
        if divergence == "kl":
            if any(out.dim() == 0 for outputs in self.reference for out in outputs):
                raise InputError("divergence='kl' compares softmax over the output's last dim, but the model "
                                 "returns a scalar", where=source, fix="use divergence='relative_squared'")
            self.reference = [[out.double().log_softmax(-1) for out in outputs] for outputs in self.reference]

    def _outputs(self) -> list[list[Tensor]]:
        outputs: list[list[Tensor]] = [[] for _ in self.batches]
        output_node = next(node for node in self.gm.graph.nodes if node.op == "output")

        def keep(node: fx.Node, value, batch: int) -> None:
            outputs[batch] = [leaf.detach() for leaf in _floating(value)]

        run_calibration(self.gm, self.batches, self.source, {output_node}, keep)
        return outputs

    def __call__(self, swaps: dict[int, tuple[Tensor, Tensor]]) -> float:
        """The divergence with each (weight, replacement) of ``swaps`` copied in; the weights are restored."""
        originals = {key: weight.detach().clone() for key, (weight, _) in swaps.items()}
        try:
            with torch.no_grad():
                for weight, replacement in swaps.values():
                    weight.copy_(replacement)
            outputs = self._outputs()
        finally:
            with torch.no_grad():
                for key, (weight, _) in swaps.items():
                    weight.copy_(originals[key])
        return self._divergence(outputs)

    def _divergence(self, outputs: list[list[Tensor]]) -> float:
        total, rows = 0.0, 0
        for reference, measured in zip(self.reference, outputs):
            for ref, out in zip(reference, measured):
                if self.divergence == "relative_squared":
                    total += float((out.double() - ref.double()).pow(2).sum())
                else:
                    log_q = out.double().log_softmax(-1)
                    total += float((ref.exp() * (ref - log_q)).sum())
                    rows += ref.numel() // max(ref.shape[-1], 1)
        if self.divergence == "relative_squared":
            return total / self.scale if self.scale > 0 else total
        return total / max(rows, 1)
