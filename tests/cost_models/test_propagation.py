"""cost_models/propagation.py: capture-time shapes in named dims, kept symbolic through the ops that pin them."""

import pytest
import sympy
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import BertConfig, BertModel

import fxreduce as fr
from fxreduce.cost_models import symbol

N, H, W, R = (symbol(s) for s in ("N", "H", "W", "R"))


def test_bert_is_captured_through_export_and_costed_like_torch_plus_attention():
    """torch counts BERT's matrix products on CPU but not its attention kernel; fxreduce counts both."""
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=500, max_position_embeddings=64)
    model = BertModel(config).eval()
    gm = fr.trace(model, (torch.randint(0, 500, (2, 12)),), {"N": (0, 0), "T": (0, 1)})
    assert gm.meta["fxreduce"].method == "torch.export"
    ids = torch.randint(0, 500, (1, 20))
    with FlopCounterMode(display=False) as counter:
        model(ids)
    attention = 2 * sdpa_flop_count((1, 4, 20, 16), (1, 4, 20, 16), (1, 4, 20, 16))  # two layers
    assert fr.cost(gm).at(N=1, T=20).flops == counter.get_total_flops() + attention
    result = fr.apply(gm, "fold_batchnorm,remove_dropout,eliminate_dead_code")
    assert len(result.report.steps[1].rewrites) > 0
    torch.testing.assert_close(result.graph_module(ids), gm(ids))


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
