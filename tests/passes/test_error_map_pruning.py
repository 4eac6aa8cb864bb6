"""error_map_pruning: forward unchanged, gradients equal the masked-error-map reference, real backward savings."""

from __future__ import annotations

import pytest
import sympy
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode

import fxreduce as fr
from fxreduce.errors import OptionError
from fxreduce.modules.error_map import ErrorMapConv2d, ErrorMapLinear, kept_count, row_l1_norms, select_channels
from fxreduce.passes.error_map_pruning import ErrorMapPruning
from fxreduce.testing.contracts import check_contract
from fxreduce.testing.distributed import run_distributed
from fxreduce.testing.strategies import cnn_models


def _masked_reference(layer: nn.Module, x: torch.Tensor, delta: torch.Tensor, kept: torch.Tensor, channel_dim: int):
    """Dense gradients of ``layer`` when the error map is zero outside ``kept``."""
    mask_shape = [1] * delta.dim()
    mask_shape[channel_dim] = -1
    mask = torch.zeros(delta.shape[channel_dim]).index_fill_(0, kept, 1).reshape(mask_shape)
    x = x.detach().requires_grad_(True)
    params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    return torch.autograd.grad(layer(x), [x] + params, delta * mask)


def _pruned_gradients(module: nn.Module, x: torch.Tensor, delta: torch.Tensor):
    x = x.detach().requires_grad_(True)
    out = module(x)
    params = [module.weight] + ([module.bias] if module.bias is not None else [])
    return out, torch.autograd.grad(out, [x] + params, delta)


def _close(actual, expected, tolerance=1e-5):
    for a, e in zip(actual, expected, strict=True):
        scale = max(e.abs().max().item(), 1.0)
        assert (a - e).abs().max().item() <= tolerance * scale


@st.composite
def conv_layers(draw):
    groups = draw(st.sampled_from((1, 1, 2, 3)))
    in_channels = groups * draw(st.integers(1, 4))
    out_channels = groups * draw(st.integers(2, 8))
    kernel = draw(st.sampled_from((1, 2, 3, (3, 1))))
    padding = draw(st.sampled_from((0, 1, (1, 0), "same", "valid")))
    stride = 1 if padding == "same" else draw(st.sampled_from((1, 2, (2, 1))))
    dilation = draw(st.sampled_from((1, 2)))
    padding_mode = draw(st.sampled_from(("zeros", "zeros", "reflect", "circular"))) if padding != 0 else "zeros"
    bias = draw(st.booleans())
    torch.manual_seed(draw(st.integers(0, 2**16)))
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, dilation, groups, bias, padding_mode)
    x = torch.randn(draw(st.integers(1, 3)), in_channels, draw(st.integers(5, 9)), draw(st.integers(5, 9)))
    return conv, x, draw(st.floats(0.05, 1.0))


@given(conv_layers())
def test_conv_forward_equal_and_gradients_equal_masked_reference(case):
    conv, x, keep = case
    module = ErrorMapConv2d.from_conv(conv, keep=keep).train()
    out, grads = _pruned_gradients(module, x, delta := torch.randn_like(conv(x)))
    assert torch.equal(out, conv(x))
    per_group = conv.out_channels // conv.groups
    expected_kept = conv.groups * kept_count(per_group, keep)
    if expected_kept == conv.out_channels:
        assert torch.equal(grads[1], torch.autograd.grad(conv(x), conv.weight, delta)[0])
        return
    kept = module.last_kept
    assert kept.numel() == expected_kept
    assert torch.equal(kept, kept.sort().values)  # sorted, and the same count in every group
    per_kept_group = torch.bincount(kept // per_group, minlength=conv.groups).tolist()
    assert per_kept_group == [expected_kept // conv.groups] * conv.groups
    _close(grads, _masked_reference(conv, x, delta, kept, 1))
    pruned = torch.ones(conv.out_channels, dtype=torch.bool).index_fill_(0, kept, False)
    assert grads[1][pruned].abs().max() == 0


@given(st.integers(2, 12), st.integers(2, 12), st.floats(0.05, 1.0), st.booleans(), st.integers(0, 1000))
def test_linear_gradients_equal_masked_reference(in_features, out_features, keep, bias, seed):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias)
    module = ErrorMapLinear.from_linear(linear, keep=keep).train()
    x = torch.randn(2, 3, in_features)
    out, grads = _pruned_gradients(module, x, delta := torch.randn(2, 3, out_features))
    assert torch.equal(out, linear(x))
    if module.prunes:
        _close(grads, _masked_reference(linear, x, delta, module.last_kept, -1))
    else:
        assert module.last_kept is None


def test_keep_one_gives_the_dense_gradients_exactly():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 16, 3, padding=1)
    module = ErrorMapConv2d.from_conv(conv, keep=1.0).train()
    x = torch.randn(2, 4, 8, 8)
    delta = torch.randn(2, 16, 8, 8)
    _, grads = _pruned_gradients(module, x, delta)
    _, dense = _pruned_gradients(conv, x, delta)
    assert all(torch.equal(a, b) for a, b in zip(grads, dense))
    gm = fr.trace(nn.Sequential(conv, nn.ReLU(), nn.Conv2d(16, 8, 3)), (x,))
    assert check_contract("error_map_pruning(keep=1.0)", gm, trials=1).ok


def test_scores_rank_weight_and_error_map_shares():
    torch.manual_seed(1)
    weight = torch.randn(12, 3, 3, 3)
    delta = torch.randn(4, 12, 5, 5)
    norms = delta.abs().sum(dim=(0, 2, 3))
    for score in ((1.0, 0.0), (0.0, 1.0), (1.0, 2.0)):
        w = weight.abs().sum(dim=(1, 2, 3))
        expected = score[0] * w / w.sum() + score[1] * norms / norms.sum()
        kept = select_channels(weight, norms, 1, 5, score, sync=False)
        assert set(kept.tolist()) == set(expected.topk(5).indices.tolist())
    # Groups: the top channels of each group, even if another group's are all larger.
    norms = torch.arange(12.0)
    assert select_channels(weight, norms, 2, 2, (0.0, 1.0), sync=False).tolist() == [4, 5, 10, 11]


def test_a_score_term_weighted_zero_is_not_computed():
    # score=(0, 1) ranks by the error map alone and never reads the weight (a NaN weight cannot leak in).
    weight = torch.full((12, 3, 3, 3), float("nan"))
    norms = torch.arange(12.0)
    assert select_channels(weight, norms, 1, 3, (0.0, 1.0), sync=False).tolist() == [9, 10, 11]


def test_row_l1_norms_in_blocks_equal_the_whole_matrix_norms():
    matrix = torch.randn(600, 4608)  # 10.5 MiB: summed in blocks of 56 rows
    torch.testing.assert_close(row_l1_norms(matrix), matrix.abs().sum(dim=1))


def test_backward_runs_fewer_multiply_adds_not_a_zeroing_hook():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 40, 3, padding=1)
    x = torch.randn(2, 16, 10, 10, requires_grad=True)

    def backward_flops(module):
        out = module(x)
        with FlopCounterMode(display=False) as counter:
            torch.autograd.grad(out, [x, module.weight], torch.randn_like(out))
        return counter.get_total_flops()

    module = ErrorMapConv2d.from_conv(conv, keep=0.25).train()
    assert backward_flops(module) * 40 == backward_flops(conv) * 10
    module.reference = True  # the masked-dense reference saves nothing
    assert backward_flops(module) == backward_flops(conv)


def test_multiple_rounds_kept_counts_up():
    assert [kept_count(64, k, 8) for k in (0.1, 0.3, 0.5)] == [8, 24, 32]
    assert [kept_count(64, k) for k in (0.1, 0.3, 0.5)] == [7, 20, 32]
    assert kept_count(5, 0.9, 8) == 5


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_declared_training_cost_matches_the_counted_dense_cost_and_scales_with_keep():
    x = torch.randn(2, 3, 8, 8)
    gm = fr.trace(_Net().train(), (x,), dynamic={"N": (0, 0), "H": (0, 2), "W": (0, 3)})
    dense = fr.cost(gm, training=True)
    full = fr.cost(fr.apply(gm, "error_map_pruning(keep=1.0)").graph_module, training=True)
    assert sympy.expand(full.flops - dense.flops) == 0  # first conv: no input gradient, as torch counts it
    pruned = fr.apply(gm, "error_map_pruning(keep=0.25)").graph_module
    cost = fr.cost(pruned, training=True)
    n, h, w = (fr.cost_models.symbol(s) for s in "NHW")
    conv1 = cost.nodes["conv1_1"] if "conv1_1" in cost.nodes else cost.nodes["conv1"]
    forward = sum(conv1.macs.values())
    assert sympy.expand(forward - n * h * w * 16 * 27) == 0
    assert sympy.expand(sum(conv1.backward_macs.values()) - forward * 4 / 16) == 0  # weight grad only, 4 of 16
    assert fr.certify(dense, cost).proven


def test_pass_options_are_checked():
    for keep in (0, 0.0, -0.5, 1.5):
        with pytest.raises(OptionError, match="keep"):
            ErrorMapPruning(keep=keep)
    with pytest.raises(OptionError, match="score"):
        ErrorMapPruning(score=(0.0, 0.0))
    with pytest.raises(OptionError, match="multiple"):
        ErrorMapPruning(multiple=0)
    with pytest.raises(OptionError, match="keep"):
        ErrorMapConv2d(3, 4, 3).keep = 2.0


def test_pass_skips_depthwise_and_reports_kept_counts():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 20, 1))
    gm = fr.trace(model, (torch.randn(2, 4, 6, 6),))
    report = fr.apply(gm, "error_map_pruning(keep=0.3, multiple=8)").report
    text = str(report)
    assert "depthwise" in text and "8 of 20 channels" in text


@settings(max_examples=6)
@given(cnn_models(max_layers=4, training=st.booleans()))
def test_contract_on_generated_cnns(generated):
    result = check_contract("error_map_pruning(keep=0.4, linear=True)", generated.module, generated.example_inputs,
                            dynamic=generated.dynamic, trials=1)
    assert result.ok, str(result)


def test_contract_check_catches_wrong_gradients(monkeypatch):
    gm = fr.trace(_Net().train(), (torch.randn(2, 3, 8, 8),))
    after = fr.apply(gm, "error_map_pruning(keep=0.5)").graph_module
    pass_ = ErrorMapPruning(keep=0.5)
    inputs = (torch.randn(2, 3, 8, 8),)
    assert pass_.check(gm, after, inputs) is None
    choose = ErrorMapConv2d.channels_for

    def shifted_in_the_reference(self, weight, delta_norms):
        kept = choose(self, weight, delta_norms)
        return (kept + 1) % weight.shape[0] if self.reference else kept

    monkeypatch.setattr(ErrorMapConv2d, "channels_for", shifted_in_the_reference)
    assert "gradients" in pass_.check(gm, after, inputs)


# --- DDP: the pruned channels agree across ranks -----------------------------------------------------


def _ddp_kept_channels(rank, world_size):
    """Per sync setting: the kept channels of every pruned layer in two DDP steps, and the final parameters."""
    outcome = {}
    for sync in (True, False):
        torch.manual_seed(0)
        gm = fr.trace(_Net().train(), (torch.randn(4, 3, 8, 8),))
        gm = fr.apply(gm, f"error_map_pruning(keep=0.3, linear=True, sync={sync})").graph_module
        model = DistributedDataParallel(gm)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        data = torch.Generator().manual_seed(10 + rank)
        kept = []
        for _ in range(2):
            x, y = torch.randn(4, 3, 8, 8, generator=data), torch.randint(0, 10, (4,), generator=data)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            kept.append({name: m.last_kept.tolist() for name, m in gm.named_modules() if hasattr(m, "last_kept")})
        outcome[sync] = kept, [p.detach() for p in gm.parameters()]
    return outcome


@pytest.mark.slow
def test_ddp_ranks_prune_the_same_channels():
    rank0, rank1 = run_distributed(_ddp_kept_channels, 2)
    (kept0, params0), (kept1, params1) = rank0[True], rank1[True]
    assert kept0 == kept1 and len(kept0[0]) == 3
    assert all(torch.equal(a, b) for a, b in zip(params0, params1, strict=True))
    assert rank0[False][0] != rank1[False][0]  # without the all-reduce the ranks' different data choose differently


class SpelledLinears(nn.Module):
    """A Conv1D-style layer (weight stored (in, out), used by addmm) and one spelled F.linear."""

    def __init__(self):
        super().__init__()
        self.stored_in_out = nn.Parameter(torch.randn(10, 12) / 3)
        self.first_bias = nn.Parameter(torch.randn(12))
        self.second = nn.Parameter(torch.randn(6, 12) / 3)

    def forward(self, x):
        return F.linear(torch.addmm(self.first_bias, x, self.stored_in_out).relu(), self.second)


def test_linear_spellings_are_pruned_with_their_own_parameters():
    gm = fr.trace(SpelledLinears(), (torch.randn(8, 10),), {"N": (0, 0)}, method="fx")
    spec = "error_map_pruning(keep=0.5, linear=True)"
    result = fr.apply(gm, spec)
    assert len(result.report.steps[0].rewrites) == 2, str(result.report)
    pruned = [m for m in result.graph_module.modules() if isinstance(m, ErrorMapLinear)]
    assert pruned[0].weight.shape == (12, 10) and torch.equal(pruned[0].weight, gm.stored_in_out.t())
    assert not hasattr(result.graph_module, "stored_in_out") and not hasattr(result.graph_module, "second")
    assert check_contract(spec, gm, trials=1).ok
