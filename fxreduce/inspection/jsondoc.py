"""The JSON document of an inspection, for programs: every node, totals, and in a diff the changes.

Each expression is {"expr": sympy string, "value": number at the point or null}, so a reader can both
re-evaluate it (``sympify(expr)``) and use the number directly.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch

from .view import METRICS, GraphView, NodeChange, Printer, percent, subtract

if TYPE_CHECKING:
    from .model import Inspection


def to_json(inspection: Inspection, indent: int | None) -> str:
    """The whole document as one string (compact unless ``indent`` is given)."""
    printer = inspection.printer
    document: dict[str, Any] = {"kind": "diff" if inspection.is_diff else "graph", "at": inspection.at,
                                "at_source": inspection.at_source}
    if inspection.after is None:
        document["graph"] = _graph_json(printer, inspection.before)
        return json.dumps(document, indent=indent)
    before, after = inspection.before, inspection.after
    document["before"] = _graph_json(printer, before)
    document["after"] = _graph_json(printer, after)
    document["diff"] = {kind: [_change_json(printer, c) for c in getattr(inspection, kind)]
                        for kind in ("removed", "added", "changed")}
    document["diff"]["totals"] = {
        key: {"before": printer.quantity(before.totals[key]), "after": printer.quantity(after.totals[key]),
              "delta": printer.quantity(inspection.delta(key)), "reduction_pct": inspection.reduction(key)}
        for key in METRICS}
    return json.dumps(document, indent=indent)


def _change_json(printer: Printer, change: NodeChange) -> dict[str, Any]:
    delta, reduction = {}, {}
    for key in METRICS:
        old, new = printer.values(change, key)
        delta[key] = {"expr": printer.exact(change.delta(key)), "value": subtract(new, old)}
        reduction[key] = percent(old, new)
    return {"name": change.name, "reasons": list(change.reasons), "delta": delta, "reduction_pct": reduction}


def _graph_json(printer: Printer, view: GraphView) -> dict[str, Any]:
    nodes = [{"name": row.name, "op": row.op, "target": row.target, "inputs": list(row.inputs),
              "shape": printer.shape_json(row.shape, evaluate=False),
              "shape_value": printer.shape_json(row.shape, evaluate=True),
              "dtype": _dtype_json(row.dtype), "rewritten_by": row.rewritten_by,
              "cost": {key: printer.quantity(expr) for key, expr in row.metrics.items()},
              "macs_by_dtype": {k: printer.quantity(v) for k, v in row.cost.macs.items()},
              "declared": row.cost.declared}
             for row in view.rows.values()]
    return {"title": view.title, "symbols": list(view.symbols), "specialised": dict(view.specialised),
            "nodes": nodes, "totals": {key: printer.quantity(expr) for key, expr in view.totals.items()}}


def _dtype_json(dtype: Any) -> Any:
    if isinstance(dtype, tuple):
        return [_dtype_json(d) for d in dtype]
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return None if dtype is None else str(dtype)
