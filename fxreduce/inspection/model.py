"""The Inspection object: one graph, or a rewrite as a before/after pair, evaluated at one point.

It holds the views (fxreduce.inspection.view), what changed, which rewrite made each node and where a
removed node is drawn; the renderers (table, jsondoc, dot, page) and writing read it and never change it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Mapping

import networkx as nx
import sympy
import torch.fx as fx

from ..cost_models import graph_cost
from ..errors import RenderError
from . import dot, jsondoc, page, table, writing
from .view import (GraphView, NodeChange, Printer, RewriteView, evaluation_point, graph_view, node_changes, number,
                   percent)

FORMATS = ("table", "json", "dot", "svg", "html")
COLLAPSE_ABOVE = 200
"""Graphs with more nodes than this draw each run of unchanged nodes as one box (the HTML page lists them)."""
_MIN_RUN = 3


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
    dims, values = evaluation_point(costs, gms, at)
    views = [graph_view(g, c) for g, c in zip(gms, costs)]
    source = "given" if at else "example inputs"
    if at and set(at) != set(dims):
        source = "given, the rest from example inputs"
    if after is None:
        return Inspection(views[0], None, (), dims, source, format, Printer(values))
    return Inspection(views[0], views[1], tuple(node_changes(*views)), dims, source, format, Printer(values), report)


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise RenderError(f"unknown inspection format {format!r}", where="fxreduce.inspect",
                          fix=f"use one of {', '.join(FORMATS)}")


class Inspection:
    """A graph (or a before/after pair) ready to render as a table, JSON, DOT or SVG.

    ``before`` is the inspected graph (the original in a diff), ``after`` the rewritten one or None;
    ``changes`` lists removed, added and changed nodes; ``at`` is the point costs are evaluated at.
    """

    def __init__(self, before: GraphView, after: GraphView | None, changes: tuple[NodeChange, ...],
                 at: Mapping[str, int], at_source: str, format: str, printer: Printer, report: Any = None):
        self.before, self.after, self.changes = before, after, changes
        self.at, self.at_source, self.format = dict(at), at_source, format
        self.report = report
        self.printer = printer
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
        return self.printer.value(expr)

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
        return percent(self.value(self.before.totals[metric]), self.value(after.totals[metric]))

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

    def to_table(self, width: int = 56) -> str:
        """Plain-text table; formulas and shapes longer than ``width`` characters are cut (JSON has them)."""
        return table.to_table(self, width)

    def to_json(self, indent: int | None = None) -> str:
        """Machine-readable: every node with its fields, totals, and in a diff the changes and deltas.

        Each expression is {"expr": sympy string, "value": number at ``at`` or null}. Compact by default:
        json's indenting encoder is pure Python and takes seconds on graphs of thousands of nodes.
        """
        return jsondoc.to_json(self, indent)

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
            return f"{self.before.title}: {number(self.value(self.before.totals['flops']))} FLOPs"
        old, new = self.value(self.before.totals["flops"]), self.value(self.after.totals["flops"])
        change = percent(old, new)
        passes = ", ".join(self.passes) or "rewrite"
        shift = f" ({-change:+.1f}%)" if change is not None else ""
        return f"{self.before.title} after {passes}: FLOPs {number(old)} -> {number(new)}{shift}"

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
        return dot.to_dot(self, ids)

    def to_svg(self, ids: bool = False) -> str:
        """SVG drawn by Graphviz ``dot`` (a subprocess), from ``to_dot(ids)``."""
        return dot.to_svg(self, ids)

    def to_html(self) -> str:
        """One self-contained page (no network): the SVG graph with pan, zoom, search and node details, the
        rewrite report and a sortable cost table (fxreduce.inspection.page)."""
        return page.render_page(self)

    def write(self, path: str | os.PathLike, format: str | None = None) -> Path:
        """Write the rendering to ``path`` atomically, so readers never see a partial file.

        The format is ``format``, else the suffix's (.txt, .json, .dot/.gv, .svg, .html), else this inspection's.
        """
        return writing.write(self, path, format)


def _node_name(label: str) -> str:
    """ "conv1 (Conv2d)" -> "conv1": the report labels nodes with their module class."""
    return label.split(" (", 1)[0]
