"""Text as people read it: counts (``1.23M``), one-line error summaries, and formulas.

Formulas as a person writes them: ``ceil(H/32)`` where sympy keeps ``floor(H/32 - 1/32) + 1``.

Shapes of strided convolutions and pools come out of the shape propagation as ``floor((H + a)/s) + 1``,
nested once per stride. For integer-valued ``n`` and positive integers ``s``, ``a``, ``b``:

    floor(n/s) + 1         = ceil((n + 1)/s)
    ceil((ceil(n/a) + k)/b) = ceil((n + a*k)/(a*b))      (and the same with floor)

so :func:`readable` rewrites with those two identities only, which hold for every integer size, then
pulls common factors out of sums (``2*N*(...)``). The result is for reading (tables, reports, the HTML
page); JSON keeps the exact sympy string beside it.
"""

from __future__ import annotations

import functools

import sympy
from sympy.printing.str import StrPrinter

__all__ = ["count", "error_summary", "first_line", "first_sentence", "formula", "joined_names", "readable"]

_SUFFIXES = (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3))


def count(value: float | int | sympy.Basic | None, *, exact_below: float = 1e3) -> str:
    """A count with a K/M/G/T/P suffix and three significant digits (``45.6M``); shown as it is below
    ``exact_below``; a formula (not a number) as its text; None as ``?``."""
    if value is None:
        return "?"
    if isinstance(value, sympy.Basic) and not value.is_Number:
        return str(value)
    number = float(value)
    if abs(number) < exact_below:
        return str(value) if isinstance(value, int) else f"{number:.4g}"
    suffix, scale = next(((s, v) for s, v in _SUFFIXES if abs(number) >= v), ("", 1.0))
    return f"{number / scale:.3g}{suffix}"


def joined_names(names: list[str], shown: int = 4) -> str:
    """Node names joined by +; a long list (a pass replacing every BatchNorm) names the first few and counts the rest."""
    if len(names) <= shown + 1:
        return " + ".join(names)
    return " + ".join(names[:shown]) + f" + {len(names) - shown} more"


def first_line(error: BaseException) -> str:
    """The first line of an error's message (torch's run to paragraphs), or ''."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def first_sentence(error: BaseException) -> str:
    """The first sentence of an error's first line: what happened, without the advice that follows."""
    return first_line(error).split(". ")[0]


def error_summary(error: BaseException) -> str:
    """``TypeError: <first line>``: a caught error, said in one line inside one of ours."""
    return f"{type(error).__name__}: {first_line(error)}"


def _ratio(expr: sympy.Expr) -> tuple[sympy.Expr, int] | None:
    """``expr`` as (integer-valued numerator, integer denominator > 1), or None."""
    numerator, denominator = sympy.fraction(sympy.together(expr))
    if not (denominator.is_Integer and denominator > 1 and numerator.is_integer):
        return None
    return sympy.expand(numerator), int(denominator)


def _merge_nested(function: type, expr: sympy.Expr) -> sympy.Expr:
    """ceil((ceil(n/a) + k)/b) -> ceil((n + a*k)/(a*b)); floor alike. Anything else is returned as is."""
    parts = _ratio(expr.args[0])
    if parts is None:
        return expr
    numerator, outer = parts
    inner = [term for term in sympy.Add.make_args(numerator) if isinstance(term, function)]
    if len(inner) != 1:
        return expr
    rest = numerator - inner[0]
    nested = _ratio(inner[0].args[0])
    if not rest.is_Integer or nested is None:
        return expr
    inner_numerator, denominator = nested
    return function((inner_numerator + denominator * rest) / (denominator * outer))


def _rewrite(expr: sympy.Expr) -> sympy.Expr:
    """Every floor(n/s) as ceil((n + 1)/s) - 1, nested ceilings merged, innermost first."""
    if expr.is_Atom or not expr.has(sympy.floor, sympy.ceiling):
        return expr
    rewritten = expr.func(*(_rewrite(arg) for arg in expr.args))
    if isinstance(rewritten, sympy.floor):
        parts = _ratio(rewritten.args[0])
        if parts is not None:
            numerator, denominator = parts
            return _merge_nested(sympy.ceiling, sympy.ceiling((numerator + 1) / denominator)) - 1
    if isinstance(rewritten, (sympy.floor, sympy.ceiling)):
        return _merge_nested(rewritten.func, rewritten)
    return rewritten


def _merge_floors(expr: sympy.Expr) -> sympy.Expr:
    """floor((floor(n/a) + k)/b) -> floor((n + a*k)/(a*b)), innermost first (pools keep their floors)."""
    if expr.is_Atom or not expr.has(sympy.floor):
        return expr
    rewritten = expr.func(*(_merge_floors(arg) for arg in expr.args))
    return _merge_nested(sympy.floor, rewritten) if isinstance(rewritten, sympy.floor) else rewritten


def _grouped(expr: sympy.Expr) -> sympy.Expr:
    """Common symbolic factors pulled out of a sum (``N*(...)``); numbers stay on their terms."""
    factored = sympy.factor_terms(expr)
    if not isinstance(factored, sympy.Mul):
        return factored
    number, rest = factored.as_coeff_Mul()
    sums = [f for f in sympy.Mul.make_args(rest) if isinstance(f, sympy.Add)]
    if len(sums) != 1:
        return factored
    others = [f for f in sympy.Mul.make_args(rest) if f is not sums[0]]
    return sympy.Mul(*others, sympy.expand(number * sums[0]))


@functools.lru_cache(maxsize=65536)
def readable(expr: sympy.Basic) -> sympy.Basic:
    """``expr`` with floor/ceil divisions simplified and common factors pulled out; equal for integer sizes.

    Of the ceil form and the floor form (nested floors merged), the shorter is kept, so ``floor(H/2)``
    of a pool stays a floor.
    """
    expr = sympy.sympify(expr)
    if not isinstance(expr, sympy.Expr) or expr.is_Atom:
        return expr
    if expr.has(sympy.floor, sympy.ceiling):
        expr = min((_merge_floors(expr), sympy.expand(_rewrite(expr))), key=sympy.count_ops)
    return _grouped(expr)


class _Printer(StrPrinter):
    """sympy's str, with ``ceil`` for ceiling."""

    def _print_ceiling(self, expr: sympy.ceiling) -> str:
        return f"ceil({self._print(expr.args[0])})"


_PRINTER = _Printer()


@functools.lru_cache(maxsize=65536)
def formula(expr: sympy.Basic) -> str:
    """The readable text of ``expr`` (see :func:`readable`)."""
    return _PRINTER.doprint(readable(sympy.sympify(expr)))
