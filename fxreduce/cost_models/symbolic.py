"""Symbolic costs: per fx node and in total, as sympy expressions in the user's named dims.

Conventions, stated once and used everywhere: MACs are multiply-accumulates of matrix products and
convolutions (the ops torch.utils.flop_counter has formulas for), split by dtype; ``flops`` is
2 x MACs, torch's convention, and nothing else; ``other`` counts the remaining arithmetic (one op per
element of a pointwise op's output, per element of a reduction's input). Activation bytes are a naive
traffic model: each computing node reads its tensor inputs once and writes its outputs once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Iterable, Mapping

import sympy

ZERO = sympy.Integer(0)


def _sum(values: Iterable[sympy.Expr]) -> sympy.Expr:
    return sympy.Add(*values) if values else ZERO


def _add_by_key(a: Mapping[str, sympy.Expr], b: Mapping[str, sympy.Expr]) -> dict[str, sympy.Expr]:
    merged = dict(a)
    for key, value in b.items():
        merged[key] = merged.get(key, ZERO) + value
    return merged


@dataclass(frozen=True)
class NodeCost:
    """What one fx node costs. ``backward_*`` are filled only by a training-step count."""

    macs: Mapping[str, sympy.Expr] = field(default_factory=dict)
    other: sympy.Expr = ZERO
    params: sympy.Expr = ZERO
    param_bytes: sympy.Expr = ZERO
    bytes_read: sympy.Expr = ZERO
    bytes_written: sympy.Expr = ZERO
    backward_macs: Mapping[str, sympy.Expr] = field(default_factory=dict)
    backward_other: sympy.Expr = ZERO
    parts: Mapping[str, sympy.Expr] = field(default_factory=dict)
    declared: bool = False

    @property
    def total_macs(self) -> sympy.Expr:
        return _sum(list(self.macs.values()) + list(self.backward_macs.values()))

    @property
    def flops(self) -> sympy.Expr:
        return 2 * self.total_macs

    def subs(self, values: Mapping[sympy.Symbol, object]) -> "NodeCost":
        def sub(expr):
            return sympy.sympify(expr).subs(values) if values else expr

        return replace(
            self,
            macs={k: sub(v) for k, v in self.macs.items()},
            other=sub(self.other),
            params=sub(self.params),
            param_bytes=sub(self.param_bytes),
            bytes_read=sub(self.bytes_read),
            bytes_written=sub(self.bytes_written),
            backward_macs={k: sub(v) for k, v in self.backward_macs.items()},
            backward_other=sub(self.backward_other),
            parts={k: sub(v) for k, v in self.parts.items()},
        )

    def __add__(self, other: "NodeCost") -> "NodeCost":
        return NodeCost(
            macs=_add_by_key(self.macs, other.macs),
            other=self.other + other.other,
            params=self.params + other.params,
            param_bytes=self.param_bytes + other.param_bytes,
            bytes_read=self.bytes_read + other.bytes_read,
            bytes_written=self.bytes_written + other.bytes_written,
            backward_macs=_add_by_key(self.backward_macs, other.backward_macs),
            backward_other=self.backward_other + other.backward_other,
        )


@dataclass(frozen=True)
class GraphCost:
    """The cost of a graph: ``nodes`` maps node names (graph order) to NodeCost.

    ``symbols`` are the dims that stayed symbolic; ``specialised`` the dims that were fixed to a value,
    with the reason (the model fixes the size, or symbolic propagation failed and fell back).
    ``graph_module`` is the graph these costs are of (for :meth:`latency`); ``bound`` the dims :meth:`at`
    substituted.
    """

    nodes: Mapping[str, NodeCost]
    symbols: Mapping[str, sympy.Symbol]
    specialised: Mapping[str, str] = field(default_factory=dict)
    fixed: Mapping[str, sympy.Expr] = field(default_factory=dict)
    constraints: Mapping[str, tuple[int, int | None]] = field(default_factory=dict)
    training: bool = False
    graph_module: Any = field(default=None, compare=False, repr=False)
    bound: Mapping[str, object] = field(default_factory=dict)

    @cached_property
    def total(self) -> NodeCost:
        """All nodes summed; each field is one sympy Add (adding pairwise would be quadratic)."""
        costs = list(self.nodes.values())

        def add(field_name: str) -> sympy.Expr:
            return sympy.Add(*(getattr(c, field_name) for c in costs))

        def add_by_dtype(field_name: str) -> dict[str, sympy.Expr]:
            terms: dict[str, list[sympy.Expr]] = {}
            for c in costs:
                for dtype, value in getattr(c, field_name).items():
                    terms.setdefault(dtype, []).append(value)
            return {dtype: sympy.Add(*values) for dtype, values in terms.items()}

        return NodeCost(macs=add_by_dtype("macs"), other=add("other"), params=add("params"),
                        param_bytes=add("param_bytes"), bytes_read=add("bytes_read"),
                        bytes_written=add("bytes_written"), backward_macs=add_by_dtype("backward_macs"),
                        backward_other=add("backward_other"))

    @property
    def macs(self) -> sympy.Expr:
        return sympy.expand(self.total.total_macs)

    @property
    def flops(self) -> sympy.Expr:
        return sympy.expand(2 * self.total.total_macs)

    @property
    def macs_by_dtype(self) -> dict[str, sympy.Expr]:
        total = self.total
        return {k: sympy.expand(v) for k, v in _add_by_key(total.macs, total.backward_macs).items()}

    @property
    def other(self) -> sympy.Expr:
        total = self.total
        return sympy.expand(total.other + total.backward_other)

    @property
    def params(self) -> sympy.Expr:
        return self.total.params

    @property
    def param_bytes(self) -> sympy.Expr:
        return self.total.param_bytes

    @property
    def bytes_read(self) -> sympy.Expr:
        return sympy.expand(self.total.bytes_read)

    @property
    def bytes_written(self) -> sympy.Expr:
        return sympy.expand(self.total.bytes_written)

    def symbol_values(self, dims: Mapping[str, object]) -> dict[sympy.Symbol, object]:
        from ..errors import CostError

        unknown = sorted(set(dims) - set(self.symbols) - set(self.fixed))
        if unknown:
            known = ", ".join(sorted(self.symbols)) or "none"
            raise CostError(
                f"unknown dim name(s) {', '.join(unknown)}",
                where="GraphCost.at",
                fix=f"the symbolic dims of this graph are: {known}",
            )
        for name, value in dims.items():
            fixed = self.fixed.get(name)
            if fixed is not None and fixed.is_Number and fixed != value:
                raise CostError(
                    f"dim {name} is not symbolic in this graph ({self.specialised[name]}), so its cost at "
                    f"{name}={value} is unknown",
                    where="GraphCost.at",
                    fix=f"trace again with example inputs whose {name} is {value}",
                )
        return {self.symbols[name]: value for name, value in dims.items() if name in self.symbols}

    def at(self, **dims: object) -> "GraphCost":
        """This cost with the named dims substituted (numbers, or other expressions)."""
        values = self.symbol_values(dims)
        return replace(
            self,
            nodes={name: cost.subs(values) for name, cost in self.nodes.items()},
            symbols={k: v for k, v in self.symbols.items() if k not in dims},
            bound={**self.bound, **dims},
        )

    def latency(self, profile: Any = None, **dims: int) -> Any:
        """The graph's predicted latency at ``dims`` (a :class:`~.latency.Latency`: ``.seconds`` and a
        per-node breakdown): the eval forward, or for a training-step cost (``fr.cost(gm, training=True)``)
        forward, backward and an SGD update. Priced with ``profile`` (a Profile, a path, or None for the
        one ``fxreduce calibrate`` wrote)."""
        from ..errors import CostError
        from .latency import Profile, load_profile, predict

        if self.graph_module is None:
            raise CostError("this cost has no graph to predict a latency for", where="GraphCost.latency",
                            fix="take the cost with fxreduce.cost(graph_module)")
        if not isinstance(profile, Profile):
            profile = load_profile(profile)
        return predict(self.graph_module, profile, {**self.bound, **dims}, training=self.training)

    def summary(self) -> dict[str, sympy.Expr]:
        """The headline totals, as a dict (for tables, JSON and reports)."""
        return {
            "flops": self.flops,
            "macs": self.macs,
            "other_ops": self.other,
            "params": self.params,
            "param_bytes": self.param_bytes,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
        }

    def __str__(self) -> str:
        lines = [f"{key:>13}: {value}" for key, value in self.summary().items()]
        if self.specialised:
            lines.append("  specialised: " + "; ".join(f"{k} ({v})" for k, v in self.specialised.items()))
        return "\n".join(lines)


def pinned_dims(*costs: object) -> dict[str, sympy.Expr]:
    """The dims any of ``costs`` (GraphCosts of graphs that run on the same inputs) fixes to a number: they
    compare at that size, also where another graph keeps the dim symbolic."""
    return {name: value for cost in costs if isinstance(cost, GraphCost)
            for name, value in cost.fixed.items() if value.is_Number}


def at_pinned(expr: sympy.Expr, pinned: Mapping[str, sympy.Expr]) -> sympy.Expr:
    """``expr`` with each symbol that names a pinned dim (:func:`pinned_dims`) at its value."""
    return expr.xreplace({s: pinned[s.name] for s in expr.free_symbols if s.name in pinned})
