"""instance_filter and its training helper: eval untouched, training outputs equal the original on the kept
instances, at least one instance kept, the filter trained from the main losses, FLOPs counted as the paper does."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import sympy
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxreduce as fr
from fxreduce.errors import InputError, OptionError
from fxreduce.modules.instance_filter import InstanceFilter, default_filter
from fxreduce.passes.instance_filter import InstanceFilterPass
from fxreduce.testing.contracts import check_contract
from fxreduce.testing.strategies import cnn_models
from fxreduce.training.on_device import KEEP, KEPT_RATIO, OnDeviceTrainer, ThresholdState, training_step_flops

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "on_device_mnist.py"


class MeanSign(nn.Module):
    """A deterministic filter: High (confidently) iff the instance's mean is positive."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[-20.0], [20.0]]))

    def forward(self, x):
        return self.linear(x.flatten(1).mean(1, keepdim=True))


class AllLow(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([5.0, -5.0]))

    def forward(self, x):
        first = x.flatten(1)[:, :1]
        return self.bias + torch.cat([torch.zeros_like(first), 0.01 * first], 1)


class TwoInputs(nn.Module):
    """Two batched inputs and a dict output: the rewrite must keep signature and structure."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x, weight):
        features = F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1)
        return {"logits": self.head(features) * weight, "features": features}


def _filtered(model, inputs, **options):
    gm = fr.trace(model, inputs, dynamic={"N": (0, 0)})
    return gm, fr.apply(gm, [InstanceFilterPass(**options)]).graph_module


@settings(max_examples=6)
@given(cnn_models(max_layers=4, training=st.booleans()), st.integers(0, 1000))
def test_contract_on_generated_cnns_with_a_filter_that_drops(generated, seed):
    # The filter may keep a single instance, and BatchNorm1d cannot train on one value per channel (torch
    # raises for that batch with or without the filter).
    assume(not any(isinstance(m, torch.nn.BatchNorm1d) for m in generated.module.modules()))
    torch.manual_seed(seed)
    result = check_contract(InstanceFilterPass(filter=MeanSign(), uncertainty=0.0), generated.module,
                            generated.example_inputs, dynamic=generated.dynamic, trials=1)
    assert result.ok, str(result)


def test_training_keeps_the_predicted_high_instances_and_matches_the_original_on_them():
    torch.manual_seed(0)
    model = TwoInputs()
    x = torch.randn(6, 3, 5, 5)
    x[[1, 4]] += 3.0  # positive mean: predicted High
    x[[0, 2, 3, 5]] -= 3.0
    weight = torch.randn(6, 1)
    gm, filtered = _filtered(model, (x, weight), filter=MeanSign(), uncertainty=0.0)
    filtered.train()
    out = filtered(x, weight)
    branch = filtered.get_submodule("instance_filter")
    assert branch.kept.tolist() == [1, 4] and not branch.forced
    assert set(out) == {"logits", "features"}
    expected = model(x[[1, 4]], weight[[1, 4]])
    assert all(torch.allclose(out[k], expected[k], atol=1e-6) for k in expected)
    filtered.eval()
    assert all(torch.equal(a, b) for a, b in zip(filtered(x, weight).values(), model(x, weight).values()))


def test_eval_bypasses_the_filter_net():
    calls = []
    x = torch.randn(4, 3, 5, 5)
    _, filtered = _filtered(nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten()), (x,), filter=MeanSign())
    filtered.get_submodule("instance_filter").net.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        filtered.eval()(x)
        assert not calls
        filtered.train()(x)
        assert calls


def test_uncertainty_sampling_adds_the_most_uncertain_low_instances():
    branch = InstanceFilter(nn.Identity(), (True,), (2,), uncertainty=0.25)
    logits = torch.tensor([[0.0, 3.0], [3.0, 0.0], [0.2, 0.0], [5.0, 0.0], [1.0, 0.0], [4.0, 0.0], [2.0, 0.0],
                           [6.0, 0.0]])
    kept, high = branch.choose(logits)
    assert high.tolist() == [True] + [False] * 7
    assert kept.tolist() == [0, 2, 4]  # High, then ceil(0.25 * 8) = 2 closest to 50/50


def test_a_batch_the_filter_would_drop_entirely_keeps_at_least_one_and_says_so():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 4))
    _, filtered = _filtered(model, (x,), filter=AllLow(), uncertainty=0.0)
    trainer = OnDeviceTrainer(filtered, torch.optim.SGD(filtered.parameters(), lr=0.01))
    result = trainer.step(x, y)
    assert result.forced and result.kept.numel() == 1 and "predicted all 8 instances Low" in result.note
    expected = AllLow()(x)[:, 1].argmax()
    assert result.kept.tolist() == [int(expected)]


def test_training_mode_batchnorm_keeps_two():
    x = torch.randn(8, 3, 6, 6)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 4)).train()
    _, filtered = _filtered(model, (x,), filter=AllLow(), uncertainty=0.0)
    filtered.train()
    filtered(x)
    assert filtered.get_submodule("instance_filter").kept.numel() == 2


def test_bad_filters_and_options_are_rejected():
    x = torch.randn(4, 3, 5, 5)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten())
    gm = fr.trace(model, (x,))
    for bad in (nn.Sequential(nn.Flatten(), nn.Linear(75, 3)), nn.Sequential(nn.Flatten(), nn.Linear(75, 1),
                                                                              nn.Flatten(0))):
        with pytest.raises(OptionError, match="logit pair per instance"):
            fr.apply(gm, [InstanceFilterPass(filter=bad)])
    with pytest.raises(OptionError, match="filter"):
        InstanceFilterPass(filter="lenet")
    with pytest.raises(OptionError, match="target_high_ratio"):
        InstanceFilterPass(target_high_ratio=1.0)
    with pytest.raises(InputError, match="a1"):
        OnDeviceTrainer(gm, torch.optim.SGD(gm.parameters(), lr=0.1), a1=0.9)


def test_default_filter_is_sized_by_the_budget():
    for budget in (5e3, 3e4, 1e5, 1e7):
        net = default_filter((1, 28, 28), budget)
        with FlopCounterMode(display=False) as counter:
            assert net(torch.zeros(1, 1, 28, 28)).shape == (1, 2)
        macs = counter.get_total_flops() // 2
        assert macs <= budget or net[0].out_channels == 4
    assert default_filter((1, 28, 28), 1e7)[0].out_channels == 32
    assert default_filter((20,), None)(torch.zeros(3, 20)).shape == (3, 2)


def test_threshold_adapts_towards_the_target_ratio():
    state = ThresholdState(1.0, a1=2.0, a2=0.5, window=2)
    assert state.update(3, 10, 0.1) == 0.3 and state.value == 2.0  # too many High: raise T
    assert state.update(0, 10, 0.1) == 0.15 and state.value == 4.0  # the window still says too many
    assert state.update(0, 10, 0.1) == 0.0 and state.value == 2.0


def test_filter_learns_from_weighted_cross_entropy_on_the_main_losses():
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 4, (16,))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 4))
    _, filtered = _filtered(model, (x,), filter=MeanSign(), uncertainty=0.25, target_high_ratio=0.25)
    trainer = OnDeviceTrainer(filtered, torch.optim.SGD(filtered.parameters(), lr=0.0), threshold=1.3,
                              reweight=False)
    result = trainer.step(x, y)
    branch = filtered.get_submodule("instance_filter")
    with torch.no_grad():
        losses = F.cross_entropy(model(x[result.kept]), y[result.kept], reduction="none")
        labels = (losses >= 1.3).long()
        weights = torch.tensor([1 / 0.75, 1 / 0.25])
        expected = F.cross_entropy(branch.net(x)[result.kept], labels, weight=weights)
    assert math.isclose(result.filter_loss, expected.item(), rel_tol=1e-5)
    assert result.high_ratio == pytest.approx(float(labels.float().mean()))
    assert result.threshold == pytest.approx(1.3 * (1.05 if result.high_ratio >= 0.25 else 0.95))
    # reweight: each uncertainty-sampled instance stands for all predicted-Low instances of the batch.
    trainer = OnDeviceTrainer(filtered, torch.optim.SGD(filtered.parameters(), lr=0.0), threshold=1.3)
    result = trainer.step(x, y)
    high = branch.predicted_high[result.kept]
    assert 0 < int(high.sum()) < result.kept.numel()
    importance = torch.where(high, 1.0, float((~branch.predicted_high).sum() / (~high).sum()))
    with torch.no_grad():
        per_instance = F.cross_entropy(branch.net(x)[result.kept], labels, reduction="none")
    combined = weights[labels] * importance
    assert result.filter_loss == pytest.approx(float((per_instance * combined).sum() / combined.sum()), rel=1e-5)
    assert result.high_ratio == pytest.approx(float((importance * labels).sum() / importance.sum()))


def test_step_flops_count_main_on_the_kept_and_the_filter_as_the_paper_does():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(128, 4))
    plain_gm, filtered = _filtered(model, (x,), filter=MeanSign(), uncertainty=0.0)
    plain = OnDeviceTrainer(plain_gm, torch.optim.SGD(plain_gm.parameters(), lr=0.0)).step(x, y)
    assert plain.flops == int(fr.cost(plain_gm, training=True).at(N=8).flops)
    result = OnDeviceTrainer(filtered, torch.optim.SGD(filtered.parameters(), lr=0.0)).step(x, y)
    kept = result.kept.numel()
    assert 0 < kept < 8
    net = filtered.get_submodule("instance_filter").net
    with FlopCounterMode(display=False) as counter:
        logits = net(x)
        forward = counter.get_total_flops()
        torch.autograd.grad(logits.sum(), list(net.parameters()))
        backward = counter.get_total_flops() - forward
    expected = plain.flops * kept // 8 + forward + backward * kept // 8
    assert result.flops == expected


def test_symbolic_step_flops_in_keep_and_kept_ratio():
    x = torch.randn(4, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(256, 4))
    gm = fr.trace(model.train(), (x,), dynamic={"N": (0, 0)})
    rewritten = fr.apply(gm, "error_map_pruning(keep=0.25),instance_filter").graph_module
    expression = training_step_flops(rewritten, keep=KEEP, kept_ratio=KEPT_RATIO)
    n = fr.cost_models.symbol("N")
    dense = training_step_flops(gm)
    # alpha = rho = 1 is plain training plus the filter on the whole batch.
    branch = rewritten.get_submodule("instance_filter")
    filter_flops = 2 * sum(branch.per_instance_macs()) * n
    assert sympy.expand(expression.subs({KEEP: 1, KEPT_RATIO: 1}) - dense - filter_flops) == 0
    assert sympy.expand(expression.subs({KEEP: 0.25, KEPT_RATIO: 1}) - training_step_flops(rewritten)) == 0
    saving = 1 - expression.subs({KEEP: 0.25, KEPT_RATIO: 0.25, n: 64}) / dense.subs(n, 64)
    assert 0.5 < saving < 1


def test_a_filter_reading_another_input_restricts_every_batched_input():
    torch.manual_seed(0)
    model = TwoInputs()
    x, weight = torch.randn(6, 3, 5, 5), torch.tensor([[1.0], [-1.0], [-2.0], [3.0], [-1.0], [0.5]])
    gm = fr.trace(model, (x, weight), dynamic={"N": (0, 0)})
    pass_ = InstanceFilterPass(filter=MeanSign(), uncertainty=0.0, input=1)
    after = fr.apply(gm, [pass_]).graph_module
    assert pass_.check(gm, after, (x, weight)) is None
    after.train()(x, weight)
    assert after.get_submodule("instance_filter").kept.tolist() == [0, 3, 5]


def _load_example(monkeypatch):
    spec = importlib.util.spec_from_file_location("on_device_mnist", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # its dataclasses look their module up
    spec.loader.exec_module(example)
    return example


@pytest.mark.slow
def test_example_quick_run_saves_counted_flops(monkeypatch):
    example = _load_example(monkeypatch)
    runs = {(run.model, run.variant): run for run in example.main(["--quick", "--no-progress", "--keep", "0.3"])}
    assert len(runs) == 14
    for model in ("LeNet-5", "ResNet-8"):
        plain = runs[model, "plain"].flops
        assert runs[model, "EMP 0.3"].flops < plain and runs[model, "both 0.3"].flops < runs[model, "EIF"].flops
        assert runs[model, "EIF"].kept_share < 1
        assert runs[model, "random 0.25"].kept_share == pytest.approx(0.25, abs=0.02)
        assert runs[model, "EIF unbiased 0.1"].kept_share < runs[model, "EIF unbiased 0.2"].kept_share < 1


def test_example_flop_budget_is_never_crossed(monkeypatch):
    example = _load_example(monkeypatch)
    runs = example.main(["--quick", "--no-progress", "--models", "LeNet-5", "--variants", "EIF unbiased 0.2",
                         "--flop-budget", "0.4"])
    plain = next(run for run in runs if run.variant == "plain" and run.budget == "epochs")
    budgeted = next(run for run in runs if run.budget == "0.4 x FLOPs")
    assert 0 < budgeted.flops <= 0.4 * plain.flops
