"""Generated models must be sound test subjects: they run, trace faithfully, resize, and replay exactly."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st
from torch import fx, nn

from fxreduce.errors import InputError
from fxreduce.testing.specs import GeneratedModel
from fxreduce.testing.strategies import (
    cnn_models,
    linear_shapes,
    lstm_models,
    mlp_models,
    model_specs,
    models,
)

EXAMPLES = settings(deadline=None, max_examples=50)
# For `find`: the first hit will do (shrinking it would only cost time), and the same one every run.
SEARCH = settings(max_examples=1000, database=None, phases=[Phase.generate], derandomize=True)


@EXAMPLES
@given(models())
def test_model_runs_and_its_trace_gives_identical_outputs(generated):
    expected = generated.module(*generated.example_inputs)
    traced = fx.symbolic_trace(generated.module)
    assert torch.equal(traced(*generated.example_inputs), expected)


@EXAMPLES
@given(models(), st.data())
def test_dynamic_dims_accept_other_sizes(generated, data):
    sizes = {
        name: data.draw(st.integers(low, low + 10), label=name) for name, low in generated.min_sizes.items()
    }
    inputs = generated.make_inputs(**sizes)
    for name, (index, dim) in generated.dynamic.items():
        assert inputs[index].shape[dim] == sizes[name]
    output = generated.module(*inputs)
    assert output.shape[0] == sizes["N"]
    assert torch.equal(fx.symbolic_trace(generated.module)(*inputs), output)


@EXAMPLES
@given(models())
def test_same_draw_rebuilds_the_same_model_without_touching_global_rng(generated):
    state = torch.get_rng_state()
    rebuilt = generated.spec.build()
    assert torch.equal(torch.get_rng_state(), state)
    assert repr(rebuilt) == repr(generated)
    original = generated.module.state_dict()
    assert rebuilt.module.state_dict().keys() == original.keys()
    assert all(torch.equal(value, original[key]) for key, value in rebuilt.module.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.example_inputs, generated.example_inputs, strict=True))


@settings(deadline=None, max_examples=20)
@given(models())
def test_models_survive_pickling_and_deepcopy(generated):
    # Distributed tests ship models to spawned ranks, and passes often work on deep copies.
    expected = generated.module(*generated.example_inputs)
    for clone in (pickle.loads(pickle.dumps(generated.module)), copy.deepcopy(generated.module)):
        assert torch.equal(clone(*generated.example_inputs), expected)


@settings(deadline=None, max_examples=20)
@given(models(training=True))
def test_training_mode_models_trace_faithfully_under_the_same_rng(generated):
    assert generated.module.training
    traced = fx.symbolic_trace(generated.module)
    outputs = []
    for module in (generated.module, traced):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            outputs.append(module(*generated.example_inputs))
    assert torch.equal(*outputs)


def _has(module_type):
    return lambda generated: any(isinstance(m, module_type) for m in generated.module.modules())


def _calls(target):
    def check(generated):
        return any(node.target == target for node in fx.symbolic_trace(generated.module).graph.nodes)

    return check


def _both(*conditions):
    return lambda generated: all(condition(generated) for condition in conditions)


def _grouped_conv(generated):
    return any(getattr(m, "groups", 1) > 1 for m in generated.module.modules())


def _time_first_two_layer_lstm(generated):
    return any(
        isinstance(m, nn.LSTM) and not m.batch_first and m.num_layers == 2 for m in generated.module.modules()
    )


@pytest.mark.parametrize(
    "strategy, condition",
    [
        (mlp_models(), _both(_has(nn.Linear), _calls(F.linear))),
        (cnn_models(), _both(_has(nn.Conv2d), _calls(F.conv2d))),
        (cnn_models(), _grouped_conv),
        (cnn_models(), _calls(torch.cat)),
        (cnn_models(), lambda generated: generated.min_spatial > 4),
        (mlp_models(), _calls(F.dropout)),
        (lstm_models(), _time_first_two_layer_lstm),
        (cnn_models(), _calls("flatten")),
    ],
    ids=[
        "linear-both-forms", "conv-both-forms", "grouped-conv", "cat-branch", "deep-downsampling",
        "functional-dropout", "time-first-2-layer-lstm", "flatten-method",
    ],
)
def test_vocabulary_is_reachable(strategy, condition):
    """Each listed feature appears within the first 1000 draws, so the tests above do exercise it."""
    assert isinstance(find(strategy, condition, settings=SEARCH), GeneratedModel)


def test_batchnorm_statistics_are_not_the_identity():
    generated = find(cnn_models(), _has(nn.BatchNorm2d), settings=SEARCH)
    norm = next(m for m in generated.module.modules() if isinstance(m, nn.BatchNorm2d))
    assert not torch.allclose(norm.running_mean, torch.zeros_like(norm.running_mean))
    assert not torch.allclose(norm.running_var, torch.ones_like(norm.running_var))


@given(linear_shapes(features=(3, 9)))
def test_linear_shapes_stay_in_range(shape):
    assert all(3 <= size <= 9 for size in shape)


@pytest.mark.parametrize(
    "options",
    [{"kinds": ("rnn",)}, {"kinds": ()}, {"max_layers": 0}, {"batch": (1, 4)}, {"spatial": (8, 4)}],
)
def test_bad_options_are_refused(options):
    with pytest.raises(InputError):
        model_specs(**options)


def test_make_inputs_refuses_unknown_dims_and_sizes_below_the_minimum():
    generated = find(cnn_models(), lambda g: True, settings=SEARCH)
    with pytest.raises(InputError, match="unknown dynamic dim"):
        generated.make_inputs(C=5)
    with pytest.raises(InputError, match="below the model's minimum"):
        generated.make_inputs(H=generated.min_spatial - 1)
