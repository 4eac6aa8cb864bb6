"""The native kernels (fxreduce._C) against their torch references, on every ISA this machine runs.

Contracts: every op equals its reference (float64 within 1e-9, float32 within 1e-4 relative), outputs and
gradients, on odd shapes, empty and full keep sets, T=1, batch 1, non-contiguous operands, both ways the
LSTM loop splits its work; gradcheck; fake implementations give the real shapes; torch.export and the
cost model see the ops; bad input is an error, never a crash; without the extension everything falls back.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import fxreduce
from fxreduce import native
from fxreduce.errors import OptionError
from fxreduce.modules.lstm import DecomposedLSTM
from fxreduce.modules.structured_dropout import StructuredDropoutLinear, StructuredDropoutLSTM

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels not built: {native.MISSING}")

ROOT = Path(__file__).resolve().parents[1]
ISAS = native.supported_isas() or ["none"]
TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4)}
ops = torch.ops.fxreduce


def close(actual, expected, dtype, what=""):
    actual, expected = actual.detach(), expected.detach()
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=what)


def strided(t: torch.Tensor, contiguous: bool) -> torch.Tensor:
    """``t`` itself, or an equal tensor whose last dim is not contiguous in memory."""
    return t if contiguous else t.transpose(-1, -2).contiguous().transpose(-1, -2)


@contextlib.contextmanager
def torch_threads(threads: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def lstm_case(steps: int, batch: int, hidden: int, dtype, generator, std: float):
    """xp, W_hh, h0, c0 and the hidden states' gradient of one random LSTM layer."""
    xp = torch.randn(steps, batch, 4 * hidden, dtype=dtype, generator=generator)
    w = torch.randn(4 * hidden, hidden, dtype=dtype, generator=generator) * std
    h0, c0 = torch.randn(batch, hidden, dtype=dtype), torch.randn(batch, hidden, dtype=dtype)
    return xp, w, h0, c0, torch.randn(steps, batch, hidden, dtype=dtype)


@st.composite
def keep_index(draw, groups: int, rows: int):
    """(index or None, k): None (all rows), one set (k,), or one per group (G, k); sets may be empty, full,
    unsorted or (at the op level, where index_add semantics define them) repeat a row."""
    kind = draw(st.sampled_from(["none", "shared", "per_group"]))
    if kind == "none":
        return None, rows
    k = draw(st.sampled_from([0, rows, draw(st.integers(0, rows))]))
    repeats = draw(st.booleans()) and k > 1

    def one_set(seed):
        generator = torch.Generator().manual_seed(seed)
        if repeats:
            return torch.randint(0, rows, (k,), generator=generator)
        return torch.randperm(rows, generator=generator)[:k]

    seed = draw(st.integers(0, 10_000))
    if kind == "shared":
        return one_set(seed), k
    return torch.stack([one_set(seed + g) for g in range(groups)]) if groups else torch.empty(0, k, dtype=torch.long), k


@given(data=st.data(), dtype=st.sampled_from([torch.float64, torch.float32]), isa=st.sampled_from(ISAS),
       contiguous=st.booleans())
def test_gather_matmul_and_its_gradients_equal_the_reference(data, dtype, isa, contiguous):
    groups, rows = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 7))
    width, out = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 83))
    index, k = data.draw(keep_index(groups, width))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    x = strided(torch.randn(groups, rows, k, dtype=dtype, generator=generator), contiguous)
    wt = strided(torch.randn(width, out, dtype=dtype, generator=generator), contiguous)
    dout = strided(torch.randn(groups, rows, out, dtype=dtype, generator=generator), contiguous)
    bias = torch.randn(out, dtype=dtype, generator=generator) if data.draw(st.booleans()) else None
    with native.forced_isa(isa):
        close(ops.gather_matmul(x, wt, index, bias), native.gather_matmul_reference(x, wt, index, bias), dtype,
              "forward")
        if bias is not None:
            leaf = bias.clone().requires_grad_()
            (grad,) = torch.autograd.grad(native.gather_matmul(x, wt, index, leaf), leaf, dout)
            close(grad, dout.sum((0, 1)), dtype, "bias gradient")
        close(ops.gather_matmul_input_grad(dout, wt, index, k),
              native.gather_matmul_input_grad_reference(dout, wt, index, k), dtype, "input gradient")
        close(ops.gather_matmul_weight_grad(x, dout, index, width),
              native.gather_matmul_weight_grad_reference(x, dout, index, width), dtype, "weight gradient")


@given(data=st.data(), dtype=st.sampled_from([torch.float64, torch.float32]), isa=st.sampled_from(ISAS),
       threads=st.sampled_from([1, 2]))
def test_gemms_that_copy_their_b_blocks_first_equal_the_reference(data, dtype, isa, threads):
    """From 64 rows of B on, the AVX2 build copies each group's block of B into contiguous panels before its row
    tiles read it (the shapes above stay below that): forward (B through the keep set) and weight gradient (B
    the output gradient's rows), on any column width, partial tiles included."""
    groups, rows = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 13))
    width, out = data.draw(st.integers(60, 140)), data.draw(st.integers(1, 150))
    index, k = data.draw(keep_index(groups, width))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    x = torch.randn(groups, rows, k, dtype=dtype, generator=generator)
    wt = torch.randn(width, out, dtype=dtype, generator=generator)
    long_rows = data.draw(st.integers(60, 140))
    xg = torch.randn(groups, long_rows, k, dtype=dtype, generator=generator)
    dout = torch.randn(groups, long_rows, out, dtype=dtype, generator=generator)
    with torch_threads(threads), native.forced_isa(isa):
        close(ops.gather_matmul(x, wt, index, None), native.gather_matmul_reference(x, wt, index, None), dtype,
              "forward")
        close(ops.gather_matmul_weight_grad(xg, dout, index, width),
              native.gather_matmul_weight_grad_reference(xg, dout, index, width), dtype, "weight gradient")


@given(shape=st.lists(st.integers(0, 23), min_size=2, max_size=5), dtype=st.sampled_from([torch.float64, torch.float32]),
       isa=st.sampled_from(ISAS), threads=st.sampled_from([1, 2]), contiguous=st.booleans(),
       seed=st.integers(0, 1000))
def test_channel_sums_equal_the_reference(shape, dtype, isa, threads, contiguous, seed):
    x = strided(torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed)), contiguous)
    with torch_threads(threads):
        with native.forced_isa(isa):
            for actual, expected in zip(ops.channel_sums(x), native.channel_sums_reference(x)):
                close(actual, expected, dtype)


@given(rows=st.integers(0, 41), cols=st.integers(0, 41), dtype=st.sampled_from([torch.float64, torch.float32]),
       isa=st.sampled_from(ISAS), threads=st.sampled_from([1, 2]),
       layout=st.sampled_from(["rows", "columns", "sliced"]), seed=st.integers(0, 1000))
def test_transposed_and_its_gradient_equal_the_reference(rows, cols, dtype, isa, threads, layout, seed):
    generator = torch.Generator().manual_seed(seed)
    if layout == "sliced":  # neither dim contiguous
        x = torch.randn(rows, 2 * cols + 1, dtype=dtype, generator=generator)[:, 1::2]
    else:
        x = strided(torch.randn(rows, cols, dtype=dtype, generator=generator), layout == "rows")
    grad = torch.randn(cols, rows, dtype=dtype, generator=generator)
    with torch_threads(threads):
        with native.forced_isa(isa):
            got = ops.transposed(x)
            assert got.is_contiguous() and torch.equal(got, native.transposed_reference(x))
            leaf = x.detach().requires_grad_()
            (gradient,) = torch.autograd.grad(native.transposed(leaf), leaf, grad)
            assert gradient.is_contiguous() and torch.equal(gradient, grad.t())  # a weight's grad needs no copy


@given(groups=st.integers(0, 6), width=st.integers(0, 50), data=st.data(), ties=st.booleans(),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 1000))
def test_smallest_k_equals_the_reference(groups, width, data, ties, threads, seed):
    k = data.draw(st.integers(0, width))
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, 4, (groups, width), generator=generator).float() if ties else \
        torch.rand(groups, width, generator=generator)
    with torch_threads(threads):
        assert torch.equal(ops.smallest_k(keys, k), native.smallest_k_reference(keys, k))


@given(data=st.data(), dtype=st.sampled_from([torch.float64, torch.float32]), isa=st.sampled_from(ISAS),
       reverse=st.booleans(), threads=st.sampled_from([1, 2]), contiguous=st.booleans())
def test_lstm_layer_and_its_backward_equal_the_reference(data, dtype, isa, reverse, threads, contiguous):
    # Batches from 1 to 12 take both ways the loop splits its work at 2 threads (rows, or units per step).
    steps, rows, hidden = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 12)), data.draw(st.integers(1, 21))
    index, k = data.draw(keep_index(steps, hidden))
    scale = data.draw(st.sampled_from([1.0, 2.0, 1 / 0.35]))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))

    def randn(*shape, std=1.0):
        return strided(torch.randn(*shape, dtype=dtype, generator=generator) * std, contiguous)

    xp, h0, c0, wt = randn(steps, rows, 4 * hidden), randn(rows, hidden), randn(rows, hidden), randn(hidden, 4 * hidden, std=0.4)
    dhs, dc = randn(steps, rows, hidden), randn(rows, hidden)
    with torch_threads(threads):
        with native.forced_isa(isa):
            got = ops.lstm_layer(xp, h0, c0, wt, index, scale, reverse)
            want = native.lstm_layer_reference(xp, h0, c0, wt, index, scale, reverse)
            for name, a, e in zip(("hs", "c_last", "acts", "cs", "tanh_cs"), got, want):
                close(a, e, dtype, name)
            for name, a, e in zip(("inference hs", "inference c_last"),
                                  ops.lstm_layer_inference(xp, h0, c0, wt, index, scale, reverse), want):
                close(a, e, dtype, name)
            saved = (*want[2:], want[0], h0, c0, wt, index, scale, reverse)
            got = ops.lstm_layer_backward(dhs, dc, *saved)
            want = native.lstm_layer_backward_reference(dhs, dc, *saved)
            for name, a, e in zip(("dxp", "dh0", "dc0", "dwt"), got, want):
                close(a, e, dtype, name)


@pytest.mark.parametrize("kind", ["none", "shared", "per_group"])
def test_tall_weight_gradients_split_their_rows_across_threads(kind):
    """Weight gradients with many rows and few column tiles run split by rows at 2 threads unless a keep set
    scatters them (the hypothesis shapes above are too small to reach either choice); both add up."""
    generator = torch.Generator().manual_seed(0)
    groups, rows, width, out = 3, 4, 200, 70
    index = {"none": None, "shared": torch.randperm(width, generator=generator)[:150],
             "per_group": torch.stack([torch.randperm(width, generator=generator)[:150] for _ in range(groups)])}[kind]
    k = width if index is None else 150
    x = torch.randn(groups, rows, k, dtype=torch.float64, generator=generator)
    dout = torch.randn(groups, rows, out, dtype=torch.float64, generator=generator)
    xp = torch.randn(5, 3, 160, dtype=torch.float64, generator=generator)
    wt = torch.randn(160, 40, dtype=torch.float64, generator=generator).t()  # W_hh.t(), as the module passes it
    h0, c0 = torch.randn(3, 40, dtype=torch.float64), torch.randn(3, 40, dtype=torch.float64)
    dhs = torch.randn(5, 3, 40, dtype=torch.float64)
    with torch_threads(2):
        close(ops.gather_matmul_weight_grad(x, dout, index, width),
              native.gather_matmul_weight_grad_reference(x, dout, index, width), torch.float64, "weight gradient")
        hs, _, acts, cs, tcs = native.lstm_layer_reference(xp, h0, c0, wt, None, 1.0, False)
        saved = (acts, cs, tcs, hs, h0, c0, wt, None, 1.0, False)
        got = ops.lstm_layer_backward(dhs, torch.zeros_like(c0), *saved)
        want = native.lstm_layer_backward_reference(dhs, torch.zeros_like(c0), *saved)
        close(got[3], want[3], torch.float64, "recurrent weight gradient")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["none", "shared", "per_group"])
def test_weight_gradients_over_many_column_tiles_equal_the_reference(kind, dtype):
    """From six column tiles and 2^16 elements of A on, a GEMM whose A is read down its columns (x^T, dgates^T)
    runs on a transposed copy of A (one per group where the groups differ), on every ISA; the hypothesis
    shapes above stay below that."""
    generator = torch.Generator().manual_seed(1)
    groups, rows, width, out = 3, 512, 140, 6 * 64 + 5
    index = {"none": None, "shared": torch.randperm(width, generator=generator)[:128],
             "per_group": torch.stack([torch.randperm(width, generator=generator)[:128] for _ in range(groups)])}[kind]
    k = width if index is None else 128
    x = strided(torch.randn(groups, rows, k, dtype=dtype, generator=generator), kind != "shared")
    dout = torch.randn(groups, rows, out, dtype=dtype, generator=generator)
    xp, w, h0, c0, dhs = lstm_case(5, 50, 6 * 64 + 3, dtype, generator, std=0.05)
    for isa, threads in itertools.product(ISAS, (1, 2)):
        with torch_threads(threads), native.forced_isa(isa):
            close(ops.gather_matmul_weight_grad(x, dout, index, width),
                  native.gather_matmul_weight_grad_reference(x, dout, index, width), dtype, "weight gradient")
            for wt in (w.t(), w.t().contiguous()):  # dW_hh in W_hh's layout, and in wt's
                hs, _, acts, cs, tcs = native.lstm_layer_reference(xp, h0, c0, wt, None, 1.0, False)
                saved = (acts, cs, tcs, hs, h0, c0, wt, None, 1.0, False)
                got = ops.lstm_layer_backward(dhs, torch.zeros_like(c0), *saved)
                want = native.lstm_layer_backward_reference(dhs, torch.zeros_like(c0), *saved)
                close(got[3], want[3], dtype, "recurrent weight gradient")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["none", "shared", "per_group"])
def test_gemms_over_a_long_k_in_chunks_equal_the_reference(kind, dtype):
    """A K above the kernel's chunk (768 rows of B) runs chunk by chunk, later chunks adding into C, on every
    ISA: the indirect-K forward with its bias, the scattered weight gradient, and both LSTM loops on packed
    panels."""
    generator = torch.Generator().manual_seed(2)
    groups, rows, width, out = 2, 400, 900, 70
    index = {"none": None, "shared": torch.randperm(width, generator=generator)[:800],
             "per_group": torch.stack([torch.randperm(width, generator=generator)[:800] for _ in range(groups)])}[kind]
    k = width if index is None else 800
    x = torch.randn(groups, 3, k, dtype=dtype, generator=generator)
    wt = torch.randn(width, out, dtype=dtype, generator=generator)
    bias = torch.randn(out, dtype=dtype, generator=generator)
    xg = torch.randn(groups, rows, 30, dtype=dtype, generator=generator)
    dout = torch.randn(groups, rows, out, dtype=dtype, generator=generator)
    grad_index = None if index is None else index[..., :30]
    xp, w, h0, c0, dhs = lstm_case(2, 3, 800, dtype, generator, std=0.03)
    for isa, threads in itertools.product(ISAS, (1, 2)):
        with torch_threads(threads), native.forced_isa(isa):
            close(ops.gather_matmul(x, wt, index, bias), native.gather_matmul_reference(x, wt, index, bias), dtype,
                  "forward")
            grad_rows = 30 if index is None else width
            close(ops.gather_matmul_weight_grad(xg, dout, grad_index, grad_rows),
                  native.gather_matmul_weight_grad_reference(xg, dout, grad_index, grad_rows), dtype, "weight gradient")
            got = ops.lstm_layer(xp, h0, c0, w.t(), None, 1.0, False)
            want = native.lstm_layer_reference(xp, h0, c0, w.t(), None, 1.0, False)
            close(got[0], want[0], dtype, "hs")
            saved = (*want[2:], want[0], h0, c0, w.t(), None, 1.0, False)
            got = ops.lstm_layer_backward(dhs, torch.zeros_like(c0), *saved)
            want = native.lstm_layer_backward_reference(dhs, torch.zeros_like(c0), *saved)
            for name, a, e in zip(("dxp", "dh0", "dc0", "dwt"), got, want):
                close(a, e, dtype, name)


@pytest.mark.parametrize("isa", ISAS)
def test_gradcheck_on_small_shapes(isa):
    generator = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator).requires_grad_()

    index = torch.tensor([[2, 0], [1, 3], [3, 2]])
    with native.forced_isa(isa):
        assert torch.autograd.gradcheck(lambda x, wt: ops.gather_matmul(x, wt, index), (leaf(3, 2, 2), leaf(4, 5)))
        for keep in (None, index[:, :1] % 3, torch.tensor([0, 2])):
            for reverse in (False, True):
                def layer(xp, h0, c0, wt, keep=keep, reverse=reverse):
                    return ops.lstm_layer(xp, h0, c0, wt, keep, 1.5, reverse)[:2]

                assert torch.autograd.gradcheck(layer, (leaf(3, 2, 12), leaf(2, 3), leaf(2, 3), leaf(3, 12)))


def test_fake_implementations_give_the_real_shapes():
    index = torch.tensor([[0, 3, 5], [1, 2, 4]])
    args = {
        "channel_sums": (torch.randn(2, 5, 3, 4),),
        "transposed": (torch.randn(5, 3),),
        "smallest_k": (torch.rand(4, 9), 3),
        "gather_matmul": (torch.randn(2, 3, 3), torch.randn(7, 11), index),
        "gather_matmul_input_grad": (torch.randn(2, 3, 11), torch.randn(7, 11), index, 3),
        "gather_matmul_weight_grad": (torch.randn(2, 3, 3), torch.randn(2, 3, 11), index, 7),
        "lstm_layer": (torch.randn(2, 3, 24), torch.randn(3, 6), torch.randn(3, 6), torch.randn(6, 24), index, 2.0, False),
    }
    args["lstm_layer_inference"] = args["lstm_layer"]
    real = {name: getattr(ops, name)(*a) for name, a in args.items()}
    hs, _, acts, cs, tcs = real["lstm_layer"]
    args["lstm_layer_backward"] = (hs, torch.randn(3, 6), acts, cs, tcs, hs, *args["lstm_layer"][1:])
    real["lstm_layer_backward"] = ops.lstm_layer_backward(*args["lstm_layer_backward"])
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        for name, a in args.items():
            fake_args = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in a]
            fake = getattr(ops, name)(*fake_args)
            fake, want = (fake, real[name]) if isinstance(fake, tuple) else ((fake,), (real[name],))
            assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in want], name


class IndirectProjection(nn.Module):
    """A module calling the indirect-K op, as a rewritten graph would."""

    def __init__(self):
        super().__init__()
        self.wt = nn.Parameter(torch.randn(9, 13))
        self.register_buffer("index", torch.tensor([[0, 4, 8], [1, 2, 7]]))

    def forward(self, x):
        return ops.gather_matmul(x, self.wt, self.index)


def test_torch_export_and_flop_counting_see_the_ops():
    module, x = IndirectProjection(), torch.randn(2, 5, 3)
    exported = torch.export.export(module, (x,))
    assert any("fxreduce.gather_matmul" in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), module(x))
    with FlopCounterMode(display=False) as counter:
        module(x.requires_grad_()).sum().backward()
    # forward + input gradient + weight gradient, each 2 x (2 groups x 5 rows x 3 kept x 13 outputs) FLOPs.
    assert counter.get_total_flops() == 3 * 2 * 2 * 5 * 3 * 13


def test_cost_model_counts_the_ops_in_a_traced_graph():
    traced = fxreduce.trace(IndirectProjection(), (torch.randn(2, 5, 3),), leaf_modules=())
    cost = fxreduce.cost(traced, training=True)
    # A training step: the forward and the weight gradient (the graph input needs no gradient).
    assert int(sum(cost.total.macs.values())) == int(sum(cost.total.backward_macs.values())) == 2 * 5 * 3 * 13


def test_bad_input_is_a_clear_error_never_a_crash():
    x, wt = torch.randn(2, 3, 2), torch.randn(5, 7)
    cases = [
        ((x, wt, torch.tensor([[0, 5], [1, 2]])), r"index values must lie in \[0, 5\)"),
        ((x, wt, torch.tensor([[0, -1], [1, 2]])), r"index values must lie in \[0, 5\)"),
        ((x, wt, torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)), "expected int64"),
        ((x, wt, torch.tensor([0, 1, 2])), r"index must have shape \(2,\) or \(2, 2\)"),
        ((x, wt, None), "must equal the weight's rows"),
        ((x.half(), wt.half(), torch.tensor([0, 1])), "float32 or float64"),
        ((x.bfloat16(), wt.bfloat16(), torch.tensor([0, 1])), "float32 or float64"),
        ((x, wt.double(), torch.tensor([0, 1])), "expected Double|expected Float|dtype Double"),
        ((x[0], wt, torch.tensor([0, 1])), "expected x"),
        ((x, wt, torch.tensor([0, 1]), torch.randn(6)), r"bias must have shape \(7,\)"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            ops.gather_matmul(*args)
    for loop in (ops.lstm_layer, ops.lstm_layer_inference):
        with pytest.raises(RuntimeError, match="h0 and c0 must be"):
            loop(torch.randn(2, 3, 8), torch.randn(3, 3), torch.randn(3, 2), torch.randn(2, 8), None, 1.0, False)
        with pytest.raises(RuntimeError, match=r"index values must lie in \[0, 2\)"):
            loop(torch.randn(2, 3, 8), torch.randn(3, 2), torch.randn(3, 2), torch.randn(2, 8),
                 torch.tensor([[0], [2]]), 1.0, False)
    with pytest.raises(RuntimeError, match="batch and a channel dim"):
        ops.channel_sums(torch.randn(5))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.channel_sums(torch.randn(2, 3, 4).half())
    with pytest.raises(RuntimeError, match="must be 2-d"):
        ops.transposed(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match="keys contain NaN"):
        ops.smallest_k(torch.tensor([[0.5, float("nan"), 0.1]]), 2)
    with pytest.raises(RuntimeError, match=r"k must lie in \[0, 3\]"):
        ops.smallest_k(torch.rand(2, 3), 4)
    with pytest.raises(RuntimeError, match="keys must be"):
        ops.smallest_k(torch.rand(6), 2)
    with pytest.raises(OptionError, match="not available"):
        with native.forced_isa("sparc"):
            pass


def test_other_dtypes_and_devices_take_the_torch_reference():
    x, wt, index = torch.randn(2, 3, 2), torch.randn(5, 7), torch.tensor([[0, 4], [1, 2]])
    assert native.serves(x, wt) and not native.serves(x.half(), wt.half()) and not native.serves(x, wt.double())
    assert not native.serves(x.to("meta"), wt.to("meta"))  # any device but the CPU: CUDA tensors take torch's GEMMs
    half = native.gather_matmul(x.bfloat16(), wt.bfloat16(), index)
    torch.testing.assert_close(half.float(), native.gather_matmul_reference(x, wt, index), rtol=0.05, atol=0.05)


def test_unsorted_and_repeated_keep_sets_are_rejected_by_the_module():
    lstm = DecomposedLSTM(6, 4)
    with pytest.raises(OptionError, match="repeats a unit"):
        from fxreduce.modules.lstm import KeepSet
        lstm.set_keep_sets(0, input=KeepSet(torch.tensor([[3, 1, 3]] * 2)))


@pytest.mark.parametrize("mode", ["per_step", "per_sequence", "per_step_window"])
@pytest.mark.parametrize("recurrent", [False, True])
def test_structured_dropout_modules_equal_on_native_and_torch_paths(mode, recurrent):
    torch.manual_seed(0)
    original = nn.LSTM(7, 12, 2, dropout=0.5, dtype=torch.float64)
    outputs = []
    for disabled in (False, True):
        module = StructuredDropoutLSTM.from_lstm(original, p=0.4, mode=mode, recurrent=recurrent, mask_input=True,
                                                 seed=5).train()
        decoder = StructuredDropoutLinear(12, 5, p=0.4, seed=2, mode=mode, time_dim=0, dtype=torch.float64).train()
        decoder.load_state_dict(dict(zip(("weight", "bias"), (torch.ones(5, 12, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)))))
        x = torch.randn(9, 3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with native.disabled() if disabled else native.forced_isa(native.active_isa()):
            out = decoder(module(x)[0])
            grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum(),
                                        [x, *module.parameters(), decoder.weight])
        outputs.append((out, grads))
    (out_native, grads_native), (out_torch, grads_torch) = outputs
    close(out_native, out_torch, torch.float64)
    for a, e in zip(grads_native, grads_torch):
        close(a, e, torch.float64)


@pytest.mark.parametrize("recurrent", [False, True])
def test_structured_dropout_lstm_weights_are_stored_transposed_and_their_gradients_need_no_copy(recurrent):
    original = nn.LSTM(7, 12, 2, dropout=0.5)
    module = StructuredDropoutLSTM.from_lstm(original, p=0.4, mode="per_step", recurrent=recurrent, mask_input=True,
                                             seed=5).train()
    weights = {name: p for name, p in module.named_parameters() if name.startswith("weight_")}
    assert weights and all(p.t().is_contiguous() for p in weights.values())
    module(torch.randn(9, 3, 7))[0].sum().backward()
    for name, param in weights.items():  # AccumulateGrad keeps a gradient whose strides match its parameter's
        assert param.grad.stride() == param.stride(), name
    restored = nn.LSTM(7, 12, 2, dropout=0.5)
    restored.load_state_dict(module.state_dict())
    for name, param in restored.named_parameters():
        assert torch.equal(param, getattr(original, name)), name


def test_dense_lstm_runs_the_native_loop_and_keeps_no_graph_or_activations_under_no_grad(monkeypatch):
    calls = []
    original = native.call
    monkeypatch.setattr(native, "call", lambda name, *a: calls.append(name) or original(name, *a))
    torch.manual_seed(0)
    reference = nn.LSTM(5, 8, 2, bidirectional=True)
    ours = DecomposedLSTM.from_torch(reference)
    x = torch.randn(4, 3, 5)
    with torch.no_grad():
        out, (h, c) = ours(x)
    assert calls == ["lstm_layer_inference"] * 4 and out.grad_fn is None
    ref_out, (ref_h, ref_c) = reference(x)
    close(out, ref_out.detach(), torch.float32)
    calls.clear()
    ours(x)[0].sum().backward()
    assert [name for name in calls if name.startswith("lstm_layer")] == ["lstm_layer"] * 4


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter; fxreduce's own variables only as given (CI sets REQUIRE_VARIABLE)."""
    inherited = {k: v for k, v in os.environ.items() if k not in (native.ISA_VARIABLE, native.REQUIRE_VARIABLE)}
    environment = {**inherited, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, cwd=ROOT,
                          timeout=300)


def test_isa_environment_variable_picks_the_kernels():
    last = ISAS[-1]
    result = run_python("from fxreduce import native; print(native.active_isa())", FXREDUCE_ISA=last)
    assert result.returncode == 0 and result.stdout.strip() == last, result.stderr
    result = run_python("import fxreduce.native", FXREDUCE_ISA="sparc")
    assert result.returncode != 0 and "FXREDUCE_ISA=sparc is not available" in result.stderr


def test_without_the_extension_one_warning_and_the_torch_path_serves():
    hide = "import sys; sys.modules['fxreduce._C'] = None\n"
    code = hide + (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from fxreduce import native\n"
        "    from fxreduce.modules import StructuredDropoutLSTM\n"
        "print(sum('torch reference kernels' in str(w.message) for w in caught), native.available())\n"
        "m = StructuredDropoutLSTM(4, 6, 2, dropout=0.5, recurrent=True).train()\n"
        "m(torch.randn(5, 2, 4))[0].sum().backward()\n"
        "print('\\n'.join(native.report()))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "1 False" and "unavailable" in result.stdout
    result = run_python(hide + "import fxreduce.native", FXREDUCE_REQUIRE_NATIVE="1")
    assert result.returncode != 0 and "fxreduce._C could not be imported" in result.stderr


def test_doctor_reports_the_active_kernels():
    result = run_python("from fxreduce.cli import main; main(['doctor'])")
    assert result.returncode == 0, result.stderr
    assert f"ISA {native.active_isa()}" in result.stdout and "fxreduce.lstm_layer" in result.stdout
    assert f"sources {native.sources_digest()}" in result.stdout
    assert "fxreduce.sparse_int8_conv2d" in result.stdout and "fxreduce.lowrank_linear" in result.stdout

