"""What fxreduce writes into ``node.meta`` and ``graph_module.meta``: every key once, and its accessors.

The cost model stores a node's shape, dtype and cost (``NodeInfo``) and a graph's capture details
(``GraphInfo``) under :data:`INFO`; :func:`graph.replace_layer` marks each node it adds with the pass
that added it and the node it replaced; passes keep what their contract check needs (an error they
reported, say) under :data:`DETAILS`; the passes' order check keeps which pass removed which graph
property (layer kind) under :data:`REMOVED`, and what a pass's input held under :data:`HELD` while it
runs. Everything else reads these through the functions here, so a key has
one spelling.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

INFO = "fxreduce"
REWRITTEN_BY = "fxreduce_rewritten_by"
REPLACED = "fxreduce_replaced"
DETAILS = "fxreduce_details"
REMOVED = "fxreduce_removed"
HELD = "fxreduce_held"


def info(item: fx.Node | fx.GraphModule) -> Any:
    """The NodeInfo of a node or the GraphInfo of a graph module, or None before propagation."""
    return getattr(item, "meta", {}).get(INFO)


def shape(node: Any) -> Any:
    """A node's propagated output shape (a tuple of sympy sizes), or None where none is known."""
    return getattr(info(node), "shape", None)


def mark_rewritten(node: fx.Node, pass_name: str, replaced: str | None = None) -> None:
    """Record that ``pass_name`` added ``node``, standing in for the node named ``replaced`` (if one)."""
    node.meta[REWRITTEN_BY] = pass_name
    if replaced is not None:
        node.meta[REPLACED] = replaced


def rewritten_by(node: fx.Node) -> str | None:
    """The pass that added ``node``, or None for a node of the captured graph."""
    return node.meta.get(REWRITTEN_BY)


def replaced(node: fx.Node) -> str | None:
    """The name (in the pass's input graph) of the node ``node`` replaced, or None."""
    return node.meta.get(REPLACED)


def add_details(node: fx.Node, **values: Any) -> None:
    """Keep values a pass's contract check reads back from the rewritten node."""
    node.meta.setdefault(DETAILS, {}).update(values)


def details(node: fx.Node) -> dict[str, Any]:
    return node.meta.get(DETAILS, {})


def removed_properties(gm: fx.GraphModule) -> dict[str, str]:
    """Graph property -> the pass that removed it, for the passes run on ``gm``'s ancestors."""
    return dict(gm.meta.get(REMOVED, {}))


def record_removed(gm: fx.GraphModule, removed: set[str], present: set[str], pass_name: str) -> None:
    """``pass_name`` took the kinds ``removed`` out of ``gm``; kinds ``present`` (again) are no longer removed."""
    kept = {name: by for name, by in removed_properties(gm).items() if name not in present}
    gm.meta[REMOVED] = {**kept, **{name: pass_name for name in sorted(removed)}}


def set_mode(module: nn.Module, training: bool) -> None:
    """Switch train/eval where the module allows it (torch.export graphs bake their mode in)."""
    try:
        module.train(training)
    except NotImplementedError:
        pass
