"""Graphviz renderings of an inspection: DOT written directly (no pygraphviz / pydot), SVG through ``dot``."""

from __future__ import annotations

import shutil
import subprocess
from typing import TYPE_CHECKING, Mapping

from ..errors import RenderError
from .view import cut, number

if TYPE_CHECKING:
    from .model import Inspection

HIGHLIGHT_COLOR = "#ffb000"
REMOVED_COLOR = "#9e9e9e"
_SHARE_COLOR = (0x6B, 0xAE, 0xD6)


def to_dot(inspection: Inspection, ids: bool) -> str:
    """DOT of the shown graph, styled as ``Inspection.to_dot`` describes."""
    graph, printer = inspection.graph, inspection.printer
    flops = {name: inspection.value(data["row"].metrics["flops"]) or 0 for name, data in graph.nodes(data=True)}
    largest = max((v for n, v in flops.items() if graph.nodes[n]["status"] != "removed"), default=0)
    total = inspection.value(inspection.shown.totals["flops"]) or 0
    lines = ["digraph fxreduce {", f"  label={_quote(inspection.headline())}; labelloc=t; labeljust=l; fontsize=16; "
             'fontname="Helvetica"; rankdir=TB; nodesep=0.25; ranksep=0.3;',
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, fillcolor="#ffffff", '
             'color="#6b7280"];',
             '  edge [color="#555555", arrowsize=0.6];']
    collapsed = inspection.collapsed
    member = {name: group for group, names in collapsed.items() for name in names}
    index = {name: i for i, name in enumerate(graph.nodes)}
    drawn: set[str] = set()
    for name, data in graph.nodes(data=True):
        group = member.get(name)
        if group is not None:
            if group not in drawn:
                drawn.add(group)
                names = collapsed[group]
                attributes = {"label": f"{len(names)} unchanged nodes\n{names[0]} ... {names[-1]}",
                              "style": "rounded,filled,dashed", "fillcolor": "#f3f4f6", "fontcolor": "#4b5563",
                              "tooltip": "collapsed run: " + ", ".join(names[:40])}
                if ids:
                    attributes["id"] = group
                lines.append(f"  {_quote(group)} {_attrs(attributes)};")
            continue
        row, status = data["row"], data["status"]
        share = 100 * flops[name] / total if total else 0.0
        text = [row.name if row.target == row.name else f"{row.name}\n{cut(row.target, 40)}",
                cut(printer.shape_text(row.shape), 48)]
        if flops[name]:
            text.append(f"{number(flops[name])} FLOPs ({share:.1f}%)")
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
    for removed, anchor in inspection.anchors.items():
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
    if inspection.is_diff:
        lines += ["  subgraph cluster_legend {", '    label="legend"; style=solid; color="#cccccc"; fontsize=10;',
                  f'    "legend:rewritten" [label="added / rewritten", fillcolor="{HIGHLIGHT_COLOR}"];',
                  f'    "legend:removed" [label="removed (beside its replacement)", style="rounded,dashed", '
                  f'color="{REMOVED_COLOR}", fontcolor="{REMOVED_COLOR}"];',
                  f'    "legend:same" [label="unchanged (shade: FLOPs)", fillcolor="{_shade(1.0)}"];', "  }"]
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_svg(inspection: Inspection, ids: bool) -> str:
    """SVG drawn by Graphviz ``dot`` (a subprocess), from ``to_dot(inspection, ids)``."""
    executable = shutil.which("dot")
    if executable is None:
        raise RenderError("cannot draw SVG: the Graphviz 'dot' program is not on PATH", where="Inspection.to_svg",
                          fix="install graphviz (apt-get install graphviz) or use format=dot")
    result = subprocess.run([executable, "-Tsvg"], input=to_dot(inspection, ids), capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or ["no message"])[0]
        raise RenderError(f"Graphviz dot failed: {message}", where="Inspection.to_svg",
                          fix="write format=dot and run dot on it to see the full error")
    return result.stdout


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _attrs(attributes: Mapping[str, str]) -> str:
    return "[" + ", ".join(f"{k}={_quote(v)}" for k, v in attributes.items()) + "]"


def _shade(intensity: float) -> str:
    """White -> _SHARE_COLOR as ``intensity`` goes 0 -> 1."""
    return "#" + "".join(f"{round(255 - (255 - c) * intensity):02x}" for c in _SHARE_COLOR)
