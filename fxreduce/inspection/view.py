"""The view model every renderer reads: one row per node, symbolic totals, and a printer for one point.

Rows are read from what fxreduce.trace and the passes leave in node meta, so nothing here runs the
model. Node costs repeat a lot (every conv of a stage has the same shape), so the printer prints and
evaluates each distinct expression once; that keeps rendering linear in the node count.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import sympy
import torch
import torch.fx as fx

from .. import meta
from ..cost_models import GraphCost, NodeCost, graph_info
from ..errors import CostError
from ..text import count, formula

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


class Printer:
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

    def values(self, change: NodeChange, metric: str) -> tuple[Any, Any]:
        """``metric`` of ``change`` before and after at this point; a side the node lacks counts 0."""
        old = self.value(change.before.metrics[metric]) if change.before else 0
        new = self.value(change.after.metrics[metric]) if change.after else 0
        return old, new

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


def graph_view(gm: fx.GraphModule, cost: GraphCost) -> GraphView:
    """``gm``'s rows and totals, titled by where the graph came from and how it was captured."""
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
    info = graph_info(gm)
    title = f"{info.source or type(gm).__name__} ({info.method})"
    return GraphView(title, rows, totals, tuple(cost.symbols), dict(cost.specialised))


def evaluation_point(costs: Sequence[GraphCost], gms: Sequence[fx.GraphModule], at: Mapping[str, int] | None):
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


def node_changes(before: GraphView, after: GraphView) -> list[NodeChange]:
    """Removed, then added and changed nodes in ``after``'s order, each with why it changed."""
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


def number(value: int | float | None) -> str:
    """Compact: exact below 10,000, then K/M/G/T/P with three significant digits."""
    return count(value, exact_below=10_000)


def subtract(new: Any, old: Any) -> Any:
    """new - old of two evaluated values, None where either is unknown."""
    return None if new is None or old is None else new - old


def percent(old: Any, new: Any) -> float | None:
    """Reduction in percent: 100 (old - new) / old."""
    if old is None or new is None or old == 0:
        return None
    return 100.0 * (old - new) / old


def cut(text: str, width: int) -> str:
    """``text`` shortened to ``width`` characters, at a term boundary where there is one."""
    if len(text) <= width:
        return text
    head = text[: width - 4]
    space = head.rfind(" ")
    if space > width // 2:
        head = head[:space]
    return head + " ..."
