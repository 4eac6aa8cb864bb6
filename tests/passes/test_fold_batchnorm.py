"""fold_batchnorm: eval-mode BatchNorm folded into the Conv2d / Linear before it, exactly."""

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import fxreduce as fr
from fxreduce.graph import find_chains, find_layers
from fxreduce.testing import check_contract, models


def with_statistics(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their defaults, so a fold that forgot one shows."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                if module.affine:
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-1, 1)
    return model.eval()


@settings(max_examples=8, deadline=None)
@given(generated=models(kinds=("cnn",)))
def test_every_conv_batchnorm_chain_folds_and_outputs_stay_equal(generated):
    model = with_statistics(generated.module)
    result = check_contract("fold_batchnorm", model, generated.example_inputs, dynamic=generated.dynamic, trials=2)
    assert result.ok, str(result)
    gm = fr.trace(model, generated.example_inputs, generated.dynamic)
    folded = fr.apply(gm, "fold_batchnorm")
    assert find_chains(folded.graph_module, ("conv2d", "batchnorm")) == []
    # One rewrite per BatchNorm folded (conv -> BN -> BN folds twice, the second BN into the folded conv).
    folded_away = len(find_layers(gm, ["batchnorm"])) - len(find_layers(folded.graph_module, ["batchnorm"]))
    assert len(folded.report.steps[0].rewrites) == folded_away >= len(find_chains(gm, ("conv2d", "batchnorm")))


def test_a_linear_then_batchnorm1d_folds_on_2d_inputs_and_is_left_alone_on_3d():
    flat = with_statistics(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)))
    result = check_contract("fold_batchnorm", flat, (torch.randn(5, 6),), dynamic={"N": (0, 0)})
    assert result.ok, str(result)
    assert find_layers(fr.apply(fr.trace(flat, (torch.randn(5, 6),)), "fold_batchnorm").graph_module,
                       ["batchnorm"]) == []

    class Sequence(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(6, 4), nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(self.fc(x))

    report = fr.apply(fr.trace(with_statistics(Sequence()), (torch.randn(2, 3, 6),)), "fold_batchnorm").report
    assert "folds only for 2-D (batch, features) outputs" in str(report)


def test_two_batchnorms_in_a_row_fold_into_one_conv():
    model = with_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)))
    result = check_contract("fold_batchnorm", model, (torch.randn(2, 3, 8, 8),))
    assert result.ok, str(result)
    folded = fr.apply(fr.trace(model, (torch.randn(2, 3, 8, 8),)), "fold_batchnorm")
    assert len(folded.report.steps[0].rewrites) == 2 and find_layers(folded.graph_module, ["batchnorm"]) == []


@pytest.mark.parametrize("layers, folded", [("*", 2), ("1", 1), ("nothing*", 0)])
def test_the_layers_option_picks_batchnorms_by_name(layers, folded):
    model = with_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                          nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)))
    result = fr.apply(fr.trace(model, (torch.randn(2, 3, 12, 12),)), f"fold_batchnorm(layers={layers!r})")
    assert len(result.report.steps[0].rewrites) == folded
