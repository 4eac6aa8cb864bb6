"""cost_models/symbolic.py: GraphCost formulas per node and in total, training steps, declared module costs."""

import sympy
import torch
from torch.utils.flop_counter import FlopCounterMode

import fxreduce as fr
from fxreduce.cost_models import symbol

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

    from fxreduce.tracing import LeafTracer

    gm = fr.trace(Wrapper(), (torch.randn(3, 16),), {"N": (0, 0)}, leaf_modules=[DeclaresCost])
    node = fr.cost(gm).nodes["inner"]
    assert node.declared and node.parts == {"gemm": N * 16 * 8}
    assert fr.cost(gm, training=True).nodes["inner"].backward_macs["float32"] == 2 * N * 16 * 8
    assert LeafTracer([DeclaresCost]).is_leaf_module(DeclaresCost(), "inner")
