"""Tracing: symbolic shapes in the user's dims, fallbacks, the export path, and clear errors."""

import copy
import time

import pytest
import sympy
import torch
import torch.nn.functional as F

import fxreduce as fr
from fxreduce.cost_models import graph_info
from fxreduce.errors import InputError, TraceError
from fxreduce.testing.contracts import check_contract


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class NeedsConcreteSize(torch.nn.Module):
    """Control flow on a size: symbolic tracing cannot capture it."""

    def forward(self, x):
        if x.shape[0] > 3:
            return x * 2
        return x + 1


def shape_of(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name).meta["fxreduce"].shape


def test_shapes_are_sympy_in_named_dims():
    gm = fr.trace(SmallCNN().eval(), (torch.randn(2, 3, 16, 20),), {"N": (0, 0), "H": (0, 2), "W": (0, 3)})
    N, H, W = (sympy.Symbol(s, integer=True, positive=True) for s in "NHW")
    conv_shape = shape_of(gm, "conv")
    assert conv_shape[0] == N and conv_shape[1] == 8
    assert conv_shape[2].subs(H, 16) == 8 and conv_shape[2].subs(H, 15) == 8
    assert conv_shape[3].free_symbols == {W}
    assert shape_of(gm, "head") == (N, 5)
    assert graph_info(gm).symbolic == ("N", "H", "W")


def test_equal_example_sizes_stay_distinct_dims():
    gm = fr.trace(SmallCNN().eval(), (torch.randn(2, 3, 16, 16),), {"N": (0, 0), "H": (0, 2), "W": (0, 3)})
    assert {s.name for s in shape_of(gm, "conv")[2].free_symbols} == {"H"}
    assert {s.name for s in shape_of(gm, "conv")[3].free_symbols} == {"W"}


def test_user_model_is_never_mutated():
    model = SmallCNN().train()
    before = copy.deepcopy(model.state_dict())
    gm = fr.trace(model, (torch.randn(2, 3, 8, 8),), {"N": (0, 0)})
    result = fr.apply(gm, "fold_batchnorm,eliminate_dead_code")
    with torch.no_grad():
        for p in result.graph_module.parameters():
            p.add_(1.0)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_size_one_example_is_kept_symbolic():
    gm = fr.trace(SmallCNN().eval(), (torch.randn(1, 3, 8, 8),), {"N": (0, 0)})
    assert graph_info(gm).symbolic == ("N",)


def test_model_fixed_dims_are_specialised_and_named():
    class FixedSize(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 8 * 8, 4)

        def forward(self, x):
            torch._assert(x.shape[2] == 8, "8 x 8 images only")
            torch._assert(x.shape[3] == 8, "8 x 8 images only")
            return self.fc(x.reshape(x.shape[0], 3 * 8 * 8))

    gm = fr.trace(FixedSize(), (torch.randn(2, 3, 8, 8),), {"N": (0, 0), "H": (0, 2), "W": (0, 3)})
    info = graph_info(gm)
    assert info.symbolic == ("N",)
    assert "fixed by the model to 8" in info.specialised["H"]
    cost = fr.cost(gm)
    assert cost.at(N=1, H=8).flops == 2 * 3 * 8 * 8 * 4
    with pytest.raises(fr.FxReduceError, match="H"):
        cost.at(H=16)


def test_export_fallback_for_untraceable_model():
    gm = fr.trace(NeedsConcreteSize(), (torch.randn(5, 3),))
    assert graph_info(gm).method == "torch.export"
    x = torch.randn(5, 3)
    assert torch.equal(gm(x), x * 2)


def test_untraceable_model_names_source_line():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x.nonzero()
            return x

    with pytest.raises(TraceError) as error:
        fr.trace(DataDependent(), (torch.randn(4),), method="fx")
    assert "test_tracing.py" in str(error.value) and "leaf" in str(error.value)


@pytest.mark.parametrize(
    "model, inputs, dynamic, match",
    [
        (SmallCNN, (torch.randn(2, 3, 8, 8),), None, "torch.nn.Module"),
        (SmallCNN(), (torch.randn(2, 5, 8, 8),), None, "does not run on example inputs"),
        (SmallCNN(), (torch.randn(2, 3, 8, 8),), {"N": (1, 0)}, "input 1"),
        (SmallCNN(), (torch.randn(2, 3, 8, 8),), {"N": (0, 7)}, "axis 7"),
        (SmallCNN(), "not a tensor", None, "example_inputs"),
    ],
)
def test_bad_input_raises_clear_error(model, inputs, dynamic, match):
    with pytest.raises(InputError, match=match):
        fr.trace(model, inputs, dynamic)


_ran_symbolically = []


def _busy_while_symbolic(x):
    """One node that runs far past any time limit, but only while its sizes are symbolic."""
    if isinstance(x.shape[0], torch.SymInt):
        _ran_symbolically.append(True)
        deadline = time.process_time() + 20
        while time.process_time() < deadline:
            pass
    return x * 2


torch.fx.wrap("_busy_while_symbolic")


class _SlowWhenSymbolic(torch.nn.Module):
    def forward(self, x):
        return _busy_while_symbolic(x)


def test_a_node_running_past_the_time_limit_is_interrupted(monkeypatch):
    from fxreduce.cost_models import propagation
    monkeypatch.setattr(propagation, "_OVERRUN_GRACE", 0.1)
    _ran_symbolically.clear()
    started = time.process_time()
    gm = fr.trace(_SlowWhenSymbolic(), (torch.randn(2, 3),), {"N": (0, 0)}, time_limit=1.0)
    assert _ran_symbolically, "the slow node never ran: setting up the propagation took the whole limit"
    assert time.process_time() - started < 10
    assert graph_info(gm).symbolic == () and "did not finish" in graph_info(gm).specialised["N"]


def test_propagation_over_time_limit_falls_back_to_concrete_sizes():
    gm = fr.trace(SmallCNN().eval(), (torch.randn(2, 3, 8, 8),), {"N": (0, 0), "H": (0, 2)}, time_limit=1e-6)
    info = graph_info(gm)
    assert info.symbolic == ()
    assert "did not finish" in info.specialised["N"] and "concrete 8" in info.specialised["H"]
    assert fr.cost(gm).flops == fr.cost(fr.trace(SmallCNN().eval(), (torch.randn(2, 3, 8, 8),))).flops


class Masked(torch.nn.Module):
    """Two inputs of the same (N, T) shape, the second optional, as transformers models take them."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 4)

    def forward(self, input_ids, attention_mask=None, scale: float = 1.0):
        x = self.embed(input_ids) * scale
        if attention_mask is not None:
            x = x * attention_mask.unsqueeze(-1)
        return self.head(x)


def test_keyword_inputs_with_named_inputs_and_tied_axes():
    ids, mask = torch.randint(0, 50, (2, 7)), torch.ones(2, 7)
    dims = {"N": [("input_ids", 0), ("attention_mask", 0)], "T": [("input_ids", 1), ("attention_mask", 1)]}
    gm = fr.trace(Masked(), {"input_ids": ids, "attention_mask": mask, "scale": 2.0}, dims)
    info = graph_info(gm)
    assert info.symbolic == ("N", "T") and info.specialised == {}
    assert info.spec.names == ("input_ids", "attention_mask")
    assert info.spec.positions("T") == ((0, 1), (1, 1))
    N, T = (sympy.Symbol(s, integer=True, positive=True) for s in "NT")
    assert shape_of(gm, "head") == (N, T, 4)
    ids, mask = torch.randint(0, 50, (3, 5)), torch.rand(3, 5)
    assert torch.allclose(gm(ids, mask), _reference(gm, ids, mask))


def _reference(gm, ids, mask):
    model = Masked()
    model.load_state_dict(gm.state_dict())
    return model(ids, attention_mask=mask, scale=2.0)


def test_an_untied_axis_of_another_input_pins_the_dim():
    ids, mask = torch.randint(0, 50, (2, 7)), torch.ones(2, 7)
    gm = fr.trace(Masked(), {"input_ids": ids, "attention_mask": mask}, {"T": ("input_ids", 1)})
    assert graph_info(gm).symbolic == () and "7" in graph_info(gm).specialised["T"]


def test_forward_needing_arguments_the_example_inputs_lack():
    class TwoInputs(torch.nn.Module):
        def forward(self, x, mask):
            return x * mask

    with pytest.raises(InputError, match="needs argument.* mask that the example inputs lack"):
        fr.trace(TwoInputs(), (torch.randn(2, 3),))
    with pytest.raises(InputError, match="needs argument.* x that the example inputs lack"):
        fr.trace(TwoInputs(), {"mask": torch.randn(2, 3)})
    with pytest.raises(InputError, match="takes no argument 'maks'.*did you mean 'mask'"):
        fr.trace(TwoInputs(), {"x": torch.randn(2, 3), "maks": torch.randn(2, 3)})
    with pytest.raises(InputError, match="takes 2 input"):
        fr.trace(TwoInputs(), (torch.randn(2, 3),) * 3)
    with pytest.raises(InputError, match="not a tensor keyword input"):
        fr.trace(Masked(), {"input_ids": torch.randint(0, 50, (2, 7))}, {"T": ("attention_mask", 1)})


def test_tensors_kept_from_an_earlier_autograd_run_are_copied_detached():
    """RAFT keeps its correlation pyramid as a plain attribute; after a forward with autograd those
    tensors are not graph leaves and deepcopy refuses them."""

    class KeepsState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)
            self.pyramid = []

        def forward(self, x):
            self.pyramid = [self.fc(x)]
            return self.pyramid[0] * 2

    model = KeepsState()
    model(torch.randn(2, 4))
    with pytest.raises(RuntimeError):
        copy.deepcopy(model)
    gm = fr.trace(model, (torch.randn(2, 4),), {"N": (0, 0)})
    assert "pyramid" in graph_info(gm).notes[0]
    assert model.pyramid[0].grad_fn is not None  # the user's model is untouched


def test_trace_and_training_cost_inside_inference_mode():
    model = SmallCNN()
    with torch.inference_mode():
        gm = fr.trace(model, (torch.randn(2, 3, 8, 8),), {"N": (0, 0)})
        step = fr.cost(gm, training=True)
    assert not any(p.is_inference() for p in gm.parameters())
    assert step.flops > 2 * fr.cost(gm).flops
    with torch.inference_mode():  # even a model built there
        assert fr.cost(fr.trace(SmallCNN(), (torch.randn(2, 3, 8, 8),)), training=True).flops == step.at(N=2).flops


class FunctionalDropout(torch.nn.Module):
    """Dropout written as functions: one following the module's mode, one always on (Monte Carlo dropout)."""

    def __init__(self, always_on: bool = False):
        super().__init__()
        self.a, self.b, self.always_on = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8), always_on

    def forward(self, x):
        x = F.dropout(torch.relu(self.a(x)), 0.5, self.training)
        channels = F.dropout2d(x[..., None, None], 0.25, True if self.always_on else self.training)
        return self.b(channels[..., 0, 0])


@pytest.mark.parametrize("traced_training", [True, False])
def test_functional_dropout_that_follows_the_mode_still_follows_it_in_the_graph(traced_training):
    model = FunctionalDropout().train(traced_training)
    x = torch.randn(64, 16)
    gm = fr.trace(model, (x,), {"N": (0, 0)})
    assert [type(m) for m in gm.children() if isinstance(m, torch.nn.modules.dropout._DropoutNd)] == [
        torch.nn.Dropout, torch.nn.Dropout2d]
    assert any("became nn.Dropout modules" in note for note in graph_info(gm).notes)
    model.eval()
    gm.eval()
    torch.testing.assert_close(gm(x), model(x))
    gm.train()
    torch.manual_seed(0)
    dropped = gm(x)
    torch.manual_seed(0)
    torch.testing.assert_close(dropped, model.train()(x))
    assert not torch.allclose(dropped, gm.eval()(x))
    assert check_contract("remove_dropout", gm).ok


def test_functional_dropout_that_is_always_on_stays_a_call():
    gm = fr.trace(FunctionalDropout(always_on=True).eval(), (torch.randn(4, 16),), {"N": (0, 0)})
    assert [type(m) for m in gm.children() if isinstance(m, torch.nn.modules.dropout._DropoutNd)] == [torch.nn.Dropout]
    assert any(node.target is F.dropout2d for node in gm.graph.nodes)
