"""fxreduce.modules.DecomposedLSTM against torch.nn.LSTM and against a dense per-step reference.

The reference below is deliberately naive (autograd through a per-step loop calling each projection
module), so it checks the hand-written backward, the projection protocol and the keep-set gathers.
"""

from __future__ import annotations

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import fxreduce as fr
from fxreduce.cost_models.counting import OpCounter
from fxreduce.cost_models.propagation import graph_info
from fxreduce.errors import CostError, InputError, OptionError, UnsupportedError
from fxreduce import native
from fxreduce.modules.lstm import module as lstm_module, onednn, recurrence, step_projection
from fxreduce.modules.lstm import DecomposedLSTM, KeepSet


@pytest.fixture(autouse=True)
def decomposed_kernels(monkeypatch):
    """Every test here checks the decomposed kernels, also where dense inference would take nn.LSTM's."""
    monkeypatch.setattr(lstm_module, "TORCH_KERNEL_MAX_HIDDEN", 0)


@pytest.fixture
def torch_path():
    """The torch path (the reference and the fallback), also where the native kernels are built."""
    with native.disabled():
        yield


class Chain(nn.Module):
    """x @ W1^T @ ... @ Wm^T + b: a low-rank projection (m=2) exposing its GEMM factors."""

    def __init__(self, dims: list[int], dtype=torch.float64):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Linear(a, b, bias=j == len(dims) - 2, dtype=dtype) for j, (a, b) in enumerate(zip(dims, dims[1:]))
        )

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def gemm_factors(self):
        return [layer.weight for layer in self.layers], self.layers[-1].bias


class Opaque(nn.Module):
    """A projection without gemm_factors(): the LSTM must fall back to the autograd loop."""

    def __init__(self, n_in: int, n_out: int, dtype=torch.float64):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out, dtype=dtype)

    def forward(self, x):
        return self.linear(torch.sin(x)) + 0.1 * x.sum(-1, keepdim=True)


def assert_near(actual, expected, dtype):
    if dtype == torch.float64:
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)
    else:
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale)


def dense_mask(keep: KeepSet, width: int, dtype) -> torch.Tensor:
    """The 0/scale mask a keep set stands for, built independently of the module's own helper."""
    if keep.index.dim() == 1:
        mask = torch.zeros(width, dtype=dtype)
        mask[keep.index] = keep.scale
        return mask
    mask = torch.zeros(keep.index.shape[0], 1, width, dtype=dtype)
    for t, row in enumerate(keep.index):
        mask[t, 0, row] = keep.scale
    return mask


def reference(lstm: DecomposedLSTM, x, hx=None, input_masks=None, hidden_masks=None):
    """Time-major batched LSTM through lstm.projection(...) modules, masks multiplied densely."""
    input_masks, hidden_masks = input_masks or {}, hidden_masks or {}
    directions = (False, True) if lstm.bidirectional else (False,)
    steps, batch = x.shape[:2]
    shape = (lstm.num_layers * len(directions), batch, lstm.hidden_size)
    h0, c0 = hx if hx is not None else (x.new_zeros(shape), x.new_zeros(shape))
    hn, cn = [], []
    for layer in range(lstm.num_layers):
        if layer in input_masks:
            x = x * input_masks[layer]
        mask = hidden_masks.get(layer)
        outputs = []
        for reverse in directions:
            ih, hh = lstm.projection("ih", layer, reverse), lstm.projection("hh", layer, reverse)
            slot = layer * len(directions) + int(reverse)
            h, c = h0[slot], c0[slot]
            ys = [None] * steps
            for t in reversed(range(steps)) if reverse else range(steps):
                z = h if mask is None else h * (mask[t, 0] if mask.dim() == 3 else mask)
                i, f, g, o = (ih(x[t]) + hh(z)).chunk(4, 1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                ys[t] = h
            outputs.append(torch.stack(ys))
            hn.append(h)
            cn.append(c)
        x = torch.cat(outputs, 2)
    return x, (torch.stack(hn), torch.stack(cn))


def weighted_loss(output, h_n, c_n):
    """A loss whose gradient differs per element, so transposed or shifted gradients cannot pass."""
    total = 0
    for k, tensor in enumerate((output, h_n, c_n)):
        weights = torch.linspace(-1, 1, tensor.numel(), dtype=tensor.dtype).reshape(tensor.shape)
        total = total + ((k + 1) * weights * tensor).sum()
    return total


def grads(module, loss, inputs):
    names = [name for name, p in module.named_parameters() if p.requires_grad]
    tensors = [p for p in module.parameters() if p.requires_grad]
    values = torch.autograd.grad(loss, [*inputs, *tensors], allow_unused=True)
    return values[: len(inputs)], dict(zip(names, values[len(inputs) :]))


@st.composite
def configs(draw, max_steps=64):
    return dict(
        input_size=draw(st.integers(1, 6)),
        hidden_size=draw(st.integers(1, 6)),
        num_layers=draw(st.integers(1, 3)),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bidirectional=draw(st.booleans()),
        steps=draw(st.integers(1, max_steps)),
        batch=draw(st.integers(1, 4)),
        unbatched=draw(st.booleans()),
        with_state=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        seed=draw(st.integers(0, 2**16)),
    )


def make_inputs(cfg, requires_grad=False):
    torch.manual_seed(cfg["seed"])
    dtype, steps, batch = cfg["dtype"], cfg["steps"], cfg["batch"]
    shape = (steps, cfg["input_size"])
    if not cfg["unbatched"]:
        shape = (batch, steps, cfg["input_size"]) if cfg["batch_first"] else (steps, batch, cfg["input_size"])
    x = torch.randn(shape, dtype=dtype, requires_grad=requires_grad)
    hx = None
    if cfg["with_state"]:
        slots = cfg["num_layers"] * (2 if cfg["bidirectional"] else 1)
        state = (slots, cfg["hidden_size"]) if cfg["unbatched"] else (slots, batch, cfg["hidden_size"])
        hx = tuple(torch.randn(state, dtype=dtype, requires_grad=requires_grad) for _ in range(2))
    return x, hx


def make_pair(cfg):
    keys = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "bidirectional")
    torch.manual_seed(cfg["seed"] + 1)
    ref = nn.LSTM(**{k: cfg[k] for k in keys}, dtype=cfg["dtype"])
    return ref, DecomposedLSTM.from_torch(ref)


@settings(deadline=None, max_examples=40)
@given(configs())
def test_eval_outputs_and_states_equal_nn_lstm(cfg):
    ref, ours = make_pair(cfg)
    ref.eval(), ours.eval()
    x, hx = make_inputs(cfg)
    with torch.no_grad():
        expected, (h_ref, c_ref) = ref(x, hx)
        actual, (h, c) = ours(x, hx)
    assert actual.shape == expected.shape and h.shape == h_ref.shape and c.shape == c_ref.shape
    for a, e in ((actual, expected), (h, h_ref), (c, c_ref)):
        assert_near(a, e, cfg["dtype"])


@settings(deadline=None, max_examples=40)
@given(configs())
def test_gradients_equal_nn_lstm(cfg):
    ref, ours = make_pair(cfg)
    results = []
    for module in (ref, ours):
        x, hx = make_inputs(cfg, requires_grad=True)
        output, (h_n, c_n) = module(x, hx)
        inputs = [x, *(hx or ())]
        results.append((output, *grads(module, weighted_loss(output, h_n, c_n), inputs)))
    (out_ref, inputs_ref, params_ref), (out, inputs, params) = results
    assert_near(out, out_ref, cfg["dtype"])
    for a, e in zip(inputs, inputs_ref):
        assert_near(a, e, cfg["dtype"])
    assert params.keys() == params_ref.keys()
    for name in params:
        assert_near(params[name], params_ref[name], cfg["dtype"])


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_float32_without_onednn_uses_addmm_and_matches(torch_path):
    torch.manual_seed(0)
    ref = nn.LSTM(7, 9, 2, bidirectional=True)
    ours = DecomposedLSTM.from_torch(ref)
    with torch.backends.mkldnn.flags(enabled=False):
        results = []
        for module in (ref, ours):
            x = torch.randn(12, 3, 7, generator=torch.Generator().manual_seed(1), requires_grad=True)
            output, (h_n, c_n) = module(x)
            results.append((output, *grads(module, weighted_loss(output, h_n, c_n), [x])))
    (out_ref, (dx_ref,), params_ref), (out, (dx,), params) = results
    assert_near(out, out_ref, torch.float32)
    assert_near(dx, dx_ref, torch.float32)
    for name in params:
        assert_near(params[name], params_ref[name], torch.float32)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_onednn_steps_match(monkeypatch, bidirectional, torch_path):
    """Small test sizes keep per-step GEMMs on addmm; force oneDNN's packed kernel to check it too."""
    monkeypatch.setattr(onednn, "_STEP_DNN_MIN_WEIGHTS", 0)
    cfg = dict(input_size=5, hidden_size=6, num_layers=2, bias=True, batch_first=False, bidirectional=bidirectional,
               steps=17, batch=3, unbatched=False, with_state=True, dtype=torch.float32, seed=4)
    ref, ours = make_pair(cfg)
    results = []
    for module in (ref, ours):
        x, hx = make_inputs(cfg, requires_grad=True)
        output, (h_n, c_n) = module(x, hx)
        results.append((output, *grads(module, weighted_loss(output, h_n, c_n), [x, *hx])))
    (out_ref, inputs_ref, params_ref), (out, inputs, params) = results
    assert_near(out, out_ref, torch.float32)
    for a, e in zip(inputs, inputs_ref):
        assert_near(a, e, torch.float32)
    for name in params:
        assert_near(params[name], params_ref[name], torch.float32)

    ours.set_projection("hh", 1, False, Chain([6, 4, 24], dtype=torch.float32))
    generator = torch.Generator().manual_seed(0)
    width = 12 if bidirectional else 6
    keep_in, keep_hidden = draw_keep("sequence", 3, width, 17, generator), draw_keep("sequence", 4, 6, 17, generator)
    ours.set_keep_sets(1, input=keep_in, hidden=keep_hidden)
    masks = ({1: dense_mask(keep_in, width, torch.float32)}, {1: dense_mask(keep_hidden, 6, torch.float32)})
    x = torch.randn(17, 3, 5)
    results = []
    for run in (reference, ours):
        xi = x.clone().requires_grad_()
        output, (h_n, c_n) = run(xi) if run is ours else run(ours, xi, None, *masks)
        results.append((output, *grads(ours, weighted_loss(output, h_n, c_n), [xi])))
    (out_ref, (dx_ref,), params_ref), (out, (dx,), params) = results
    assert_near(out, out_ref, torch.float32)
    assert_near(dx, dx_ref, torch.float32)
    for name in params:
        assert_near(params[name], params_ref[name], torch.float32)


def test_inference_saves_nothing_for_backward(monkeypatch, torch_path):
    torch.manual_seed(0)
    ours = DecomposedLSTM(4, 5, 2, bidirectional=True)
    x = torch.randn(6, 2, 4)
    expected = ours(x)[0].detach()

    def fail(*args):
        raise AssertionError("the training kernel ran under no_grad")

    monkeypatch.setattr(recurrence._Recurrence, "apply", fail)
    with torch.no_grad():
        assert_near(ours(x)[0], expected, torch.float32)
    ours.requires_grad_(False)
    assert ours(x)[0].grad_fn is None


def test_same_initialisation_as_nn_lstm_under_the_same_seed():
    torch.manual_seed(3)
    ref = nn.LSTM(4, 6, 2, bidirectional=True)
    torch.manual_seed(3)
    ours = DecomposedLSTM(4, 6, 2, bidirectional=True)
    for (name, p), (ref_name, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert name == ref_name and torch.equal(p, q)


def test_state_dicts_load_both_ways_and_conversions_copy():
    torch.manual_seed(0)
    ref = nn.LSTM(3, 5, 2, bidirectional=True, batch_first=True)
    ours = DecomposedLSTM(3, 5, 2, bidirectional=True, batch_first=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    other = nn.LSTM(3, 5, 2, bidirectional=True, batch_first=True)
    other.load_state_dict(ours.state_dict())
    x = torch.randn(2, 7, 3)
    assert torch.equal(other(x)[0], ref(x)[0])

    before = {k: v.clone() for k, v in ref.state_dict().items()}
    converted = DecomposedLSTM.from_torch(ref)
    with torch.no_grad():
        for p in converted.parameters():
            p.add_(1)
    assert all(torch.equal(v, before[k]) for k, v in ref.state_dict().items())
    back = converted.to_torch()
    assert isinstance(back, nn.LSTM) and back.batch_first and back.bidirectional
    assert_near(back(x)[0], converted(x)[0], torch.float32)


def test_proj_size_is_unsupported():
    with pytest.raises(UnsupportedError, match="unsupported.*proj_size=0"):
        DecomposedLSTM(4, 8, proj_size=2)
    with pytest.raises(UnsupportedError, match="unsupported"):
        DecomposedLSTM.from_torch(nn.LSTM(4, 8, proj_size=2))


def test_input_errors():
    ours = DecomposedLSTM(4, 5, 2)
    with pytest.raises(InputError):
        ours(torch.randn(3, 2, 7))
    with pytest.raises(InputError, match="h0"):
        ours(torch.randn(3, 2, 4), (torch.zeros(1, 2, 5), torch.zeros(1, 2, 5)))
    with pytest.raises(UnsupportedError):
        ours(nn.utils.rnn.pack_sequence([torch.randn(3, 4)]))
    with pytest.raises(OptionError):
        DecomposedLSTM(4, 5, dropout=1.5)


def test_dropout_between_layers_draws_the_same_masks_as_nn_lstm():
    torch.manual_seed(0)
    ref = nn.LSTM(5, 6, 3, dropout=0.4, bidirectional=True, dtype=torch.float64).train()
    ours = DecomposedLSTM.from_torch(ref)
    assert ours.training
    results = []
    for module in (ref, ours):
        x = torch.randn(9, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(7)
        output, (h_n, c_n) = module(x)
        results.append((output, *grads(module, weighted_loss(output, h_n, c_n), [x])))
    (out_ref, (dx_ref,), params_ref), (out, (dx,), params) = results
    assert_near(out, out_ref, torch.float64)
    assert_near(dx, dx_ref, torch.float64)
    for name in params:
        assert_near(params[name], params_ref[name], torch.float64)
    torch.manual_seed(8)
    assert not torch.equal(ours(x)[0], out)


@st.composite
def projection_cases(draw):
    hidden = draw(st.integers(1, 5))
    layers = draw(st.integers(1, 2))
    bidirectional = draw(st.booleans())
    width = hidden * (2 if bidirectional else 1)
    swaps = []
    for layer in range(layers):
        for reverse in (False, True) if bidirectional else (False,):
            for kind in ("ih", "hh"):
                choice = draw(st.sampled_from(["dense", "chain", "opaque"]))
                n_in = hidden if kind == "hh" else 3 if layer == 0 else width
                ranks = draw(st.lists(st.integers(1, 6), min_size=0, max_size=2))
                swaps.append((kind, layer, reverse, choice, [n_in, *ranks, 4 * hidden]))
    return dict(hidden=hidden, layers=layers, bidirectional=bidirectional, swaps=swaps,
                steps=draw(st.integers(1, 20)), batch=draw(st.integers(1, 3)), seed=draw(st.integers(0, 999)))


@settings(deadline=None, max_examples=25)
@given(projection_cases())
def test_swapped_projections_match_the_reference(case):
    torch.manual_seed(case["seed"])
    ours = DecomposedLSTM(3, case["hidden"], case["layers"], bidirectional=case["bidirectional"], dtype=torch.float64)
    for kind, layer, reverse, choice, dims in case["swaps"]:
        if choice == "chain":
            ours.set_projection(kind, layer, reverse, Chain(dims))
        elif choice == "opaque":
            ours.set_projection(kind, layer, reverse, Opaque(dims[0], dims[-1]))
    names = dict(ours.named_parameters())
    for kind, layer, reverse, choice, _ in case["swaps"]:
        suffix = f"{kind}_l{layer}{'_reverse' if reverse else ''}"
        assert (f"weight_{suffix}" in names) == (choice == "dense")
        assert any(n.startswith(f"proj_{suffix}.") for n in names) == (choice != "dense")
    x = torch.randn(case["steps"], case["batch"], 3, dtype=torch.float64)
    results = []
    for run in (reference, ours):
        xi = x.clone().requires_grad_()
        output, (h_n, c_n) = run(xi) if run is ours else run(ours, xi)
        results.append((output, *grads(ours, weighted_loss(output, h_n, c_n), [xi])))
    (out_ref, (dx_ref,), params_ref), (out, (dx,), params) = results
    assert_near(out, out_ref, torch.float64)
    assert_near(dx, dx_ref, torch.float64)
    for name in params:
        assert_near(params[name], params_ref[name], torch.float64)


def test_fast_path_for_gemm_factors_and_autograd_loop_for_opaque(monkeypatch):
    calls = []
    original = recurrence._Recurrence.apply
    monkeypatch.setattr(recurrence._Recurrence, "apply", lambda *a: calls.append(1) or original(*a))
    ours = DecomposedLSTM(3, 4, dtype=torch.float64)
    ours.set_projection("hh", 0, False, Chain([4, 2, 16]))
    ours(torch.randn(5, 2, 3, dtype=torch.float64))
    assert calls == [1]
    ours.set_projection("hh", 0, False, Opaque(4, 16))
    ours(torch.randn(5, 2, 3, dtype=torch.float64))
    assert calls == [1]


def test_projection_round_trip_conversion_and_errors():
    torch.manual_seed(0)
    ours = DecomposedLSTM(3, 4, 2, bidirectional=True)
    keys = list(ours.state_dict())
    dense = ours.projection("hh", 1, reverse=True)
    assert isinstance(dense, nn.Linear) and dense.weight is ours.weight_hh_l1_reverse
    ours.set_projection("hh", 1, True, dense)
    assert sorted(ours.state_dict()) == sorted(keys)

    ours.set_projection("ih", 0, False, Chain([3, 2, 16], dtype=torch.float32))
    assert "proj_ih_l0.layers.0.weight" in ours.state_dict() and "weight_ih_l0" not in ours.state_dict()
    x = torch.randn(5, 2, 3)
    assert_near(ours.to_torch()(x)[0], ours(x)[0], torch.float32)

    with pytest.raises(OptionError, match="does not map"):
        ours.set_projection("ih", 1, False, Chain([5, 16], dtype=torch.float32))
    with pytest.raises(OptionError):
        ours.set_projection("xx", 0, False, nn.Linear(3, 16))
    ours.set_projection("hh", 0, False, Opaque(4, 16, dtype=torch.float32))
    with pytest.raises(UnsupportedError):
        ours.to_torch()


@st.composite
def keep_cases(draw):
    hidden = draw(st.integers(2, 6))
    layers = draw(st.integers(1, 2))
    bidirectional = draw(st.booleans())
    steps = draw(st.integers(1, 16))
    input_size = draw(st.integers(2, 6))
    sets = {}
    for layer in range(layers):
        width = input_size if layer == 0 else hidden * (2 if bidirectional else 1)
        pair = []
        for size in (width, hidden):
            mode = draw(st.sampled_from([None, "sequence", "step", "window"]))
            k = draw(st.integers(1, size))
            pair.append(None if mode is None else (mode, k, size))
        sets[layer] = pair
    return dict(hidden=hidden, layers=layers, bidirectional=bidirectional, steps=steps, input_size=input_size,
                sets=sets, batch=draw(st.integers(1, 3)), dropout=draw(st.sampled_from([0.0, 0.5])),
                projection=draw(st.sampled_from(["dense", "chain", "opaque"])), seed=draw(st.integers(0, 999)))


def draw_keep(mode, k, size, steps, generator):
    if mode == "window":
        offsets = torch.randint(0, size, (steps,), generator=generator)
        return KeepSet.windows(torch.randperm(size, generator=generator), offsets, k, scale=size / k)
    if mode == "sequence":
        index = torch.randperm(size, generator=generator)[:k]
    else:
        index = torch.stack([torch.randperm(size, generator=generator)[:k] for _ in range(steps)])
    return KeepSet(index, scale=size / k)


def build_keep_case(case):
    """The DecomposedLSTM a keep case describes, and the dense masks its keep sets stand for."""
    torch.manual_seed(case["seed"])
    generator = torch.Generator().manual_seed(case["seed"])
    hidden, steps = case["hidden"], case["steps"]
    ours = DecomposedLSTM(case["input_size"], hidden, case["layers"], bidirectional=case["bidirectional"],
                dropout=case["dropout"], dtype=torch.float64)
    widths = [case["input_size"]] + [hidden * (2 if case["bidirectional"] else 1)] * (case["layers"] - 1)
    if case["projection"] != "dense":
        make = Chain if case["projection"] == "chain" else Opaque
        for layer, width in enumerate(widths):
            args = ([width, 3, 4 * hidden],) if make is Chain else (width, 4 * hidden)
            ours.set_projection("ih", layer, False, make(*args))
            args = ([hidden, 3, 4 * hidden],) if make is Chain else (hidden, 4 * hidden)
            ours.set_projection("hh", layer, False, make(*args))
    input_masks, hidden_masks = {}, {}
    for layer, specs in case["sets"].items():
        keeps = [None if spec is None else draw_keep(*spec, steps, generator) for spec in specs]
        ours.set_keep_sets(layer, input=keeps[0], hidden=keeps[1])
        if keeps[0] is not None:
            input_masks[layer] = dense_mask(keeps[0], widths[layer], torch.float64)
        if keeps[1] is not None:
            hidden_masks[layer] = dense_mask(keeps[1], hidden, torch.float64)
    if case["dropout"]:
        # An input keep set replaces the random between-layer dropout: keeping every unit makes it exact.
        for layer in range(1, case["layers"]):
            if layer not in input_masks:
                keep = draw_keep("sequence", widths[layer], widths[layer], steps, generator)
                ours.set_keep_sets(layer, input=keep, hidden=ours.keep_sets(layer)[1])
                input_masks[layer] = dense_mask(keep, widths[layer], torch.float64)
    return ours, input_masks, hidden_masks


@settings(deadline=None, max_examples=40)
@given(keep_cases())
def test_keep_sets_equal_the_dense_masked_reference(case):
    ours, input_masks, hidden_masks = build_keep_case(case)
    x = torch.randn(case["steps"], case["batch"], case["input_size"], dtype=torch.float64)
    results = []
    for run in (reference, ours):
        xi = x.clone().requires_grad_()
        output, (h_n, c_n) = run(xi) if run is ours else run(ours, xi, None, input_masks, hidden_masks)
        results.append((output, *grads(ours, weighted_loss(output, h_n, c_n), [xi])))
    (out_ref, (dx_ref,), params_ref), (out, (dx,), params) = results
    assert_near(out, out_ref, torch.float64)
    assert_near(dx, dx_ref, torch.float64)
    for name in params:
        assert_near(params[name], params_ref[name], torch.float64)
    with torch.no_grad():
        assert_near(ours(x)[0], out_ref, torch.float64)
        ours.eval()
        assert_near(ours(x)[0], reference(ours, x)[0], torch.float64)


def fake_training_step_counts(module, shape):
    """Shapes of the outputs and every op's count (forward and backward) of a training step on fake inputs."""
    counter = OpCounter()
    with FakeTensorMode(allow_non_fake_inputs=True), counter:
        x = torch.empty(shape, dtype=torch.float64, requires_grad=True)
        output, (h_n, c_n) = module(x)
        torch.autograd.grad(weighted_loss(output, h_n, c_n), [x, *module.parameters()], allow_unused=True)
    counts = counter.counts[None]
    totals = (dict(counts.macs), counts.other, dict(counts.backward_macs), counts.backward_other)
    return [tuple(t.shape) for t in (output, h_n, c_n)], totals


@settings(deadline=None, max_examples=10)
@given(keep_cases())
def test_shape_propagation_runs_every_step_at_once_and_counts_as_the_loop(case):
    """Fake runs (shape propagation) take every time step in one op each: the same output shapes and the same
    count of every op, forward and backward, as the step-by-step loop."""
    ours, _, _ = build_keep_case(case)
    shape = (case["steps"], case["batch"], case["input_size"])
    at_once = fake_training_step_counts(ours, shape)
    with pytest.MonkeyPatch.context() as patch:
        for module in (recurrence, step_projection):
            patch.setattr(module, "steps_at_once", lambda tensor: False)
        step_by_step = fake_training_step_counts(ours, shape)
    assert at_once == step_by_step


def test_a_fake_run_leaves_the_sequence_length_symbolic():
    """No loop over time steps in shape propagation, so the cost of a DecomposedLSTM stays a formula in T."""
    model = nn.Sequential(DecomposedLSTM(6, 5, 2))
    gm = fr.trace(model, (torch.randn(7, 3, 6),), {"T": (0, 0), "N": (0, 1)})
    assert set(graph_info(gm).symbolic) == {"T", "N"}
    T, N = sympy.symbols("T N", positive=True, integer=True)
    assert fr.cost(gm).macs == T * N * 4 * 5 * (6 + 5 + 5 + 5)


def test_keep_set_validation():
    ours = DecomposedLSTM(4, 5, 2)
    with pytest.raises(OptionError, match="repeats"):
        ours.set_keep_sets(0, input=KeepSet(torch.tensor([1, 1]), 2.0))
    with pytest.raises(OptionError, match="lie in"):
        ours.set_keep_sets(1, hidden=KeepSet(torch.tensor([5]), 2.0))
    with pytest.raises(OptionError, match="int64"):
        ours.set_keep_sets(0, input=KeepSet(torch.tensor([0.0]), 2.0))
    with pytest.raises(OptionError):
        ours.set_keep_sets(2, input=KeepSet(torch.tensor([0]), 2.0))
    ours.set_keep_sets(0, input=KeepSet(torch.tensor([[0], [1]]), 4.0))
    with pytest.raises(InputError, match="steps"):
        ours(torch.randn(3, 1, 4))
    ours.clear_keep_sets()
    assert ours.keep_sets(0) == (None, None)


def counted_macs(module, x):
    with FlopCounterMode(display=False) as counter:
        output, (h_n, c_n) = module(x)
        weighted_loss(output, h_n, c_n).backward()
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("mode", [None, "sequence", "step"])
@pytest.mark.parametrize("low_rank", [False, True])
def test_declared_macs_equal_the_gemms_that_run(mode, low_rank):
    """fxreduce_macs(training=True) equals the multiply-adds of every GEMM of a training step, so keep
    sets really shrink the GEMMs (forward and backward) rather than multiplying zeros."""
    steps, batch, n_in, hidden = 7, 3, 6, 4
    torch.manual_seed(0)
    ours = DecomposedLSTM(n_in, hidden, 2, bidirectional=True, dtype=torch.float64)
    if low_rank:
        ours.set_projection("hh", 1, True, Chain([hidden, 2, 4 * hidden]))
        ours.set_projection("ih", 0, False, Chain([n_in, 3, 4 * hidden]))
    if mode is not None:
        generator = torch.Generator().manual_seed(0)
        ours.set_keep_sets(0, input=draw_keep(mode, 2, n_in, steps, generator))
        ours.set_keep_sets(1, input=draw_keep(mode, 5, 2 * hidden, steps, generator),
                           hidden=draw_keep(mode, 3, hidden, steps, generator))
    x = torch.randn(steps, batch, n_in, dtype=torch.float64, requires_grad=True)
    declared = ours.fxreduce_macs((tuple(x.shape),), training=True)
    assert counted_macs(ours, x) == sum(declared.values())
    if mode is not None:
        dense = DecomposedLSTM(n_in, hidden, 2, bidirectional=True).fxreduce_macs((tuple(x.shape),), training=True)
        assert sum(declared.values()) < sum(dense.values())


def test_declared_macs_hand_count_and_symbols():
    T, N = sympy.symbols("T N", positive=True, integer=True)
    ours = DecomposedLSTM(10, 8, 2, bidirectional=True)
    macs = ours.fxreduce_macs(((T, N, 10),))
    assert set(macs) == {"ih_l0", "hh_l0", "ih_l0_reverse", "hh_l0_reverse",
                         "ih_l1", "hh_l1", "ih_l1_reverse", "hh_l1_reverse"}
    assert macs["ih_l0"] == T * N * 32 * 10 and macs["hh_l0"] == T * N * 32 * 8
    assert macs["ih_l1_reverse"] == T * N * 32 * 16
    assert DecomposedLSTM(10, 8).fxreduce_macs(((5, 10),), training=True) == {"ih_l0": 3 * 5 * 32 * 10, "hh_l0": 3 * 5 * 32 * 8}

    class Declared(Opaque):
        def fxreduce_macs(self, input_shapes, training=False):
            rows, n_in = input_shapes[0]
            return {"linear": rows * n_in * 32 * (3 if training else 1)}

    ours.set_projection("hh", 1, False, Declared(8, 32, dtype=torch.float32))
    assert ours.fxreduce_macs(((T, N, 10),), training=True)["hh_l1"] == 3 * T * N * 8 * 32
    ours.set_keep_sets(0, input=KeepSet(torch.tensor([0, 3]), 5.0))
    assert ours.fxreduce_macs(((T, N, 10),), training=True)["ih_l0"] == 3 * T * N * 32 * 2
    assert ours.fxreduce_macs(((T, N, 10),))["ih_l0"] == T * N * 32 * 10
    ours.set_projection("hh", 1, False, Opaque(8, 32, dtype=torch.float32))
    with pytest.raises(CostError, match="declares no cost"):
        ours.fxreduce_macs(((T, N, 10),))


@pytest.mark.parametrize("bidirectional, batch_first", [(False, True), (True, False)])
def test_small_dense_lstms_take_nn_lstms_kernel(monkeypatch, bidirectional, batch_first, torch_path):
    monkeypatch.setattr(lstm_module, "TORCH_KERNEL_MAX_HIDDEN", 1024)

    def decomposed(*args):
        raise AssertionError("the decomposed recurrence ran")

    monkeypatch.setattr(lstm_module, "fast_recurrence", decomposed)
    torch.manual_seed(0)
    reference = nn.LSTM(5, 8, 2, batch_first=batch_first, bidirectional=bidirectional)
    ours = DecomposedLSTM.from_torch(reference)
    x = torch.randn(3, 4, 5)
    for train in (False, True):
        reference.train(train), ours.train(train)
        out, (h, c) = ours(x)
        ref_out, (ref_h, ref_c) = reference(x)
        assert torch.equal(out, ref_out) and torch.equal(h, ref_h) and torch.equal(c, ref_c)
    grads = torch.autograd.grad(out.sum(), list(ours.parameters()))
    ref_grads = torch.autograd.grad(ref_out.sum(), list(reference.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    ours.set_keep_sets(0, hidden=KeepSet(torch.tensor([0, 3])))
    with pytest.raises(AssertionError, match="decomposed recurrence ran"):  # keep sets need the decomposition
        ours(x)
    ours.eval()(x)  # keep sets act in training only
    ours.set_projection("hh", 0, False, Chain([8, 3, 32]).float())
    with pytest.raises(AssertionError, match="decomposed recurrence ran"):  # so do replaced projections
        ours(x)
