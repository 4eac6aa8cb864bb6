"""The HTML page of an inspection: one self-contained file (no network) around Graphviz's SVG layout.

The page holds the SVG drawn by ``Inspection.to_svg(ids=True)``, the inspection's view model as JSON,
and the project's own script and style (``fxreduce/assets``, inlined): pan and zoom, search by node or
module name, node details (shape and FLOPs formula, costs, the rewrite that made the node with its
contract and reason), the rewrite report and a sortable cost table. Everything the script shows is
computed here; the script only lays it out.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .model import Inspection
    from .view import NodeRow

_ASSETS = resources.files("fxreduce") / "assets"
_PROLOGUE = re.compile(r"^.*?(?=<svg)", re.S)
_SIZE = re.compile(r'<svg width="[^"]*" height="[^"]*"')
_METRIC_LABELS = {"flops": "FLOPs", "macs": "MACs", "other_ops": "other ops", "params": "params",
                  "param_bytes": "param bytes", "bytes_read": "bytes read", "bytes_written": "bytes written",
                  "bytes": "activation bytes"}


def _asset(name: str) -> str:
    return (_ASSETS / name).read_text(encoding="utf-8")


def _costs(inspection: "Inspection", row: "NodeRow | None") -> dict[str, Any] | None:
    if row is None:
        return None
    return {key: inspection.value(row.metrics[key]) for key in ("flops", "params", "bytes")}


def _node(inspection: "Inspection", name: str, data: dict, index: int, group: str | None,
          rewrites: dict[int, int], replaces: dict[str, list[str]]) -> dict[str, Any]:
    printer = inspection.printer
    row, status = data["row"], data["status"]
    before = inspection.before.rows.get(name) if inspection.is_diff else None
    after = row if status != "removed" else None
    made = inspection.made_by.get(name, ())
    return {"id": f"n{index}", "name": name, "op": row.op, "target": row.target, "module": row.module,
            "status": status, "group": group, "shape": printer.shape_text(row.shape),
            "shape_value": json.dumps(printer.shape_json(row.shape, evaluate=True)),
            "flops_formula": printer.text(row.metrics["flops"]), "rewritten_by": row.rewritten_by,
            "before": _costs(inspection, before if status != "added" else None),
            "after": _costs(inspection, after), "rewrites": [rewrites[id(r)] for r in made],
            "replaces": replaces.get(name, [])}


def view_model(inspection: "Inspection") -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data."""
    printer = inspection.printer
    rewrites = inspection.rewrites
    index_of = {id(r): i for i, r in enumerate(rewrites)}
    member = {name: group for group, names in inspection.collapsed.items() for name in names}
    graph = inspection.graph
    replaces: dict[str, list[str]] = {}  # a replacement is found by the names and modules it replaced
    for removed, anchor in inspection.anchors.items():
        row = inspection.before.rows[removed]
        replaces.setdefault(anchor, []).extend(filter(None, (removed, row.module)))
    nodes = [_node(inspection, name, data, i, member.get(name), index_of, replaces)
             for i, (name, data) in enumerate(graph.nodes(data=True))]
    totals = []
    for key, label in _METRIC_LABELS.items():
        before = inspection.value(inspection.before.totals[key])
        after = inspection.value(inspection.after.totals[key]) if inspection.is_diff else None
        totals.append({"metric": label, "before": before, "after": after,
                       "reduction": inspection.reduction(key) if inspection.is_diff else None})
    report_lines = []
    if inspection.report is not None:
        report_lines = dataclasses.replace(inspection.report, at=dict(inspection.at)).lines()
    point = ", ".join(f"{k}={v}" for k, v in inspection.at.items()) or "no symbolic dims"
    formulas = {"before": printer.text(inspection.before.totals["flops"])}
    if inspection.is_diff:
        formulas["after"] = printer.text(inspection.after.totals["flops"])
    return {
        "title": inspection.headline(), "is_diff": inspection.is_diff,
        "subtitle": f"dims {', '.join(inspection.shown.symbols) or 'none'} symbolic; values at {point} "
                    f"({inspection.at_source})",
        "passes": list(inspection.passes), "totals": totals, "formulas": formulas, "nodes": nodes,
        "groups": {group: [nodes_index for nodes_index, node in enumerate(nodes) if node["group"] == group]
                   for group in inspection.collapsed},
        "rewrites": [{"pass": r.pass_name, "contract": r.contract, "what": r.what, "replaced": list(r.replaced),
                      "added": list(r.added), "flops_before": inspection.value(r.flops_before),
                      "flops_after": inspection.value(r.flops_after)} for r in rewrites],
        "report": report_lines,
    }


def _svg(inspection: "Inspection") -> str:
    """Graphviz's SVG without its XML prologue and fixed size (the script sets the view box)."""
    svg = _PROLOGUE.sub("", inspection.to_svg(ids=True), count=1)
    return _SIZE.sub('<svg id="graph-svg" preserveAspectRatio="xMidYMid meet"', svg, count=1)


def render_page(inspection: "Inspection") -> str:
    """The complete page as one string."""
    data = json.dumps(view_model(inspection), separators=(",", ":")).replace("</", "<\\/")
    title = html.escape(inspection.headline())
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{title}</title>"
        f"<style>{_asset('inspect.css')}</style></head><body>"
        f"{_asset('inspect.html')}"
        f"<template id=\"graph-source\">{_svg(inspection)}</template>"
        f"<script type=\"application/json\" id=\"fxreduce-data\">{data}</script>"
        f"<script>{_asset('inspect.js')}</script></body></html>\n"
    )
