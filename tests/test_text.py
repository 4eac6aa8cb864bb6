"""fxreduce.text.readable: the readable form equals the original for every integer size, proven with sympy
(each symbol split into residue classes, where floors and ceilings evaluate exactly) and checked at random
sizes, on the shape and cost formulas of 10 torchvision models."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import sympy
import torch
import torchvision

import fxreduce as fr
from fxreduce.cost_models import symbol
from fxreduce import text
from fxreduce.text import formula, readable

H, W, N = symbol("H"), symbol("W"), symbol("N")
MODELS = ("resnet18", "alexnet", "vgg11", "mobilenet_v2", "squeezenet1_0", "googlenet", "shufflenet_v2_x0_5",
          "mnasnet0_5", "efficientnet_b0", "regnet_x_400mf")
MAX_CLASSES = 4096


def _modulus(expr: sympy.Expr) -> int:
    """An L such that, with every symbol = L*m + r, each floor/ceil argument is an integer polynomial in m
    plus a constant: the lcm over floor/ceil atoms of their denominator times their argument's own L."""
    result = 1
    for atom in expr.atoms(sympy.floor, sympy.ceiling):
        argument = atom.args[0]
        denominator = sympy.fraction(sympy.together(argument))[1]
        result = math.lcm(result, int(denominator) * _modulus(argument))
    return result


def proven_equal(a: sympy.Expr, b: sympy.Expr) -> bool:
    """a == b for every integer value of their symbols: per residue class of each symbol mod L, floors and
    ceilings reduce to polynomials and sympy compares those exactly. Where the classes are too many (H and
    W both under floors), each floor/ceil atom of ``a`` is proven equal to its rewrite on its own (atoms
    are univariate) and then ``b`` must be exactly ``a`` with the atoms rewritten, as polynomials."""
    symbols = sorted((a.free_symbols | b.free_symbols), key=lambda s: s.name)
    symbols = [s for s in symbols if any(s in atom.free_symbols for atom in (a + b).atoms(sympy.floor, sympy.ceiling))]
    modulus = math.lcm(_modulus(a), _modulus(b))
    if modulus ** len(symbols) > MAX_CLASSES:
        return _proven_by_atoms(a, b)
    m = {s: sympy.Symbol(f"m_{s.name}", integer=True) for s in symbols}
    for residues in itertools.product(range(modulus), repeat=len(symbols)):
        point = {s: modulus * m[s] + r for s, r in zip(symbols, residues)}
        if sympy.expand(a.xreplace(point) - b.xreplace(point)) != 0:
            return False
    return True


def _proven_by_atoms(a: sympy.Expr, b: sympy.Expr) -> bool:
    atoms = a.atoms(sympy.floor, sympy.ceiling)
    if any(len(atom.free_symbols) > 1 for atom in atoms):
        raise AssertionError(f"a floor of several symbols in {a}: no proof here")
    for rewrite in (text._rewrite, text._merge_floors):
        mapping = {atom: rewrite(atom) for atom in atoms}
        if sympy.expand(a.xreplace(mapping) - b) == 0:
            return all(proven_equal(atom, new) for atom, new in mapping.items())
    return False


def numerically_equal(a: sympy.Expr, b: sympy.Expr, trials: int = 20) -> bool:
    generator = random.Random(0)
    symbols = sorted((a.free_symbols | b.free_symbols), key=lambda s: s.name)
    for _ in range(trials):
        point = {s: sympy.Integer(generator.randint(1, 5000)) for s in symbols}
        if a.xreplace(point) != b.xreplace(point):
            return False
    return True


def test_conv_output_sizes_print_as_ceil():
    assert formula(sympy.floor(H / 32 - sympy.Rational(1, 32)) + 1) == "ceil(H/32)"
    assert formula(sympy.floor((sympy.floor((H - 1) / 2) + 1 - 1) / 2) + 1) == "ceil(H/4)"
    assert formula(sympy.floor(H / 2)) == "floor(H/2)"  # a pool's floor is as short as it gets
    assert formula(sympy.floor(sympy.floor(H / 2) / 2)) == "floor(H/4)"
    assert formula(N * H * W + 3 * N) == "N*(H*W + 3)"


def test_products_of_floor_plus_one_regroup_into_ceilings():
    fh, fw = sympy.floor((H - 1) / 8), sympy.floor((W - 1) / 8)
    expr = sympy.expand(6 * N * (fh + 1) * (fw + 1) + 2 * N)
    assert formula(expr) == "N*(6*ceil(H/8)*ceil(W/8) + 2)"
    assert proven_equal(expr, readable(expr))


def test_the_proof_catches_an_unequal_rewrite():
    """floor(H/2) + 1 is not ceil(H/2) (they differ at even H): the checks must say so."""
    wrong, right = sympy.ceiling(H / 2), sympy.floor(H / 2) + 1
    assert not proven_equal(wrong, right) and not numerically_equal(wrong, right)


@pytest.fixture(scope="module", params=MODELS)
def formulas(request):
    """Distinct shape entries and node FLOPs formulas of one torchvision model traced with N, H, W symbolic."""
    model = torchvision.models.get_model(request.param, weights=None).eval()
    gm = fr.trace(model, (torch.randn(2, 3, 96, 96),), {"N": (0, 0), "H": (0, 2), "W": (0, 3)})
    shapes, costs = set(), set()
    for node in gm.graph.nodes:
        shape = node.meta["fxreduce"].shape
        for entry in shape if isinstance(shape, tuple) else ():
            if isinstance(entry, sympy.Expr) and entry.free_symbols:
                shapes.add(entry)
    cost = fr.cost(gm)
    costs.update(c.flops for c in cost.nodes.values() if c.flops.free_symbols)
    return request.param, shapes, costs, cost.flops


def test_readable_equals_the_original_for_all_sizes(formulas):
    name, shapes, costs, total = formulas
    assert any(e.has(sympy.floor) for e in shapes), f"{name}: no strided layer, nothing is tested"
    for expr in shapes | costs:
        assert proven_equal(expr, readable(expr)), (name, expr, readable(expr))
    assert numerically_equal(total, readable(total), trials=50), name
    assert "floor(H/2 - 1/2)" not in formula(total)
