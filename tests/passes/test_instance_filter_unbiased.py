"""instance_filter(selection='unbiased'): predicted High kept whole, the predicted Low sampled uniformly and
weighted by the inverse of their keep probability, so the step's loss is an unbiased estimate of the batch's mean.

The contract is checked exactly: the expectation over the sampling is computed by enumerating every
order the sampler can draw (all permutations of the predicted-Low instances, each equally likely), not
estimated by Monte Carlo."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys

import pytest
import sympy
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import fxreduce as fr
from fxreduce.errors import InputError, OptionError
from fxreduce.modules.instance_filter import InstanceFilter
from fxreduce.passes.instance_filter import InstanceFilterPass
from fxreduce.testing.contracts import check_contract
from fxreduce.testing.model_blocks import FunctionalDropout
from fxreduce.testing.strategies import cnn_models
from fxreduce.training.on_device import KEPT_RATIO, OnDeviceTrainer, training_step_flops

from test_instance_filter import EXAMPLE, MeanSign  # tests/passes is on sys.path (pytest's prepend mode)


def _expected_batch_loss(branch: InstanceFilter, logits: torch.Tensor, losses: torch.Tensor) -> float:
    """E[batch_loss] over the sampling: the mean over every permutation of the predicted-Low instances."""
    low = int((logits.log_softmax(1)[:, 1] < math.log(0.5)).sum())
    estimates = []
    for order in itertools.permutations(range(low)):
        kept, high = branch.choose(logits, order=torch.tensor(order, dtype=torch.long))
        estimates.append(float(branch.batch_loss(losses[kept], kept, high)))
    return math.fsum(estimates) / len(estimates)


@given(st.integers(1, 6).flatmap(lambda n: st.tuples(
    st.lists(st.tuples(st.floats(-4, 4), st.floats(-4, 4)), min_size=n, max_size=n),
    st.lists(st.floats(0, 10), min_size=n, max_size=n))),
    st.floats(0.01, 1.0), st.integers(1, 3))
def test_unbiased_loss_expectation_over_the_sampling_is_the_batch_mean(batch, uncertainty, min_keep):
    pairs, values = batch
    logits = torch.tensor(pairs, dtype=torch.float64)
    losses = torch.tensor(values, dtype=torch.float64)
    branch = InstanceFilter(nn.Identity(), (True,), (2,), uncertainty=uncertainty, min_keep=min_keep,
                            selection="unbiased")
    assert _expected_batch_loss(branch, logits, losses) == pytest.approx(float(losses.mean()), rel=1e-12, abs=1e-12)


def test_the_papers_selection_is_biased_towards_the_uncertain_instances():
    # Instance 0 predicted High, 1 the most uncertain Low, 2 and 3 confidently Low: "uncertainty" always
    # trains on {0, 1}, whose mean loss is not the batch's; "unbiased" is, in expectation.
    logits = torch.tensor([[0.0, 2.0], [0.1, 0.0], [5.0, 0.0], [6.0, 0.0]], dtype=torch.float64)
    losses = torch.tensor([4.0, 2.0, 0.0, 0.0], dtype=torch.float64)
    paper = InstanceFilter(nn.Identity(), (True,), (2,), uncertainty=0.25)
    kept, high = paper.choose(logits)
    assert kept.tolist() == [0, 1] and float(paper.batch_loss(losses[kept], kept, high)) == 3.0
    unbiased = InstanceFilter(nn.Identity(), (True,), (2,), uncertainty=0.25, selection="unbiased")
    assert _expected_batch_loss(unbiased, logits, losses) == pytest.approx(1.5, rel=1e-12)


def test_unbiased_choice_keeps_every_predicted_high_and_a_random_share_of_the_rest():
    logits = torch.tensor([[0.0, 3.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [5.0, 0.0],
                           [6.0, 0.0]])
    branch = InstanceFilter(nn.Identity(), (True,), (2,), uncertainty=0.25, selection="unbiased")
    samples = set()
    for seed in range(20):
        torch.manual_seed(seed)
        kept, high = branch.choose(logits)
        assert high.tolist() == [True, False, True] + [False] * 5
        assert {0, 2} <= set(kept.tolist()) and kept.numel() == 4  # both High and ceil(0.25 x 8) = 2 of the 6 Low
        weights = branch.importance(kept, high)
        assert weights.tolist() == [1.0 if i in (0, 2) else 3.0 for i in kept.tolist()]  # 6 Low, 2 sampled
        samples.add(tuple(kept.tolist()))
    assert len(samples) > 3  # the sample changes from step to step, unlike the entropy ranking


def test_unbiased_keeps_min_keep_by_sampling_more_of_the_low():
    branch = InstanceFilter(nn.Identity(), (True,), (2,), uncertainty=0.1, min_keep=3, selection="unbiased")
    logits = torch.tensor([[1.0, 0.0]] * 5)
    kept, high = branch.choose(logits, order=torch.tensor([4, 0, 2, 1, 3]))
    assert kept.tolist() == [0, 2, 4] and not high.any()
    assert branch.importance(kept, high).tolist() == [5 / 3] * 3


def test_selection_options_are_checked():
    with pytest.raises(OptionError, match=r"selection='loss'.*'uncertainty', 'unbiased'"):
        InstanceFilterPass(selection="loss")
    with pytest.raises(OptionError, match="uncertainty > 0"):
        InstanceFilterPass(selection="unbiased", uncertainty=0.0)
    with pytest.raises(InputError, match="selection"):
        InstanceFilter(nn.Identity(), (True,), (2,), selection="hard")
    with pytest.raises(OptionError, match="selection"):
        fr.apply(fr.trace(nn.Linear(3, 2), (torch.randn(2, 3),)), "instance_filter(selection='random')")


@given(cnn_models(max_layers=4, training=st.booleans()), st.integers(0, 1000))
def test_contract_holds_with_unbiased_selection_on_generated_cnns(generated, seed):
    # A single kept instance cannot train BatchNorm1d, with or without the filter. F.dropout traced in
    # training bakes training=True in, so the check's unseeded eval runs draw different masks before and
    # after any pass (the paper's selection included).
    assume(not any(isinstance(m, (nn.BatchNorm1d, FunctionalDropout)) for m in generated.module.modules()))
    torch.manual_seed(seed)
    result = check_contract(InstanceFilterPass(filter=MeanSign(), uncertainty=0.3, selection="unbiased"),
                            generated.module, generated.example_inputs, dynamic=generated.dynamic, trials=1)
    assert result.ok, str(result)


def test_trainer_steps_on_the_weighted_loss_and_counts_the_same_flops():
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 4, (16,))
    x[:3] += 2.0  # positive mean: predicted High by MeanSign
    x[3:] -= 2.0
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(128, 4))
    gm = fr.trace(model, (x,), dynamic={"N": (0, 0)})
    unbiased = InstanceFilterPass(filter=MeanSign(), uncertainty=0.25, selection="unbiased")
    filtered = fr.apply(gm, [unbiased]).graph_module
    trainer = OnDeviceTrainer(filtered, torch.optim.SGD(filtered.parameters(), lr=0.0))
    result = trainer.step(x, y)
    kept = result.kept.tolist()
    assert kept[:3] == [0, 1, 2] and len(kept) == 7  # 3 High + ceil(0.25 x 16) of the 13 Low
    with torch.no_grad():
        losses = nn.functional.cross_entropy(model(x[kept]), y[kept], reduction="none")
    expected = (losses[:3].sum() + 13 / 4 * losses[3:].sum()) / 16
    assert result.loss == pytest.approx(float(expected), rel=1e-6)
    assert result.loss != pytest.approx(float(losses.mean()), rel=1e-3)
    formula = training_step_flops(filtered, kept_ratio=KEPT_RATIO)
    n = fr.cost_models.symbol("N")
    assert result.flops == int(round(float(formula.subs({KEPT_RATIO: sympy.Rational(7, 16), n: 16}))))



def test_example_trains_only_the_variants_asked_for_besides_plain(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("on_device_mnist", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # its dataclasses look their module up
    spec.loader.exec_module(example)
    runs = example.main(["--quick", "--no-progress", "--models", "LeNet-5", "--variants", "EIF unbiased 0.1"])
    assert [run.variant for run in runs] == ["plain", "EIF unbiased 0.1"]
    assert runs[1].kept_share < 1  # one quick epoch: the untrained filter still predicts most instances High
    with pytest.raises(SystemExit):
        example.main(["--quick", "--variants", "EIF biased"])
    assert "unknown variants ['EIF biased']" in capsys.readouterr().err
