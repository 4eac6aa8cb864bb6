"""Certificates: is the rewritten graph's cost <= the original's for every admissible size?

Dims are positive integers (plus the lower/upper bounds the ShapeEnv learned). A polynomial difference
is proven non-negative by shifting every dim to its lower bound (x = lo + t, t >= 0) and checking that
all coefficients are non-negative. Otherwise the certificate states the break-even condition (solved
for a single dim, factored for several), or is "unproven": floor divisions such as ((H-1)//2)+1 defeat
sympy in general, so the residual is kept and checked numerically over a grid of admissible dims.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Mapping, Union

import sympy

from .symbolic import GraphCost, NodeCost, at_pinned, pinned_dims

Costish = Union[GraphCost, NodeCost, sympy.Expr, int]
GRID_VALUES = (1, 2, 3, 7, 16, 64, 224, 1024)
MAX_GRID_POINTS = 4096


@dataclass(frozen=True)
class Certificate:
    """Outcome of :func:`certify`. ``status`` is "proven", "break_even" or "unproven"."""

    status: str
    metric: str
    before: sympy.Expr
    after: sympy.Expr
    condition: sympy.Basic | None = None
    grid_points: int = 0
    counterexamples: tuple[dict[str, int], ...] = field(default_factory=tuple)
    assumption: str | None = None

    @property
    def reduction(self) -> sympy.Expr:
        """before - after: what the rewrite saves."""
        return sympy.expand(self.before - self.after)

    @property
    def proven(self) -> bool:
        return self.status == "proven"

    def ratio_at(self, **dims: int) -> float:
        values = {s: dims[s.name] for s in (self.before.free_symbols | self.after.free_symbols) if s.name in dims}
        after = self.after.subs(values)
        return float(self.before.subs(values) / after) if after != 0 else float("inf")

    def __str__(self) -> str:
        if self.status == "proven":
            assuming = f", assuming {self.assumption}" if self.assumption else ""
            return f"proven: {self.metric} after <= before for all admissible dims{assuming} (saves {self.reduction})"
        if self.status == "break_even":
            return f"break-even: {self.metric} after <= before iff {self.condition}"
        found = f"; counterexamples e.g. {self.counterexamples[0]}" if self.counterexamples else ""
        return (f"unproven: residual {self.metric} before - after = {self.reduction}; numeric check over "
                f"{self.grid_points} grid points found {len(self.counterexamples)} violation(s){found}")


def _metric(cost: Costish, metric: str) -> sympy.Expr:
    if isinstance(cost, (GraphCost, NodeCost)):
        return sympy.expand(sympy.sympify(getattr(cost, metric)))
    return sympy.expand(sympy.sympify(cost))


def _nonnegative_polynomial(expr: sympy.Expr, lower: Mapping[sympy.Symbol, int]) -> bool:
    shifts = {s: sympy.Dummy(f"t_{s.name}", nonnegative=True) for s in expr.free_symbols}
    shifted = sympy.expand(expr.xreplace({s: lower.get(s, 1) + t for s, t in shifts.items()}))
    return all(c >= 0 for c in sympy.Poly(shifted, *shifts.values()).coeffs())


FLOOR_ASSUMPTION = "every feature map is non-empty, so each floor term of a shape is >= 0"


def _nonnegative_with_floors(expr: sympy.Expr, lower: Mapping[sympy.Symbol, int]) -> bool:
    """Proof for sums of shape products: a floor(...) term in a shape (out = floor(x) + 1 >= 1) is >= 0
    for admissible dims, so treat each as a fresh non-negative variable and check the polynomial."""
    floors = expr.atoms(sympy.floor)
    if not floors:
        return False
    stand_ins = {f: sympy.Dummy(f"f{i}", nonnegative=True) for i, f in enumerate(floors)}
    replaced = sympy.expand(expr.xreplace(stand_ins))
    dims = replaced.free_symbols - set(stand_ins.values())
    if not replaced.is_polynomial(*replaced.free_symbols):
        return False
    shifts = {s: lower.get(s, 1) + sympy.Dummy(f"t_{s.name}", nonnegative=True) for s in dims}
    shifted = sympy.expand(replaced.xreplace(shifts))
    variables = list(shifted.free_symbols)
    if not variables:
        return bool(shifted >= 0)
    return all(c >= 0 for c in sympy.Poly(shifted, *variables).coeffs())


def certify(before: Costish, after: Costish, *, metric: str = "flops",
            constraints: Mapping[str, tuple[int, int | None]] | None = None) -> Certificate:
    """Compare ``metric`` (flops, macs, params, ...) of two costs for all admissible dims."""
    if constraints is None:
        constraints = {}
        for cost in (before, after):
            if isinstance(cost, GraphCost):
                constraints = {**cost.constraints, **constraints}
    dims = {name for cost in (before, after) if isinstance(cost, GraphCost) for name in cost.symbols}
    pinned = pinned_dims(before, after)
    b, a = (at_pinned(_metric(cost, metric), pinned) for cost in (before, after))
    certificate = _certify_difference(b, a, metric, constraints, dims)
    substituted = sorted(name for cost in (before, after) if isinstance(cost, GraphCost)
                         for name in cost.symbols if name in pinned)
    if not substituted:
        return certificate
    stated = ", ".join(f"{name} = {pinned[name]}" for name in substituted) + " (fixed in the other graph)"
    return replace(certificate, assumption="; ".join(filter(None, (certificate.assumption, stated))))


def _certify_difference(b: sympy.Expr, a: sympy.Expr, metric: str,
                        constraints: Mapping[str, tuple[int, int | None]], dims: set[str]) -> Certificate:
    difference = sympy.expand(b - a)
    symbols = sorted(difference.free_symbols, key=lambda s: s.name)
    parameters = [s for s in symbols if dims and s.name not in dims]
    if parameters:
        # Symbols that are not graph dims (e.g. choice probabilities in [0, 1]) are not positive
        # integers: no proof by shifting them; state the condition instead.
        return Certificate("break_even", metric, b, a, condition=sympy.factor(difference) >= 0)
    lower = {s: constraints.get(s.name, (1, None))[0] for s in symbols}
    if not symbols:
        status = "proven" if difference >= 0 else "unproven"
        return Certificate(status, metric, b, a, grid_points=1,
                           counterexamples=() if status == "proven" else ({},))
    if difference.is_polynomial(*symbols) and _nonnegative_polynomial(difference, lower):
        return Certificate("proven", metric, b, a)
    if _nonnegative_with_floors(difference, lower):
        return Certificate("proven", metric, b, a, assumption=FLOOR_ASSUMPTION)
    grid, counterexamples = _grid_check(difference, symbols, constraints)
    if difference.is_polynomial(*symbols):
        if len(symbols) == 1:
            condition = sympy.solve_univariate_inequality(difference >= 0, symbols[0], relational=True)
        else:
            condition = sympy.factor(difference) >= 0
        return Certificate("break_even", metric, b, a, condition=condition, grid_points=grid,
                           counterexamples=tuple(counterexamples))
    return Certificate("unproven", metric, b, a, grid_points=grid, counterexamples=tuple(counterexamples))


def _grid_check(difference: sympy.Expr, symbols: list[sympy.Symbol],
                constraints: Mapping[str, tuple[int, int | None]]) -> tuple[int, list[dict[str, int]]]:
    axes = []
    for s in symbols:
        low, high = constraints.get(s.name, (1, None))
        values = sorted({v for v in GRID_VALUES + (low,) if v >= low and (high is None or v <= high)})
        axes.append(values)
    while len(axes) and sympy.prod(len(v) for v in axes) > MAX_GRID_POINTS:
        longest = max(range(len(axes)), key=lambda i: len(axes[i]))
        axes[longest] = axes[longest][::2]
    evaluate = sympy.lambdify(symbols, difference, modules=["math"])
    counterexamples, points = [], 0
    for values in itertools.product(*axes):
        points += 1
        if evaluate(*values) < 0:
            counterexamples.append({s.name: v for s, v in zip(symbols, values)})
    return points, counterexamples
