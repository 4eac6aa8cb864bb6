"""cost_models/certificate.py: proofs that a rewrite costs no more, break-even conditions, counterexamples."""

import sympy
import torch

import fxreduce as fr
from fxreduce.cost_models import certify, symbol

N, H, W, R = (symbol(s) for s in ("N", "H", "W", "R"))


def test_certificate_proven_break_even_and_unproven():
    assert certify(N * H * W * 9, N * H * W * 4).proven
    rank = certify(N * 64 * 48, N * R * (64 + 48))
    assert rank.status == "break_even" and "R" in str(rank.condition)
    floors = certify(N * sympy.floor((H - 1) / 2), N * sympy.floor(H / 3))
    assert floors.status == "unproven" and floors.grid_points > 0 and not floors.counterexamples
    worse = certify(N * 4, N * 5)
    assert worse.status == "break_even" and worse.counterexamples


def test_cost_of_rewritten_graph_is_certified_in_report():
    gm = fr.trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval(),
                  (torch.randn(2, 3, 8, 8),), {"N": (0, 0), "H": (0, 2), "W": (0, 3)})
    report = fr.apply(gm, "fold_batchnorm").report
    assert report.certificate.proven
    assert report.before.other != report.after.other


def test_floor_shapes_are_proven_under_the_non_empty_assumption():
    gm = fr.trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.BatchNorm2d(4)).eval(),
                  (torch.randn(2, 3, 9, 9),), {"N": (0, 0), "H": (0, 2), "W": (0, 3)})
    result = fr.apply(gm, "fold_batchnorm")
    other = certify(fr.cost(gm), fr.cost(result.graph_module), metric="other")
    assert other.proven and other.assumption and "non-empty" in str(other)


def test_symbols_that_are_not_graph_dims_are_not_assumed_positive_integers():
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    gm = fr.trace(mlp, (torch.randn(3, 16),), {"N": (0, 0)})
    cost = fr.cost(gm)
    p = sympy.Symbol("p", nonnegative=True)
    shared = fr.GraphCost({"x": fr.cost_models.NodeCost(macs={"float32": N * 10 * p})}, cost.symbols)
    certificate = certify(cost, shared, metric="macs")
    assert certificate.status == "break_even" and "p" in str(certificate.condition)
