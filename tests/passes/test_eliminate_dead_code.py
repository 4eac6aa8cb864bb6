"""eliminate_dead_code: nodes nothing reads go, with the submodules only they called; outputs stay."""

import torch
from torch import nn

import fxreduce as fr
from fxreduce.testing import check_contract


class WithDeadBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 2), nn.Linear(4, 8)

    def forward(self, x):
        self.unused(x).relu()  # computed, never read
        return self.used(x)


def test_unread_nodes_and_their_submodules_are_removed_and_outputs_stay_equal():
    gm = fr.trace(WithDeadBranch(), (torch.randn(3, 4),), {"N": (0, 0)})
    result = fr.apply(gm, "eliminate_dead_code")
    removed = sorted(name for r in result.report.steps[0].rewrites for name in r.rewrite.replaced)
    assert removed == ["relu", "unused"]
    assert not hasattr(result.graph_module, "unused") and hasattr(gm, "unused")
    assert result.report.certificate.proven
    assert check_contract("eliminate_dead_code", WithDeadBranch(), (torch.randn(3, 4),), dynamic={"N": (0, 0)}).ok


def test_a_graph_without_dead_code_is_reported_unchanged():
    gm = fr.trace(nn.Linear(4, 2), (torch.randn(3, 4),))
    result = fr.apply(gm, "eliminate_dead_code")
    assert "nothing to rewrite" in str(result.report)
