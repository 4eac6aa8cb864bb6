"""The plain-text table of an inspection: what ``str()`` and the CLI print by default.

Cells longer than the width are cut; the JSON rendering keeps every formula whole.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

from .view import METRICS, GraphView, NodeChange, cut, number, percent, subtract

if TYPE_CHECKING:
    from .model import Inspection

_DIFF_COLUMNS = ("flops", "params", "bytes")


def to_table(inspection: Inspection, width: int) -> str:
    """One graph's node table and totals, or a diff's removed / added / changed nodes and totals."""
    printer = inspection.printer
    if inspection.after is None:
        view = inspection.before
        lines = [f"graph {view.title}: {len(view.rows)} nodes", *_header(inspection), ""]
        lines += _node_table(inspection, view, width)
        lines += ["", "totals"]
        lines += _columns(["metric", "formula", "value"],
                          [[key, cut(printer.text(expr), width * 3), number(inspection.value(expr))]
                           for key, expr in view.totals.items()], right={2})
        return "\n".join(lines)
    before, after = inspection.before, inspection.after
    lines = [f"diff {before.title}: {len(before.rows)} -> {len(after.rows)} nodes "
             f"({len(inspection.removed)} removed, {len(inspection.added)} added, "
             f"{len(inspection.changed)} changed)", *_header(inspection)]
    for kind in ("removed", "added", "changed"):
        changes = getattr(inspection, kind)
        if changes:
            lines += ["", f"{kind} ({len(changes)})"] + _change_table(inspection, changes, width)
    lines += ["", "totals"]
    rows = []
    for key in METRICS:
        old, new = inspection.value(before.totals[key]), inspection.value(after.totals[key])
        rows.append([key, number(old), number(new), _signed(subtract(new, old)), _pct(percent(old, new))])
    lines += _columns(["metric", "before", "after", "delta", "reduction"], rows, right={1, 2, 3, 4})
    lines += ["", f"flops before: {cut(printer.text(before.totals['flops']), width * 3)}",
              f"flops after:  {cut(printer.text(after.totals['flops']), width * 3)}"]
    return "\n".join(lines)


def _header(inspection: Inspection) -> list[str]:
    view = inspection.shown
    point = ", ".join(f"{k}={v}" for k, v in inspection.at.items()) or "no symbolic dims"
    lines = [f"dims: {', '.join(view.symbols) or 'none'} symbolic; values at {point} ({inspection.at_source})"]
    specialised = {**inspection.before.specialised, **view.specialised}
    lines.append("specialised: " + ("; ".join(f"{k} ({v})" for k, v in specialised.items()) or "none"))
    return lines


def _node_table(inspection: Inspection, view: GraphView, width: int) -> list[str]:
    printer = inspection.printer
    total = inspection.value(view.totals["flops"]) or 0
    rows = []
    for row in view.rows.values():
        flops = row.metrics["flops"]
        value = inspection.value(flops)
        rows.append([row.name, row.op, cut(row.target, width), cut(printer.shape_text(row.shape), width),
                     cut(printer.text(flops), width), number(value),
                     _pct(100 * value / total if total and value else None),
                     number(inspection.value(row.metrics["params"]))])
    return _columns(["name", "op", "target", "shape", "flops formula", "flops", "share", "params"], rows,
                    right={5, 6, 7})


def _change_table(inspection: Inspection, changes: Iterable[NodeChange], width: int) -> list[str]:
    printer = inspection.printer
    rows = []
    for change in changes:
        row = change.after or change.before
        cells = [row.name, row.op, cut(row.target, width), cut("; ".join(change.reasons), width),
                 cut(printer.shape_text(row.shape), width)]
        for key in _DIFF_COLUMNS:
            old, new = printer.values(change, key)
            cells.append(_signed(subtract(new, old)))
        cells.append(_pct(percent(*printer.values(change, "flops"))))
        rows.append(cells)
    return _columns(["name", "op", "target", "why", "shape", "flops delta", "params delta", "bytes delta",
                     "flops reduction"], rows, right={5, 6, 7, 8})


def _signed(value: int | float | None) -> str:
    if value is None:
        return "?"
    return ("+" if value > 0 else "") + number(value)


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
