"""Inspect traced and rewritten graphs: node tables, before/after diffs, JSON, DOT, SVG and an HTML page.

Everything is read from what fxreduce.trace and the passes leave on a GraphModule (NodeInfo per node,
GraphInfo on the module, the ``fxreduce_rewritten_by`` tag on nodes a pass added or changed), so
inspecting never runs the model. Node costs repeat a lot (every conv of a stage has the same shape), so
each distinct expression is printed and evaluated once; that keeps rendering linear in the node count.
Formulas print in their readable form (fxreduce.text: ``ceil(H/32)``); JSON keeps the exact sympy string.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import networkx as nx
import sympy
import torch
import torch.fx as fx

from .cost_models import GraphCost, NodeCost, graph_cost, graph_info
from . import meta
from .errors import CostError, RenderError
from .text import count, formula

FORMATS = ("table", "json", "dot", "svg", "html")
HIGHLIGHT_COLOR = "#ffb000"
REMOVED_COLOR = "#9e9e9e"
COLLAPSE_ABOVE = 200
"""Graphs with more nodes than this draw each run of unchanged nodes as one box (the HTML page lists them)."""
_MIN_RUN = 3
_SHARE_COLOR = (0x6B, 0xAE, 0xD6)
_SUFFIXES = {".txt": "table", ".json": "json", ".dot": "dot", ".gv": "dot", ".svg": "svg", ".html": "html",
             ".htm": "html"}

METRICS: dict[str, Callable[[NodeCost], sympy.Expr]] = {
    "flops": lambda c: c.flops,
    "macs": lambda c: c.total_macs,
    "other_ops": lambda c: c.other + c.backward_other,
    "params": lambda c: c.params,
    "param_bytes": lambda c: c.param_bytes,
    "bytes_read": lambda c: c.bytes_read,
    "bytes_written": lambda c: c.bytes_written,
    "bytes": lambda c: c.bytes_read + c.bytes_written,
}
"""What inspection reports per node and in total; ``bytes`` is activation traffic (read + written)."""

_DIFF_COLUMNS = ("flops", "params", "bytes")


@dataclass(frozen=True)
class NodeRow:
    """One fx node as inspection shows it: identity, a readable target, symbolic shape and cost."""

    name: str
    op: str
    target: str
    inputs: tuple[str, ...]
    shape: Any
    dtype: Any
    cost: NodeCost
    rewritten_by: str | None
    metrics: Mapping[str, sympy.Expr]
    module: str | None = None


@dataclass(frozen=True)
class GraphView:
    """One graph's rows in graph order, its symbolic totals and the dims that stayed symbolic or not."""

    title: str
    rows: Mapping[str, NodeRow]
    totals: Mapping[str, sympy.Expr]
    symbols: tuple[str, ...]
    specialised: Mapping[str, str]


@dataclass(frozen=True)
class NodeChange:
    """A node the rewrite removed, added or changed, with why it counts as changed."""

    name: str
    kind: str
    before: NodeRow | None
    after: NodeRow | None
    reasons: tuple[str, ...] = ()

    def delta(self, metric: str) -> sympy.Expr:
        """after - before of ``metric``; a removed node's delta is minus its cost."""
        if self.before is None:
            return self.after.metrics[metric]
        if self.after is None:
            return -self.before.metrics[metric]
        return _difference(self.after.metrics[metric], self.before.metrics[metric])


@functools.lru_cache(maxsize=16384)
def _difference(new: sympy.Expr, old: sympy.Expr) -> sympy.Expr:
    """new - old, expanded; memoised because a rewrite changes many nodes the same way."""
    return sympy.expand(new - old)


class _Printer:
    """Prints and evaluates expressions at one point, once per distinct expression."""

    def __init__(self, point: Mapping[sympy.Symbol, int]):
        self.point = {symbol: sympy.sympify(value) for symbol, value in point.items()}
        self._text: dict[Any, str] = {}
        self._value: dict[Any, int | float | None] = {}

    def text(self, expr: Any) -> str:
        """The readable form (fxreduce.text.formula)."""
        cached = self._text.get(expr)
        if cached is None:
            cached = self._text[expr] = formula(expr) if isinstance(expr, sympy.Basic) else str(expr)
        return cached

    def exact(self, expr: Any) -> str:
        """sympy's own string: sympify(exact) is ``expr`` again."""
        return str(expr)

    def value(self, expr: Any) -> int | float | None:
        cached = self._value.get(expr, self)
        if cached is not self:
            return cached
        result = sympy.sympify(expr).xreplace(self.point)
        if result.is_Integer:
            number: int | float | None = int(result)
        elif result.is_Number:
            number = float(result)
        else:
            number = None
        self._value[expr] = number
        return number

    def quantity(self, expr: Any) -> dict[str, Any]:
        """JSON: the exact expression, its readable text where that differs, and its value."""
        document = {"expr": self.exact(expr), "value": self.value(expr)}
        text = self.text(expr)
        if text != document["expr"]:
            document["text"] = text
        return document

    def shape_text(self, shape: Any) -> str:
        if shape is None:
            return "-"
        if isinstance(shape, tuple):
            inner = ", ".join(self.shape_text(s) for s in shape)
            return f"({inner},)" if len(shape) == 1 else f"({inner})"
        return self.text(shape)

    def shape_json(self, shape: Any, evaluate: bool) -> Any:
        if shape is None:
            return None
        if isinstance(shape, tuple):
            return [self.shape_json(s, evaluate) for s in shape]
        return self.value(shape) if evaluate else self.exact(shape)


def describe_target(gm: fx.GraphModule, node: fx.Node) -> str:
    """A short readable target, so table rows stay narrow and a swapped module class shows up in a diff.

    Modules: the class, with the path when the node name doesn't already say it; functions: ``F.relu``,
    ``add``, ``torch.flatten``, ``aten.convolution.default``; methods: ``.view()``.
    """
    if node.op == "call_module":
        kind = type(gm.get_submodule(node.target)).__name__
        return kind if node.name == node.target.replace(".", "_") else f"{node.target}: {kind}"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            return str(node.target)
        module = getattr(node.target, "__module__", None) or ""
        name = getattr(node.target, "__name__", None) or repr(node.target)
        if module in ("_operator", "operator", "builtins", "math"):
            return name
        if module == "torch.nn.functional":
            return f"F.{name}"
        return f"{module}.{name}" if module else name
    return str(node.target)


def _view(gm: fx.GraphModule, cost: GraphCost, title: str) -> GraphView:
    rows: dict[str, NodeRow] = {}
    for node in gm.graph.nodes:
        info = meta.info(node)
        node_cost = cost.nodes[node.name]
        rows[node.name] = NodeRow(
            name=node.name, op=node.op, target=describe_target(gm, node),
            inputs=tuple(n.name for n in node.all_input_nodes), shape=info.shape, dtype=info.dtype,
            cost=node_cost, rewritten_by=meta.rewritten_by(node),
            metrics={key: get(node_cost) for key, get in METRICS.items()},
            module=node.target if node.op == "call_module" else None)
    totals = {key: sympy.expand(sympy.Add(*(row.metrics[key] for row in rows.values()))) for key in METRICS}
    return GraphView(title, rows, totals, tuple(cost.symbols), dict(cost.specialised))


def _title(gm: fx.GraphModule) -> str:
    info = graph_info(gm)
    return f"{info.source or type(gm).__name__} ({info.method})"


def _point(costs: Sequence[GraphCost], gms: Sequence[fx.GraphModule], at: Mapping[str, int] | None):
    """The dims to evaluate at: ``at`` where given, the example input sizes for the rest."""
    for name, value in (at or {}).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CostError(f"dim {name}={value!r} is not a positive integer", where="fxreduce.inspect",
                            fix=f'e.g. at={{"{name}": 1}}')
    known = set().union(*(set(c.symbols) | set(c.fixed) for c in costs))
    unknown = sorted(set(at or {}) - known)
    if unknown:
        names = ", ".join(sorted(set().union(*(c.symbols for c in costs)))) or "none"
        raise CostError(f"unknown dim name(s) {', '.join(unknown)}", where="fxreduce.inspect",
                        fix=f"the symbolic dims of this graph are: {names}")
    dims: dict[str, int] = {}
    for gm, cost in zip(gms, costs):
        spec = graph_info(gm).spec
        for name in cost.symbols:
            dims.setdefault(name, spec.hint(name))
    dims.update(at or {})
    values: dict[sympy.Symbol, int] = {}
    for cost in costs:
        values.update(cost.symbol_values({k: v for k, v in dims.items() if k in cost.symbols or k in cost.fixed}))
    return dims, values


def _changes(before: GraphView, after: GraphView) -> list[NodeChange]:
    changes = [NodeChange(name, "removed", row, None) for name, row in before.rows.items() if name not in after.rows]
    for name, new in after.rows.items():
        old = before.rows.get(name)
        if old is None:
            tag = (f"added by {new.rewritten_by}",) if new.rewritten_by else ()
            changes.append(NodeChange(name, "added", None, new, tag))
            continue
        reasons = []
        if old.op != new.op:
            reasons.append(f"op {old.op} -> {new.op}")
        if old.target != new.target:
            reasons.append(f"target {old.target} -> {new.target}")
        if old.shape != new.shape:
            reasons.append("shape")
        if old.cost != new.cost:
            reasons.append("cost")
        if new.rewritten_by is not None and new.rewritten_by != old.rewritten_by:
            reasons.append(f"rewritten by {new.rewritten_by}")
        if reasons:
            changes.append(NodeChange(name, "changed", old, new, tuple(reasons)))
    return changes


def inspect(gm: fx.GraphModule, after: fx.GraphModule | None = None, *, at: Mapping[str, int] | None = None,
            format: str = "table", report: Any = None) -> "Inspection":
    """Inspect one traced graph (a node table), or a rewrite as the diff of ``gm`` (before) and ``after``.

    Costs are symbolic in the graph's named dims and evaluated at ``at`` (e.g. {"N": 1, "H": 224,
    "W": 224}); dims ``at`` leaves out take their example input size. ``format`` is what ``render()``,
    ``write()`` to a path without a suffix, and the CLI produce; ``str()`` is always the table.
    ``report`` (the pipeline's RewriteReport, ``fxreduce.apply(...).report``) tells the SVG and HTML
    diffs which rewrite made each node, with its contract and reason, and what replaced each removed node.
    """
    _check_format(format)
    gms = [gm] if after is None else [gm, after]
    costs = [graph_cost(g) for g in gms]
    dims, values = _point(costs, gms, at)
    views = [_view(g, c, _title(g)) for g, c in zip(gms, costs)]
    source = "given" if at else "example inputs"
    if at and set(at) != set(dims):
        source = "given, the rest from example inputs"
    if after is None:
        return Inspection(views[0], None, (), dims, source, format, _Printer(values))
    return Inspection(views[0], views[1], tuple(_changes(*views)), dims, source, format, _Printer(values), report)


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise RenderError(f"unknown inspection format {format!r}", where="fxreduce.inspect",
                          fix=f"use one of {', '.join(FORMATS)}")


@dataclass(frozen=True)
class RewriteView:
    """One rewrite as a diff shows it: the pass, its contract and reason, the nodes, FLOPs before/after."""

    pass_name: str
    contract: str | None
    what: str | None
    replaced: tuple[str, ...]
    added: tuple[str, ...]
    flops_before: sympy.Expr
    flops_after: sympy.Expr


class Inspection:
    """A graph (or a before/after pair) ready to render as a table, JSON, DOT or SVG.

    ``before`` is the inspected graph (the original in a diff), ``after`` the rewritten one or None;
    ``changes`` lists removed, added and changed nodes; ``at`` is the point costs are evaluated at.
    """

    def __init__(self, before: GraphView, after: GraphView | None, changes: tuple[NodeChange, ...],
                 at: Mapping[str, int], at_source: str, format: str, printer: _Printer, report: Any = None):
        self.before, self.after, self.changes = before, after, changes
        self.at, self.at_source, self.format = dict(at), at_source, format
        self.report = report
        self._printer = printer
        self._graph: nx.DiGraph | None = None

    @property
    def is_diff(self) -> bool:
        return self.after is not None

    @property
    def shown(self) -> GraphView:
        """The graph the table and DOT draw: the rewritten one in a diff."""
        return self.after if self.after is not None else self.before

    def _kind(self, kind: str) -> tuple[NodeChange, ...]:
        return tuple(c for c in self.changes if c.kind == kind)

    @property
    def removed(self) -> tuple[NodeChange, ...]:
        return self._kind("removed")

    @property
    def added(self) -> tuple[NodeChange, ...]:
        return self._kind("added")

    @property
    def changed(self) -> tuple[NodeChange, ...]:
        return self._kind("changed")

    def value(self, expr: Any) -> int | float | None:
        """``expr`` evaluated at this inspection's point (None if a dim stays unknown)."""
        return self._printer.value(expr)

    def _rewritten(self, where: str) -> GraphView:
        if self.after is None:
            raise RenderError("this inspection holds one graph, not a rewrite", where=where,
                              fix="call fxreduce.inspect(before, after)")
        return self.after

    def delta(self, metric: str = "flops") -> sympy.Expr:
        """Symbolic total after - before of ``metric`` (a diff only)."""
        after = self._rewritten("Inspection.delta")
        return sympy.expand(after.totals[metric] - self.before.totals[metric])

    def reduction(self, metric: str = "flops") -> float | None:
        """Percent of ``metric`` the rewrite saves at this inspection's point (None where before is 0)."""
        after = self._rewritten("Inspection.reduction")
        return _percent(self.value(self.before.totals[metric]), self.value(after.totals[metric]))

    @property
    def graph(self) -> nx.DiGraph:
        """Data flow of the shown graph; in a diff also the removed nodes and their former edges.

        Node attributes: ``row`` (NodeRow) and ``status`` ("same", "added", "changed", "removed").
        """
        if self._graph is None:
            graph = nx.DiGraph()
            status = {c.name: c.kind for c in self.changes}
            for row in self.shown.rows.values():
                graph.add_node(row.name, row=row, status=status.get(row.name, "same"))
                graph.add_edges_from(((source, row.name) for source in row.inputs), removed=False)
            for change in self.removed:
                graph.add_node(change.name, row=change.before, status="removed")
            users: dict[str, list[str]] = {}
            for row in self.before.rows.values() if self.removed else ():
                for source in row.inputs:
                    users.setdefault(source, []).append(row.name)
            for change in self.removed:
                graph.add_edges_from(((s, change.name) for s in change.before.inputs if s in graph), removed=True)
                graph.add_edges_from(((change.name, u) for u in users.get(change.name, ()) if u in graph),
                                     removed=True)
            self._graph = graph
        return self._graph

    def render(self, format: str | None = None) -> str:
        """The inspection as text in ``format`` ("table", "json", "dot", "svg" or "html"; default: its own)."""
        format = format or self.format
        _check_format(format)
        return {"table": self.to_table, "json": self.to_json, "dot": self.to_dot, "svg": self.to_svg,
                "html": self.to_html}[format]()

    def __str__(self) -> str:
        return self.to_table()

    def __repr__(self) -> str:
        if self.after is None:
            return f"<Inspection {self.before.title}: {len(self.before.rows)} nodes>"
        return (f"<Inspection diff {self.before.title}: {len(self.removed)} removed, {len(self.added)} added, "
                f"{len(self.changed)} changed>")

    def _header(self) -> list[str]:
        view = self.shown
        point = ", ".join(f"{k}={v}" for k, v in self.at.items()) or "no symbolic dims"
        lines = [f"dims: {', '.join(view.symbols) or 'none'} symbolic; values at {point} ({self.at_source})"]
        specialised = {**self.before.specialised, **view.specialised}
        lines.append("specialised: " + ("; ".join(f"{k} ({v})" for k, v in specialised.items()) or "none"))
        return lines

    def to_table(self, width: int = 56) -> str:
        """Plain-text table; formulas and shapes longer than ``width`` characters are cut (JSON has them)."""
        if self.after is None:
            view = self.before
            lines = [f"graph {view.title}: {len(view.rows)} nodes", *self._header(), ""]
            lines += self._node_table(view, width)
            lines += ["", "totals"]
            lines += _columns(["metric", "formula", "value"],
                              [[key, _cut(self._printer.text(expr), width * 3), _number(self.value(expr))]
                               for key, expr in view.totals.items()], right={2})
            return "\n".join(lines)
        before, after = self.before, self.after
        lines = [f"diff {before.title}: {len(before.rows)} -> {len(after.rows)} nodes "
                 f"({len(self.removed)} removed, {len(self.added)} added, {len(self.changed)} changed)",
                 *self._header()]
        for kind in ("removed", "added", "changed"):
            changes = self._kind(kind)
            if changes:
                lines += ["", f"{kind} ({len(changes)})"] + self._change_table(changes, width)
        lines += ["", "totals"]
        rows = []
        for key in METRICS:
            old, new = self.value(before.totals[key]), self.value(after.totals[key])
            rows.append([key, _number(old), _number(new), _signed(_sub(new, old)), _pct(_percent(old, new))])
        lines += _columns(["metric", "before", "after", "delta", "reduction"], rows, right={1, 2, 3, 4})
        lines += ["", f"flops before: {_cut(self._printer.text(before.totals['flops']), width * 3)}",
                  f"flops after:  {_cut(self._printer.text(after.totals['flops']), width * 3)}"]
        return "\n".join(lines)

    def _node_table(self, view: GraphView, width: int) -> list[str]:
        total = self.value(view.totals["flops"]) or 0
        rows = []
        for row in view.rows.values():
            flops = row.metrics["flops"]
            value = self.value(flops)
            rows.append([row.name, row.op, _cut(row.target, width), _cut(self._printer.shape_text(row.shape), width),
                         _cut(self._printer.text(flops), width), _number(value),
                         _pct(100 * value / total if total and value else None),
                         _number(self.value(row.metrics["params"]))])
        return _columns(["name", "op", "target", "shape", "flops formula", "flops", "share", "params"], rows,
                        right={5, 6, 7})

    def _change_table(self, changes: Iterable[NodeChange], width: int) -> list[str]:
        rows = []
        for change in changes:
            row = change.after or change.before
            cells = [row.name, row.op, _cut(row.target, width), _cut("; ".join(change.reasons), width),
                     _cut(self._printer.shape_text(row.shape), width)]
            for key in _DIFF_COLUMNS:
                old, new = self._pair(change, key)
                cells.append(_signed(_sub(new, old)))
            cells.append(_pct(_percent(*self._pair(change, "flops"))))
            rows.append(cells)
        return _columns(["name", "op", "target", "why", "shape", "flops delta", "params delta", "bytes delta",
                         "flops reduction"], rows, right={5, 6, 7, 8})

    def to_json(self, indent: int | None = None) -> str:
        """Machine-readable: every node with its fields, totals, and in a diff the changes and deltas.

        Each expression is {"expr": sympy string, "value": number at ``at`` or null}. Compact by default:
        json's indenting encoder is pure Python and takes seconds on graphs of thousands of nodes.
        """
        printer = self._printer
        document: dict[str, Any] = {"kind": "diff" if self.is_diff else "graph", "at": self.at,
                                    "at_source": self.at_source}
        if self.after is None:
            document["graph"] = self._graph_json(self.before)
            return json.dumps(document, indent=indent)
        after = self.after
        document["before"] = self._graph_json(self.before)
        document["after"] = self._graph_json(after)
        document["diff"] = {kind: [self._change_json(c) for c in self._kind(kind)]
                            for kind in ("removed", "added", "changed")}
        document["diff"]["totals"] = {
            key: {"before": printer.quantity(self.before.totals[key]), "after": printer.quantity(after.totals[key]),
                  "delta": printer.quantity(self.delta(key)), "reduction_pct": self.reduction(key)}
            for key in METRICS}
        return json.dumps(document, indent=indent)

    def _change_json(self, change: NodeChange) -> dict[str, Any]:
        delta, reduction = {}, {}
        for key in METRICS:
            old, new = self._pair(change, key)
            delta[key] = {"expr": self._printer.exact(change.delta(key)), "value": _sub(new, old)}
            reduction[key] = _percent(old, new)
        return {"name": change.name, "reasons": list(change.reasons), "delta": delta, "reduction_pct": reduction}

    def _pair(self, change: NodeChange, metric: str) -> tuple[Any, Any]:
        old = self.value(change.before.metrics[metric]) if change.before else 0
        new = self.value(change.after.metrics[metric]) if change.after else 0
        return old, new

    def _graph_json(self, view: GraphView) -> dict[str, Any]:
        printer = self._printer
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

    @functools.cached_property
    def rewrites(self) -> tuple["RewriteView", ...]:
        """Each rewrite of the diff: from ``report`` where given, else one per pass tag on the nodes."""
        if self.after is None:
            return ()
        if self.report is not None:
            return tuple(RewriteView(step.pass_.name, str(step.pass_.contract), item.rewrite.what,
                                     tuple(_node_name(n) for n in item.replaced), tuple(_node_name(n) for n in item.added),
                                     item.before.flops, item.after.flops)
                         for step in self.report.steps for item in step.rewrites)
        tagged: dict[str, list[str]] = {}
        for row in self.after.rows.values():
            if row.rewritten_by and row.rewritten_by != self.before.rows.get(row.name, row).rewritten_by or (
                    row.rewritten_by and row.name not in self.before.rows):
                tagged.setdefault(row.rewritten_by, []).append(row.name)
        return tuple(RewriteView(name, None, None, (), tuple(names),
                                 sympy.Integer(0), sympy.Add(*(self.after.rows[n].metrics["flops"] for n in names)))
                     for name, names in tagged.items())

    @functools.cached_property
    def made_by(self) -> dict[str, tuple["RewriteView", ...]]:
        """Node name -> the rewrites that made it (after; a chain, e.g. folded then lowered to int8) or that
        replaced it (removed nodes)."""
        if self.after is None:
            return {}
        rewrites = self.rewrites
        replaced_by: dict[str, RewriteView] = {}
        for rewrite in rewrites:
            for name in rewrite.replaced:
                replaced_by.setdefault(name, rewrite)
        made: dict[str, list[RewriteView]] = {}
        for rewrite in rewrites:
            pending, seen = list(rewrite.added), set()
            while pending:
                name = pending.pop()
                if name in seen:
                    continue
                seen.add(name)
                if name in self.after.rows:
                    made.setdefault(name, []).append(rewrite)
                later = replaced_by.get(name)
                if later is not None and later is not rewrite:
                    pending.extend(later.added)
            for name in rewrite.replaced:
                if name in self.before.rows and name not in self.after.rows:
                    made.setdefault(name, []).append(rewrite)
        return {name: tuple(chain) for name, chain in made.items()}

    def _replacements(self, name: str) -> list[str]:
        """Shown nodes made by the rewrites that removed ``name``."""
        chains = self.made_by.get(name, ())
        return [n for n, made in self.made_by.items() if n in self.after.rows and any(r in made for r in chains)]

    @property
    def passes(self) -> tuple[str, ...]:
        """The passes that changed the graph, in order."""
        if self.report is not None:
            return tuple(dict.fromkeys(step.pass_.name for step in self.report.steps))
        return tuple(dict.fromkeys(r.pass_name for r in self.rewrites))

    @functools.cached_property
    def anchors(self) -> dict[str, str]:
        """Removed node -> the node drawn beside it: its replacement where one is known, else its nearest
        surviving input (a removed identity such as Dropout), else a surviving user."""
        if self.after is None:
            return {}
        shown = self.after.rows
        users: dict[str, list[str]] = {}
        for row in self.before.rows.values():
            for source in row.inputs:
                users.setdefault(source, []).append(row.name)
        anchors: dict[str, str] = {}
        changed = {c.name for c in self.changes if c.kind in ("added", "changed")}
        for change in self.removed:
            name = change.name
            candidates = self._replacements(name)
            if not candidates:
                inputs = set(change.before.inputs)
                candidates = sorted((n for n in changed if inputs & set(shown[n].inputs)),
                                    key=lambda n: -len(os.path.commonprefix([n, name])))
            candidates += [n for n in change.before.inputs if n in shown]
            candidates += [n for n in users.get(name, ()) if n in shown]
            if candidates:
                anchors[name] = candidates[0]
        return anchors

    def headline(self) -> str:
        """Title line: the graph, the passes and the FLOPs change at this inspection's point."""
        if self.after is None:
            return f"{self.before.title}: {_number(self.value(self.before.totals['flops']))} FLOPs"
        old, new = self.value(self.before.totals["flops"]), self.value(self.after.totals["flops"])
        change = _percent(old, new)
        passes = ", ".join(self.passes) or "rewrite"
        shift = f" ({-change:+.1f}%)" if change is not None else ""
        return f"{self.before.title} after {passes}: FLOPs {_number(old)} -> {_number(new)}{shift}"

    @functools.cached_property
    def collapsed(self) -> dict[str, list[str]]:
        """In a diff, runs of unchanged nodes drawn as one box, by group id (none up to COLLAPSE_ABOVE nodes).

        A run is a stretch of consecutive unchanged nodes in graph order (a topological order), so every
        edge that leaves a run goes forward and drawing the run as one box adds no cycle.
        """
        if not self.is_diff or self.graph.number_of_nodes() <= COLLAPSE_ABOVE:
            return {}
        status = {c.name: c.kind for c in self.changes}
        anchors = set(self.anchors.values())
        runs: dict[str, list[str]] = {}
        run: list[str] = []
        for name in [*self.shown.rows, None]:
            if name is not None and status.get(name) is None and name not in anchors:
                run.append(name)
                continue
            if len(run) >= _MIN_RUN:
                runs[f"group{len(runs)}"] = run
            run = []
        return runs

    def to_dot(self, ids: bool = False) -> str:
        """Graphviz DOT of the shown graph, written directly (no pygraphviz/pydot needed).

        Fill intensity is the node's FLOPs relative to the costliest node; in a diff, added and changed
        nodes are filled in HIGHLIGHT_COLOR and each removed node is drawn ghosted (dashed grey) on the
        same rank as its replacement, with its former edges dashed. The title names the passes and the
        FLOPs change; a legend explains the styles. Tooltips (SVG) hold the full shape and FLOPs formula.
        Above COLLAPSE_ABOVE nodes, runs of unchanged nodes are drawn as one box each. ``ids`` gives each
        SVG node the id ``n<index>`` (the HTML page's handle on it).
        """
        graph, printer = self.graph, self._printer
        flops = {name: self.value(data["row"].metrics["flops"]) or 0 for name, data in graph.nodes(data=True)}
        largest = max((v for n, v in flops.items() if graph.nodes[n]["status"] != "removed"), default=0)
        total = self.value(self.shown.totals["flops"]) or 0
        lines = ["digraph fxreduce {", f"  label={_quote(self.headline())}; labelloc=t; labeljust=l; fontsize=16; "
                 'fontname="Helvetica"; rankdir=TB; nodesep=0.25; ranksep=0.3;',
                 '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, fillcolor="#ffffff", '
                 'color="#6b7280"];',
                 '  edge [color="#555555", arrowsize=0.6];']
        member = {name: group for group, names in self.collapsed.items() for name in names}
        index = {name: i for i, name in enumerate(graph.nodes)}
        drawn: set[str] = set()
        for name, data in graph.nodes(data=True):
            group = member.get(name)
            if group is not None:
                if group not in drawn:
                    drawn.add(group)
                    names = self.collapsed[group]
                    attributes = {"label": f"{len(names)} unchanged nodes\n{names[0]} ... {names[-1]}",
                                  "style": "rounded,filled,dashed", "fillcolor": "#f3f4f6", "fontcolor": "#4b5563",
                                  "tooltip": "collapsed run: " + ", ".join(names[:40])}
                    if ids:
                        attributes["id"] = group
                    lines.append(f"  {_quote(group)} {_attrs(attributes)};")
                continue
            row, status = data["row"], data["status"]
            share = 100 * flops[name] / total if total else 0.0
            text = [row.name if row.target == row.name else f"{row.name}\n{_cut(row.target, 40)}",
                    _cut(printer.shape_text(row.shape), 48)]
            if flops[name]:
                text.append(f"{_number(flops[name])} FLOPs ({share:.1f}%)")
            if status == "added":
                text.insert(0, f"+ added by {row.rewritten_by}" if row.rewritten_by else "+ added")
            elif status == "changed":
                text.insert(0, f"~ rewritten by {row.rewritten_by}" if row.rewritten_by else "~ changed")
            elif status == "removed":
                text.insert(0, "- removed")
            tooltip = f"shape {printer.shape_text(row.shape)}\nflops = {printer.text(row.metrics['flops'])}"
            attributes = {"label": "\n".join(text), "tooltip": tooltip}
            if ids:
                attributes["id"] = f"n{index[name]}"
            if status == "removed":
                attributes.update(style="rounded,dashed", color=REMOVED_COLOR, fontcolor=REMOVED_COLOR,
                                  fillcolor="#ffffff")
            elif status in ("added", "changed"):
                attributes["fillcolor"] = HIGHLIGHT_COLOR
            elif largest:
                attributes["fillcolor"] = _shade((flops[name] / largest) ** 0.5)
            lines.append(f"  {_quote(name)} {_attrs(attributes)};")
        for removed, anchor in self.anchors.items():
            if anchor not in member:
                lines.append(f"  {{rank=same; {_quote(anchor)}; {_quote(removed)};}}")
        edges = set()
        for source, target, data in graph.edges(data=True):
            source, target = member.get(source, source), member.get(target, target)
            if source == target or (source, target, data["removed"]) in edges:
                continue
            edges.add((source, target, data["removed"]))
            style = f' [style=dashed, color="{REMOVED_COLOR}", constraint=false]' if data["removed"] else ""
            lines.append(f"  {_quote(source)} -> {_quote(target)}{style};")
        if self.is_diff:
            lines += ["  subgraph cluster_legend {", '    label="legend"; style=solid; color="#cccccc"; fontsize=10;',
                      f'    "legend:rewritten" [label="added / rewritten", fillcolor="{HIGHLIGHT_COLOR}"];',
                      f'    "legend:removed" [label="removed (beside its replacement)", style="rounded,dashed", '
                      f'color="{REMOVED_COLOR}", fontcolor="{REMOVED_COLOR}"];',
                      f'    "legend:same" [label="unchanged (shade: FLOPs)", fillcolor="{_shade(1.0)}"];', "  }"]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def to_svg(self, ids: bool = False) -> str:
        """SVG drawn by Graphviz ``dot`` (a subprocess), from ``to_dot(ids)``."""
        executable = shutil.which("dot")
        if executable is None:
            raise RenderError("cannot draw SVG: the Graphviz 'dot' program is not on PATH", where="Inspection.to_svg",
                              fix="install graphviz (apt-get install graphviz) or use format=dot")
        result = subprocess.run([executable, "-Tsvg"], input=self.to_dot(ids), capture_output=True, text=True)
        if result.returncode != 0:
            message = (result.stderr.strip().splitlines() or ["no message"])[0]
            raise RenderError(f"Graphviz dot failed: {message}", where="Inspection.to_svg",
                              fix="write format=dot and run dot on it to see the full error")
        return result.stdout

    def to_html(self) -> str:
        """One self-contained page (no network): the SVG graph with pan, zoom, search and node details, the
        rewrite report and a sortable cost table (fxreduce.inspection_page)."""
        from .inspection_page import render_page

        return render_page(self)

    def write(self, path: str | os.PathLike, format: str | None = None) -> Path:
        """Write the rendering to ``path`` atomically, so readers never see a partial file.

        The format is ``format``, else the suffix's (.txt, .json, .dot/.gv, .svg, .html), else this inspection's.
        """
        path = Path(path)
        if format is None:
            if path.suffix and path.suffix.lower() not in _SUFFIXES:
                raise RenderError(f"cannot tell the format of {path.name!r} from its suffix", where=str(path),
                                  fix=f"use one of {', '.join(_SUFFIXES)} or pass format=...")
            format = _SUFFIXES.get(path.suffix.lower(), self.format)
        text = self.render(format)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(temporary, path)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise RenderError(f"cannot write the inspection: {error.strerror or error}", where=str(path),
                              fix="check that the directory exists and is writable") from error
        return path


def _node_name(label: str) -> str:
    """ "conv1 (Conv2d)" -> "conv1": the report labels nodes with their module class."""
    return label.split(" (", 1)[0]


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _attrs(attributes: Mapping[str, str]) -> str:
    return "[" + ", ".join(f"{k}={_quote(v)}" for k, v in attributes.items()) + "]"


def _shade(intensity: float) -> str:
    """White -> _SHARE_COLOR as ``intensity`` goes 0 -> 1."""
    return "#" + "".join(f"{round(255 - (255 - c) * intensity):02x}" for c in _SHARE_COLOR)


def _dtype_json(dtype: Any) -> Any:
    if isinstance(dtype, tuple):
        return [_dtype_json(d) for d in dtype]
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return None if dtype is None else str(dtype)


def _cut(text: str, width: int) -> str:
    """``text`` shortened to ``width`` characters, at a term boundary where there is one."""
    if len(text) <= width:
        return text
    head = text[: width - 4]
    space = head.rfind(" ")
    if space > width // 2:
        head = head[:space]
    return head + " ..."


def _number(value: int | float | None) -> str:
    """Compact: exact below 10,000, then K/M/G/T/P with three significant digits."""
    return count(value, exact_below=10_000)


def _signed(value: int | float | None) -> str:
    if value is None:
        return "?"
    return ("+" if value > 0 else "") + _number(value)


def _sub(new: Any, old: Any) -> Any:
    return None if new is None or old is None else new - old


def _percent(old: Any, new: Any) -> float | None:
    """Reduction in percent: 100 (old - new) / old."""
    if old is None or new is None or old == 0:
        return None
    return 100.0 * (old - new) / old


def _pct(percent: float | None) -> str:
    return "" if percent is None else f"{percent:.1f}%"


def _columns(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int] = frozenset()) -> list[str]:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(row) for row in rows]
