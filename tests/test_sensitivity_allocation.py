"""sparse_lowrank(allocation='sensitivity'): ranks from the output divergence each layer's truncation causes
on calibration data. The envelope the greedy walks, the budget met by the cost model, a joint divergence
never above even ranks', the layer the output barely reads getting the smaller rank, the user's model left
alone, and clear errors for options that cannot work together."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxreduce as fr
from fxreduce.errors import InputError, OptionError
from fxreduce.modules import LowRankLinear
from fxreduce.passes import get_pass
from fxreduce.passes.sparse_lowrank import greedy_ranks, lower_envelope

curves = st.dictionaries(st.integers(1, 60), st.floats(0, 10, allow_nan=False), min_size=1, max_size=12)


@given(curves)
def test_the_lower_envelope_is_monotone_convex_and_below_every_point(curve):
    hull = lower_envelope(curve)
    ranks = [rank for rank, _ in hull]
    assert ranks[0] == min(curve) and all(curve[rank] == error for rank, error in hull)
    assert all(b[1] < a[1] for a, b in zip(hull, hull[1:]))  # every step removes error
    slopes = [(a[1] - b[1]) / (b[0] - a[0]) for a, b in zip(hull, hull[1:])]
    assert all(later <= earlier * (1 + 1e-12) for earlier, later in zip(slopes, slopes[1:]))
    for rank, error in curve.items():  # no point lies below the envelope's interpolation
        below = [point for point in hull if point[0] <= rank]
        start = below[-1]
        after = [point for point in hull if point[0] > rank]
        if after:
            end = after[0]
            line = start[1] + (end[1] - start[1]) * (rank - start[0]) / (end[0] - start[0])
        else:
            line = start[1]
        assert error >= line - 1e-9 * (1 + abs(line))


@given(st.lists(curves, min_size=1, max_size=4), st.lists(st.floats(1, 5), min_size=4, max_size=4),
       st.floats(0, 1))
def test_greedy_ranks_stay_within_the_budget_and_take_each_layers_steps_in_order(layer_curves, units, share):
    named = {f"layer{index}": curve for index, curve in enumerate(layer_curves)}
    unit = {name: units[index] for index, name in enumerate(named)}
    floor = sum(unit[name] * min(curve) for name, curve in named.items())
    ceiling = sum(unit[name] * max(curve) for name, curve in named.items())
    budget = floor + share * (ceiling - floor)
    ranks, envelopes, _ = greedy_ranks(named, unit, budget)
    spend = sum(unit[name] * rank for name, rank in ranks.items())
    assert spend <= budget * (1 + 1e-12)
    for name, rank in ranks.items():
        hull = [point[0] for point in lower_envelope(named[name])]
        assert hull[0] <= rank <= hull[-1]
        # a layer below its envelope's end stopped because one rank more would not have fitted
        assert rank == hull[-1] or spend + unit[name] > budget * (1 - 1e-12)


class _Blend(nn.Module):
    """Two equal-sized branches; the second's output is scaled by 1e-3, so its truncation barely matters."""

    def __init__(self, width: int = 32, scale: float = 1e-3):
        super().__init__()
        self.loud, self.quiet, self.scale = nn.Linear(width, width), nn.Linear(width, width), scale

    def forward(self, x):
        return self.loud(x) + self.scale * self.quiet(x)


def _calibration(width: int, seed: int, batches: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(16, width, generator=generator) for _ in range(batches)]


def _ranks(gm) -> dict[str, int]:
    return {name: module.rank for name, module in gm.named_modules() if isinstance(module, LowRankLinear)}


@pytest.mark.parametrize("divergence", ["relative_squared", "kl"])
def test_the_layer_the_output_barely_reads_gets_the_smaller_rank_and_the_model_is_untouched(divergence):
    torch.manual_seed(0)
    gm = fr.trace(_Blend().eval(), (torch.randn(4, 32),), dynamic={"N": (0, 0)})
    state = {key: value.clone() for key, value in gm.state_dict().items()}
    pass_ = get_pass("sparse_lowrank")(model_flop_reduction=4, allocation="sensitivity", divergence=divergence,
                                       calibration=_calibration(32, 0))
    outcome = pass_.run(gm)
    ranks = _ranks(outcome.graph_module)
    assert ranks["quiet"] < ranks["loud"], ranks
    assert all(torch.equal(value, state[key]) for key, value in gm.state_dict().items())
    assert "sensitivity allocation: joint output divergence" in outcome.rewrites[0].what


def _mlp(seed: int, sizes: list[int]):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    for index, layer in enumerate(layers[::2]):  # the layers matter to the output unequally
        layer.weight.data *= 0.3 + index
    return fr.trace(nn.Sequential(*layers[:-1]).eval(), (torch.randn(4, sizes[0]),), dynamic={"N": (0, 0)})


def _relative_squared(before, after, batches) -> float:
    with torch.no_grad():
        pairs = [(before(x).double(), after(x).double()) for x in batches]
    return sum(float((b - a).pow(2).sum()) for a, b in pairs) / sum(float(a.pow(2).sum()) for a, _ in pairs)


@given(st.integers(0, 1000), st.sampled_from((2.0, 3.0, 5.0)), st.lists(st.integers(8, 40), min_size=3, max_size=5))
def test_sensitivity_meets_the_target_and_its_joint_divergence_never_exceeds_even_ranks(seed, target, sizes):
    gm = _mlp(seed, sizes)
    calibration = _calibration(sizes[0], seed)
    options = {"model_flop_reduction": target, "calibration": calibration}
    try:
        even = fr.apply(gm, get_pass("sparse_lowrank")(allocation="even", **options))
    except OptionError:  # even ranks cannot reach it; sensitivity is held to the budget alone
        even = None
    try:
        chosen = fr.apply(gm, get_pass("sparse_lowrank")(allocation="sensitivity", **options))
    except OptionError as error:
        assert "no ranks meet" in str(error) or "out of reach" in str(error)
        return
    total = float(fr.cost(gm).at(N=4).macs)
    after = float(fr.cost(chosen.graph_module).at(N=4).macs)
    assert total / after >= target * (1 - 1e-12)
    text = str(chosen.report)
    if "sensitivity allocation:" in text:  # its own ranks: the budget is spent to within one rank of a layer
        step = max(4 * (a + b) for a, b in zip(sizes, sizes[1:]))
        assert after > total / target - step
    if even is not None and len(even.report.steps[0].rewrites) == len(sizes) - 1:
        mine = _relative_squared(gm, chosen.graph_module, calibration)
        theirs = _relative_squared(gm, even.graph_module, calibration)
        assert mine <= theirs * (1 + 1e-3) + 1e-9


def test_the_report_states_each_rank_the_even_rank_and_the_divergences():
    gm = _mlp(0, [24, 48, 16, 24])
    report = str(fr.apply(gm, get_pass("sparse_lowrank")(model_flop_reduction=3, allocation="sensitivity",
                                                         calibration=_calibration(24, 0))).report)
    assert report.count("(even: r=") == 3 and report.count("alone causes output divergence (relative_squared)") == 3
    assert "joint output divergence (relative_squared) on 3 calibration batch(es)" in report


@pytest.mark.parametrize("options, message", [
    ({"model_flop_reduction": 2, "allocation": "sensitivity"}, "allocation='sensitivity' measures the model's "
                                                                "output on calibration inputs"),
    ({"model_flop_reduction": 2, "divergence": "kl", "calibration": torch.randn(4, 8)},
     "divergence='kl' is the measure of allocation='sensitivity'"),
    ({"model_flop_reduction": 2, "allocation": "sensitivity", "divergence": "l1", "calibration": torch.randn(4, 8)},
     "divergence"),
    ({"model_flop_reduction": 2, "allocation": "sensitivity", "form": "lr_sparse", "groups": 2,
      "calibration": torch.randn(4, 8)}, "allocation='sensitivity' ranks the truncations of one factorisation"),
    ({"model_flop_reduction": 2, "allocation": "sensitivity", "objective": "latency",
      "calibration": torch.randn(4, 8)}, "objective='latency' picks each layer's form"),
    ({"model_flop_reduction": 2, "allocation": "spread"}, "allocation"),
])
def test_bad_sensitivity_options_are_clear_errors(options, message):
    with pytest.raises(OptionError, match=message):
        get_pass("sparse_lowrank")(**options)


class _Classes(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x))).argmax(-1)


def test_a_model_without_a_floating_point_output_is_a_clear_error():
    torch.manual_seed(0)
    gm = fr.trace(_Classes().eval(), (torch.randn(4, 16),), dynamic={"N": (0, 0)})
    with pytest.raises(InputError, match="output holds no floating-point tensor"):
        get_pass("sparse_lowrank")(model_flop_reduction=2, allocation="sensitivity",
                                   calibration=torch.randn(6, 16)).run(gm)
