"""Inspect traced and rewritten graphs: node tables, before/after diffs, JSON, DOT, SVG and an HTML page.

Everything is read from what fxreduce.trace and the passes leave on a GraphModule (NodeInfo per node,
GraphInfo on the module, the pass that added or changed a node), so inspecting never runs the model.
Formulas print in their readable form (fxreduce.text: ``ceil(H/32)``); JSON keeps the exact sympy string.

One level per module: ``view`` (rows, totals, the printer), ``model`` (``inspect`` and ``Inspection``:
changes, rewrites, anchors), the renderers ``table``, ``jsondoc``, ``dot`` (DOT and SVG) and ``page``
(HTML), and ``writing`` (files).
"""

from .dot import HIGHLIGHT_COLOR, REMOVED_COLOR
from .model import COLLAPSE_ABOVE, FORMATS, Inspection, inspect
from .view import METRICS, GraphView, NodeChange, NodeRow, RewriteView, describe_target

__all__ = ["COLLAPSE_ABOVE", "FORMATS", "HIGHLIGHT_COLOR", "METRICS", "REMOVED_COLOR", "GraphView", "Inspection",
           "NodeChange", "NodeRow", "RewriteView", "describe_target", "inspect"]
