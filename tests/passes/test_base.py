"""passes/base.py: the order check (torch.fx's requires / ensures), describe(), the shared layer selection."""

import pytest
import torch
from torch import nn

import fxreduce as fr
from fxreduce import meta
from fxreduce.errors import OptionError, PassError
from fxreduce.passes import REGISTRY, LayerSelection

LAYER_PASSES = ["decompose_lstm", "error_map_pruning", "fold_batchnorm", "lower_int8", "remove_dropout",
                "sparse_lowrank", "structured_dropout"]


class TaggedLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.lstm = nn.LSTM(6, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        out, _ = self.lstm(self.drop(x))
        return self.head(out)


def traced_lstm():
    return fr.trace(TaggedLSTM().train(), (torch.randn(5, 3, 6),), {"N": (0, 1)})


def cnn_with_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 10))
    return fr.trace(model.eval(), (torch.randn(2, 3, 32, 32),), {"N": (0, 0), "H": (0, 2), "W": (0, 3)})


def mlp():
    return fr.trace(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval(), (torch.randn(4, 16),),
                    {"N": (0, 0)})


@pytest.mark.parametrize("graph, first, second, kinds", [
    (cnn_with_batchnorm, "dynamic_resolution(resolutions=(32, 16))", "fold_batchnorm", "batchnorm"),
    (mlp, "lower_int8", "sparse_lowrank(rank=2)", "linear"),
    (mlp, "lower_int8", "error_map_pruning(linear=True)", "linear"),
])
def test_a_pass_after_one_that_took_out_every_layer_it_rewrites_fails_naming_both(graph, first, second, kinds):
    gm = graph()
    victim = second.partition("(")[0]
    culprit = first.partition("(")[0]
    with pytest.raises(PassError, match=f"pass {victim} rewrites {kinds} layers, which the earlier pass {culprit} "
                                        f"took out of the graph at pass {victim}; run {victim} before {culprit}"):
        fr.apply(gm, f"{first},{second}")


def test_separate_applies_are_checked_by_the_requires_hook_on_the_graph_itself():
    gm = mlp()
    lowered = fr.apply(gm, "lower_int8").graph_module
    assert meta.removed_properties(lowered) == {"linear": "lower_int8"}
    assert meta.removed_properties(gm) == {} and meta.HELD not in lowered.meta
    with pytest.raises(PassError, match="run sparse_lowrank before lower_int8"):
        fr.apply(lowered, "sparse_lowrank")
    with pytest.raises(PassError, match="run sparse_lowrank before lower_int8"):
        REGISTRY["sparse_lowrank"]()(lowered)


def test_only_kinds_a_pass_took_out_are_recorded_and_what_remains_still_runs():
    lstm_model = traced_lstm()
    decomposed = fr.apply(lstm_model, "decompose_lstm,structured_dropout").graph_module
    assert set(meta.removed_properties(decomposed)) <= {"dropout"}
    in_training = fr.trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train(), (torch.randn(2, 3, 8, 8),))
    kept = fr.apply(in_training, "fold_batchnorm")
    assert "training mode" in str(kept.report)
    assert meta.removed_properties(kept.graph_module) == {}
    partly = fr.apply(cnn_with_batchnorm(), "lower_int8(layers='5'),error_map_pruning")
    assert len(partly.report.steps[1].rewrites) == 1
    assert meta.removed_properties(partly.graph_module) == {"linear": "lower_int8", "conv2d": "error_map_pruning"}
    assert len(fr.apply(cnn_with_batchnorm(), "fold_batchnorm,dynamic_resolution(resolutions=(32, 16))")
               .report.steps[0].rewrites) == 1


def test_every_pass_that_rewrites_layers_selects_them_with_the_same_option():
    for name in LAYER_PASSES:
        assert issubclass(REGISTRY[name].Options, LayerSelection), name
        option = next(item for item in REGISTRY[name].describe()["options"] if item["name"] == "layers")
        assert option["default"] == "*" and "glob over layer names" in option["help"]
    with pytest.raises(OptionError, match="needs a non-empty glob"):
        fr.Pipeline("fold_batchnorm(layers=' ')")


def test_the_layers_glob_matches_module_paths_node_names_and_lstm_gates():
    gm = traced_lstm()
    head_only = fr.apply(gm, "sparse_lowrank(layers='head', rank=1)").report
    assert [r.rewrite.replaced for r in head_only.steps[0].rewrites] == [["head"]]
    gate_only = fr.apply(gm, "sparse_lowrank(layers='lstm.hh_l0', rank=2)").report
    (rewrite,) = gate_only.steps[0].rewrites
    assert "hh_l0" in rewrite.rewrite.what and "ih_l0" not in rewrite.rewrite.what
    nothing = fr.apply(gm, "structured_dropout(layers='no_such_layer')").report
    assert not nothing.steps[0].rewrites


def test_describe_is_what_the_cli_lists():
    described = REGISTRY["fold_batchnorm"].describe()
    assert described["needs"] == ["batchnorm"] and described["invalidates"] == ["batchnorm"]
    assert [option["name"] for option in described["options"]] == ["layers"]
    assert described["contract"].startswith("exact:")


def test_a_pass_run_again_after_itself_finds_nothing_rather_than_failing():
    twice = fr.apply(mlp(), "lower_int8,lower_int8").report
    assert len(twice.steps[0].rewrites) == 2 and "nothing to rewrite" in str(twice).split("\n", 2)[-1]
