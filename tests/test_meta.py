"""meta.py: the keys fxreduce writes into node and graph meta, read through one set of accessors."""

import torch
from torch import nn

import fxreduce as fr
from fxreduce import meta
from fxreduce.graph import find_layers, replace_layer


def test_propagation_and_replace_layer_write_what_the_accessors_read():
    gm = fr.trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), (torch.randn(3, 4),), {"N": (0, 0)})
    first = list(gm.graph.nodes)[1]
    assert meta.info(gm).symbolic == ("N",)
    assert [str(size) for size in meta.shape(first)] == ["N", "8"]
    assert meta.rewritten_by(first) is None and meta.replaced(first) is None
    (layer, _) = find_layers(gm, ["linear"])
    new = replace_layer(gm, layer, nn.Linear(4, 8), pass_name="example")
    assert meta.rewritten_by(new) == "example" and meta.replaced(new) == layer.node.name
    meta.add_details(new, error=0.5)
    meta.add_details(new, rows=3)
    assert meta.details(new) == {"error": 0.5, "rows": 3}


def test_set_mode_switches_modules_and_leaves_exported_graphs_alone():
    model = nn.Dropout(0.5)
    meta.set_mode(model, False)
    assert not model.training
    exported = torch.export.export(nn.Linear(2, 2), (torch.randn(1, 2),)).module()
    meta.set_mode(exported, True)
