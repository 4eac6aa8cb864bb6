"""remove_dropout: eval-mode dropout (the identity) removed, in every dialect; training-mode dropout stays."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import fxreduce as fr
from fxreduce.graph import find_layers
from fxreduce.testing import check_contract, models


class BothDialects(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.drop = nn.Linear(4, 4), nn.Dropout(0.3)

    def forward(self, x):
        return F.dropout(self.drop(self.fc(x)), 0.2, training=self.training)


def test_module_and_functional_dropout_are_removed_in_eval_mode():
    gm = fr.trace(BothDialects().eval(), (torch.randn(3, 4),), {"N": (0, 0)})
    assert len(find_layers(gm, ["dropout"])) == 2
    result = fr.apply(gm, "remove_dropout")
    assert find_layers(result.graph_module, ["dropout"]) == []
    assert [r.rewrite.what for r in result.report.steps[0].rewrites] == ["eval-mode dropout is the identity"] * 2
    assert check_contract("remove_dropout", BothDialects().eval(), (torch.randn(3, 4),), dynamic={"N": (0, 0)}).ok


def test_training_mode_dropout_is_left_alone_with_the_reason():
    result = fr.apply(fr.trace(BothDialects().train(), (torch.randn(3, 4),)), "remove_dropout")
    reasons = [s.reason for s in result.report.steps[0].skipped]
    assert len(reasons) == 2 and all("training mode is not the identity" in r for r in reasons)


@settings(max_examples=6, deadline=None)
@given(generated=models())
def test_generated_models_keep_their_outputs(generated):
    result = check_contract("remove_dropout", generated.module.eval(), generated.example_inputs,
                            dynamic=generated.dynamic, trials=2)
    assert result.ok, str(result)
