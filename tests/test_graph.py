"""graph.py: one layer view over call_module, functional and aten forms; networkx queries."""

import torch
import torch.nn.functional as F

import fxreduce as fr
from fxreduce.graph import dominators, find_chains, find_layers, region_between


class Mixed(torch.nn.Module):
    """The same layer kinds as modules and as functions."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.weight = torch.nn.Parameter(torch.randn(5, 4))
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, x):
        y = self.bn(self.conv(x))
        y = F.conv2d(y, self.conv.weight.new_ones(4, 4, 1, 1)) + y
        y = F.dropout(y.mean((2, 3)), 0.1, self.training)
        return F.linear(self.drop(y), self.weight)


def test_layers_found_in_every_dialect():
    model = Mixed().eval()
    x = torch.randn(2, 3, 8, 8)
    fx_graph = fr.trace(model, (x,), method="fx")
    aten_graph = fr.trace(model, (x,), method="export")
    for gm, dialects in ((fx_graph, {"module", "function"}), (aten_graph, {"aten"})):
        layers = find_layers(gm)
        kinds = sorted(layer.kind for layer in layers)
        assert kinds == ["batchnorm", "conv2d", "conv2d", "dropout", "dropout", "linear"], kinds
        assert {layer.dialect for layer in layers} == dialects
        linear = next(layer for layer in layers if layer.kind == "linear")
        assert torch.equal(linear.weight, model.weight)
        assert all(not layer.attrs["training"] for layer in layers if layer.kind in ("dropout", "batchnorm"))
        assert [[layer.kind for layer in chain] for chain in find_chains(gm, ("conv2d", "batchnorm"))] == \
            [["conv2d", "batchnorm"]]


def test_shipped_passes_rewrite_both_dialects_the_same():
    model = Mixed().eval()
    x = torch.randn(2, 3, 8, 8)
    for method in ("fx", "export"):
        gm = fr.trace(model, (x,), {"N": (0, 0)}, method=method)
        result = fr.apply(gm, "fold_batchnorm,remove_dropout,eliminate_dead_code")
        assert [len(step.rewrites) > 0 for step in result.report.steps[:2]] == [True, True], method
        torch.testing.assert_close(result.graph_module(x), model(x))
        assert not find_layers(result.graph_module, ["dropout", "batchnorm"])


def test_region_and_dominators():
    gm = fr.trace(Mixed().eval(), (torch.randn(2, 3, 8, 8),))
    nodes = {n.name: n for n in gm.graph.nodes}
    region = region_between(gm, nodes["conv"], nodes["add"])
    assert {"conv", "bn", "conv2d", "add"} <= region and "linear" not in region
    idom = dominators(gm)
    assert idom["add"] == "bn" and idom["bn"] == "conv"
