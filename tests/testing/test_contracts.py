"""testing/contracts.py: check_contract catches a broken pass, names it, and tries other sizes of each dim."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import fxreduce as fr
from fxreduce.errors import ContractError
from fxreduce.graph import find_layers, replace_layer
from fxreduce.passes import Contract, Pass, Rewrite, option, register
from fxreduce.testing import check_contract, random_inputs


@dataclass
class ScaleOptions:
    scale: float = option(1.0, "factor on every Linear's output (1: exact)")


class Scaled(nn.Module):
    def __init__(self, linear: nn.Linear, scale: float):
        super().__init__()
        self.linear, self.scale = linear, scale

    def forward(self, x):
        return self.linear(x) * self.scale


@register
class ScaleLinears(Pass):
    """Exact at scale 1; any other scale breaks the exact contract it claims (what the test catches)."""

    name = "test_scale_linears"
    summary = "test only"
    contract = Contract("exact", "outputs equal the original's")
    Options = ScaleOptions

    def rewrite(self, gm, outcome):
        for layer in find_layers(gm, ["linear"]):
            new = replace_layer(gm, layer, Scaled(layer.as_linear(), self.options.scale), pass_name=self.name)
            outcome.rewrites.append(Rewrite([layer.node.name], [new.name], "scaled", self.contract))


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def test_an_exact_pass_holds_on_the_example_and_on_other_sizes():
    result = check_contract("test_scale_linears", model(), (torch.randn(5, 4),), dynamic={"N": (0, 0)}, trials=3)
    assert result.ok and result.checks[0].inputs_checked == 4
    assert "holds on 4 input(s)" in str(result)
    result.raise_if_broken()


def test_a_broken_contract_is_reported_per_input_and_raised_with_the_pass_named():
    result = check_contract("test_scale_linears(scale=1.5)", model(), (torch.randn(5, 4),), dynamic={"N": (0, 0)})
    assert not result.ok
    assert len(result.checks[0].failures) == 4
    assert "BROKEN" in str(result) and "on inputs of shape (5, 4): output 0 differs by" in str(result)
    with pytest.raises(ContractError, match="pass test_scale_linears breaks its contract"):
        result.raise_if_broken()


def test_random_inputs_vary_every_symbolic_dim_and_keep_the_fixed_ones():
    gm = fr.trace(model(), (torch.randn(5, 4),), {"N": (0, 0)})
    samples = random_inputs(gm, trials=6, seed=1)
    assert samples[0][0].shape == (5, 4)
    assert {x.shape[1] for (x,) in samples} == {4}
    assert len({x.shape[0] for (x,) in samples}) > 1 and min(x.shape[0] for (x,) in samples) >= 2
