"""The cost model: torch's counts per node, training steps, declared module costs, certificates."""

import pytest
import sympy
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertModel

import fxreduce as fr
from fxreduce.cost_models import certify, symbol

N, H, W, R = (symbol(s) for s in ("N", "H", "W", "R"))


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class DeclaresCost(torch.nn.Module):
    """A runtime-style module that declares its own MACs (as fxreduce.modules do)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8, 16))

    def forward(self, x):
        return x @ self.weight.t()

    def fxreduce_macs(self, input_shapes, training=False):
        (n, features), = input_shapes
        return {"gemm": n * features * 8 * (3 if training else 1)}


def test_mlp_formula_and_training_step():
    gm = fr.trace(MLP(), (torch.randn(3, 16),), {"N": (0, 0)})
    cost = fr.cost(gm)
    assert sympy.expand(cost.macs - N * (16 * 32 + 32 * 4)) == 0
    assert cost.flops == 2 * cost.macs
    assert cost.params == 16 * 32 + 32 + 32 * 4 + 4
    assert cost.macs_by_dtype == {"float32": N * (16 * 32 + 32 * 4)}
    step = fr.cost(gm, training=True)
    x = torch.randn(5, 16)
    with FlopCounterMode(display=False) as counter:
        MLP()(x).sum().backward()
    assert step.at(N=5).flops == counter.get_total_flops()
    assert step.nodes["fc2"].backward_macs["float32"] == 2 * N * 32 * 4
    assert step.nodes["fc1"].backward_macs["float32"] == N * 16 * 32  # no input gradient for the data


def test_declared_costs_replace_counted_ones_and_agree():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = DeclaresCost()

        def forward(self, x):
            return self.inner(x)

    from fxreduce.graph import LeafTracer

    gm = fr.trace(Wrapper(), (torch.randn(3, 16),), {"N": (0, 0)}, leaf_modules=[DeclaresCost])
    node = fr.cost(gm).nodes["inner"]
    assert node.declared and node.parts == {"gemm": N * 16 * 8}
    assert fr.cost(gm, training=True).nodes["inner"].backward_macs["float32"] == 2 * N * 16 * 8
    assert LeafTracer([DeclaresCost]).is_leaf_module(DeclaresCost(), "inner")


def test_bert_is_captured_through_export_and_costed_like_torch():
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=500, max_position_embeddings=64)
    model = BertModel(config).eval()
    gm = fr.trace(model, (torch.randint(0, 500, (2, 12)),), {"N": (0, 0), "T": (0, 1)})
    assert gm.meta["fxreduce"].method == "torch.export"
    ids = torch.randint(0, 500, (1, 20))
    with FlopCounterMode(display=False) as counter:
        model(ids)
    assert fr.cost(gm).at(N=1, T=20).flops == counter.get_total_flops()
    result = fr.apply(gm, "fold_batchnorm,remove_dropout,eliminate_dead_code")
    assert len(result.report.steps[1].rewrites) > 0
    torch.testing.assert_close(result.graph_module(ids), gm(ids))


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
    gm = fr.trace(MLP(), (torch.randn(3, 16),), {"N": (0, 0)})
    cost = fr.cost(gm)
    p = sympy.Symbol("p", nonnegative=True)
    shared = fr.GraphCost({"x": fr.cost_models.NodeCost(macs={"float32": N * 10 * p})}, cost.symbols)
    certificate = certify(cost, shared, metric="macs")
    assert certificate.status == "break_even" and "p" in str(certificate.condition)


class ResizeThenConv(torch.nn.Module):
    def __init__(self, mode, antialias):
        super().__init__()
        self.conv, self.mode, self.antialias = torch.nn.Conv2d(3, 4, 3), mode, antialias

    def forward(self, x):
        corners = None if self.mode.startswith("nearest") else False
        return self.conv(torch.nn.functional.interpolate(x, size=(16, 12), mode=self.mode, align_corners=corners,
                                                         antialias=self.antialias))


@pytest.mark.parametrize("mode, antialias", [("nearest", False), ("bilinear", False), ("bilinear", True),
                                             ("bicubic", False), ("nearest-exact", False)])
def test_interpolation_to_a_size_keeps_the_input_dims_symbolic(mode, antialias):
    """torch's interpolation kernels pin every input dim to its example value; the cost model must not."""
    model = ResizeThenConv(mode, antialias)
    gm = fr.trace(model, (torch.randn(2, 3, 32, 40),), {"N": (0, 0), "H": (0, 2), "W": (0, 3)})
    cost = fr.cost(gm)
    assert cost.specialised == {}
    assert sympy.expand(cost.flops - N * 2 * 4 * 27 * 14 * 10) == 0
    x = torch.randn(3, 3, 24, 20)
    assert torch.equal(gm(x), model(x))
