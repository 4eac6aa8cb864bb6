"""The fused low-rank products (torch.ops.fxreduce.lowrank_linear, grouped_lowrank_linear) against their torch
references.

Contracts: equal to ``F.linear(F.linear(x, V), U, b)`` (float64 within 1e-9, float32 within 1e-4 relative) on
every ISA, rank 1, odd sizes, one row, row counts on both of the op's work splits and several row blocks,
non-contiguous operands, with and without bias; its gradients equal the reference's; gradcheck;
LowRankLinear runs it in inference only; the fake implementation and FLOP formula; bad input is an
FxReduceError from Python and an error, never a crash, from the op; everything else (half precision, small
row counts, no native) runs the reference. The grouped op (AntMan's block-diagonal factors, shuffled or not)
equals its reference on every ISA at random group counts, ranks, odd sizes and both work splits, and the grouped
forms' fused inference equals their modules' own path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from fxreduce import native
from fxreduce.errors import FxReduceError
from fxreduce.modules.factorized import LowRankLinear, factorize
from fxreduce.modules.lowrank_kernel import (GROUPED_MIN_ROWS, MIN_ROWS, fused_serves,
                                             grouped_lowrank_linear_reference, grouped_serves, lowrank_linear,
                                             lowrank_linear_reference)

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels not built: {native.MISSING}")

ISAS = native.supported_isas() or ["none"]
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def close(actual, expected, dtype, what=""):
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.detach(), expected.detach(), rtol=tol, atol=tol * scale, msg=what)


def stored(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` contiguous, transposed in memory (2-D and up), or a strided slice of a larger tensor: equal values."""
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype)
        wide[..., 1::2] = t
        return wide[..., 1::2]
    return t


@st.composite
def problems(draw, dtype):
    rows = draw(st.sampled_from([1, 5, 6, 7, 18, 19, 24, 47, 48, 95, 96, 97, draw(st.integers(1, 150))]))
    in_features, out_features = draw(st.integers(1, 90)), draw(st.integers(1, 150))
    rank = draw(st.sampled_from([1, min(in_features, out_features), draw(st.integers(1, 40))]))
    lead = draw(st.sampled_from([(rows,), (1, rows), ()])) if rows == 1 else (rows,)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    layout = st.sampled_from(["contiguous", "transposed", "sliced"])
    x = stored(torch.randn(*lead, in_features, dtype=dtype, generator=generator), draw(layout))
    first = stored(torch.randn(rank, in_features, dtype=dtype, generator=generator), draw(layout))
    second = stored(torch.randn(out_features, rank, dtype=dtype, generator=generator), draw(layout))
    bias = torch.randn(out_features, dtype=dtype, generator=generator) if draw(st.booleans()) else None
    return x, first, second, bias


@pytest.mark.parametrize("isa", ISAS)
@given(data=st.data(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_the_op_equals_two_gemms(isa, data, dtype):
    x, first, second, bias = data.draw(problems(dtype))
    with native.forced_isa(isa):
        out = torch.ops.fxreduce.lowrank_linear(x, first, second, bias)
    assert out.shape == (*x.shape[:-1], second.shape[0]) and out.dtype == dtype
    close(out, lowrank_linear_reference(x, first, second, bias), dtype, f"{isa} {x.shape} {first.shape}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_several_row_blocks_per_thread(isa, dtype):
    """700 rows at rank 200: each thread's rows take several blocks of the (L2-sized) intermediate buffer."""
    generator = torch.Generator().manual_seed(1)
    x, first, second, bias = (torch.randn(*shape, dtype=dtype, generator=generator)
                              for shape in ((700, 5), (200, 5), (70, 200), (70,)))
    with native.forced_isa(isa):
        out = torch.ops.fxreduce.lowrank_linear(x, first, second, bias)
    close(out, lowrank_linear_reference(x, first, second, bias), dtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_ops_gradients_equal_the_reference(isa, dtype):
    torch.manual_seed(0)
    operands = [torch.randn(*shape, dtype=dtype, requires_grad=True) for shape in ((3, 50, 70), (11, 70), (130, 11),
                                                                                     (130,))]
    reference = [t.detach().clone().requires_grad_() for t in operands]
    with native.forced_isa(isa):
        out = torch.ops.fxreduce.lowrank_linear(*operands)
    want = lowrank_linear_reference(*reference)
    close(out, want, dtype, "forward")
    grad = torch.randn_like(want)
    out.backward(grad)
    want.backward(grad)
    for name, got, expected in zip(("x", "first", "second", "bias"), operands, reference):
        close(got.grad, expected.grad, dtype, f"gradient of {name}")


def test_lowrank_linear_runs_the_op_in_inference_only():
    module = LowRankLinear(70, 130, 11)
    x = torch.randn(MIN_ROWS, 70)
    assert not fused_serves(x, module.first, module.second, module.bias)  # the parameters need gradients
    with torch.no_grad():
        assert fused_serves(x, module.first, module.second, module.bias)
        close(module(x), lowrank_linear_reference(x, module.first, module.second, module.bias), torch.float32)
    out = module(x)
    assert "lowrank_linear" not in type(out.grad_fn).__name__


def test_gradcheck():
    generator = torch.Generator().manual_seed(0)
    for rows, k, r, n in ((1, 3, 1, 2), (13, 3, 2, 5), (100, 2, 1, 3)):  # both work splits
        operands = [torch.randn(*shape, dtype=torch.float64, generator=generator, requires_grad=True)
                    for shape in ((rows, k), (r, k), (n, r), (n,))]
        assert torch.autograd.gradcheck(torch.ops.fxreduce.lowrank_linear, operands)
        assert torch.autograd.gradcheck(lambda x, v, u: torch.ops.fxreduce.lowrank_linear(x, v, u, None),
                                        operands[:3])


def test_fake_implementation_and_flop_formula():
    with FakeTensorMode():
        out = torch.ops.fxreduce.lowrank_linear(torch.empty(2, 9, 12), torch.empty(3, 12), torch.empty(20, 3), None)
    assert out.shape == (2, 9, 20)
    x, first, second = torch.randn(2, 9, 12), torch.randn(3, 12), torch.randn(20, 3)
    with FlopCounterMode(display=False) as counter:
        torch.ops.fxreduce.lowrank_linear(x, first, second, None)
    assert counter.get_total_flops() == 2 * 18 * 3 * (12 + 20)


def test_bad_operands_are_clear_errors():
    x, first, second, bias = torch.randn(70, 8), torch.randn(2, 8), torch.randn(5, 2), torch.randn(5)
    bad = [(torch.randn(70, 7), first, second, bias), (x, first, torch.randn(5, 3), bias),
           (x, first, second, torch.randn(4)), (x, first.double(), second, bias), (x.int(), first, second, bias),
           (x, first[None], second, bias)]
    for args in bad:
        with pytest.raises(FxReduceError):
            lowrank_linear(*args)
        with pytest.raises(RuntimeError, match="fxreduce.lowrank_linear"):
            torch.ops.fxreduce.lowrank_linear(*args)
    with pytest.raises(RuntimeError, match="fxreduce.lowrank_linear"):
        torch.ops.fxreduce.lowrank_linear(torch.tensor(1.0), first, second, bias)


def test_doctor_lists_the_kernel():
    assert any("torch.ops.fxreduce.lowrank_linear" in line for line in native.report())
    assert any("torch.ops.fxreduce.grouped_lowrank_linear" in line for line in native.report())


def test_where_the_op_does_not_serve_the_reference_runs():
    x, first, second = torch.randn(MIN_ROWS, 8), torch.randn(2, 8), torch.randn(5, 2)
    assert fused_serves(x, first, second, None)
    assert not fused_serves(x.requires_grad_(), first, second, None)
    x = x.detach()
    assert not fused_serves(x[: MIN_ROWS - 1], first, second, None)
    assert not fused_serves(x.bfloat16(), first.bfloat16(), second.bfloat16(), None)
    with native.disabled():
        assert not fused_serves(x, first, second, None)
    half = [t.bfloat16() for t in (x, first, second)]
    assert torch.equal(lowrank_linear(*half, None), F.linear(F.linear(half[0], half[1]), half[2]))
    empty = torch.ops.fxreduce.lowrank_linear(torch.randn(0, 8), first, second, None)
    assert empty.shape == (0, 5)


@st.composite
def grouped_problems(draw, dtype):
    """Block-diagonal factors in GroupLinear's layout: (g1, r1, k1) and (g2, n2, r2) with g1 r1 = g2 r2, or no
    first factor (GroupLinear alone, g2 r2 = in)."""
    rows = draw(st.sampled_from([1, 7, 8, 47, 96, 97, draw(st.integers(1, 200))]))
    g1, g2 = draw(st.sampled_from([1, 2, 3, 4])), draw(st.sampled_from([1, 2, 3, 4]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    layout = st.sampled_from(["contiguous", "transposed", "sliced"])
    two = draw(st.booleans())
    r2 = draw(st.integers(1, 40))
    if two:
        rank = g2 * r2 * g1  # divisible by both group counts
        first = stored(torch.randn(g1, rank // g1, draw(st.integers(1, 30)), dtype=dtype, generator=generator),
                       draw(layout))
        second = torch.randn(g2, draw(st.integers(1, 150)), rank // g2, dtype=dtype, generator=generator)
        in_features, shuffle = g1 * first.shape[2], draw(st.booleans())
    else:
        first, shuffle = None, False
        second = torch.randn(g2, draw(st.integers(1, 150)), r2, dtype=dtype, generator=generator)
        in_features = g2 * r2
    x = stored(torch.randn(rows, in_features, dtype=dtype, generator=generator), draw(layout))
    bias = torch.randn(second.shape[0] * second.shape[1], dtype=dtype, generator=generator) if draw(st.booleans()) \
        else None
    return x, first, stored(second, draw(layout)), bias, shuffle


@pytest.mark.parametrize("isa", ISAS)
@given(data=st.data(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_the_grouped_op_equals_its_reference(isa, data, dtype):
    x, first, second, bias, shuffle = data.draw(grouped_problems(dtype))
    with native.forced_isa(isa):
        out = torch.ops.fxreduce.grouped_lowrank_linear(x, first, second, bias, shuffle)
    assert out.shape == (x.shape[0], second.shape[0] * second.shape[1]) and out.dtype == dtype
    close(out, grouped_lowrank_linear_reference(x, first, second, bias, shuffle), dtype,
          f"{isa} {x.shape} {None if first is None else first.shape} {second.shape} shuffle={shuffle}")


@pytest.mark.parametrize("form", ["group", "sparse_lr", "lr_sparse", "grouped_shuffle"])
def test_the_grouped_forms_run_the_op_in_inference_and_equal_their_modules(form):
    """Each form's fused inference equals the same module run on its factors' own batched GEMMs (training)."""
    torch.manual_seed(0)
    module = factorize(torch.nn.Linear(96, 120), form, rank=None if form == "group" else 24, groups=4)
    op = torch.ops.fxreduce.grouped_lowrank_linear
    for rows in (GROUPED_MIN_ROWS, 150):  # both work splits
        x = torch.randn(rows, 96)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fused = module(x)
        assert op in counter.get_flop_counts()["Global"]
        with FlopCounterMode(display=False) as counter:
            unfused = module(x)  # the parameters need gradients: the modules' own path
        assert op not in counter.get_flop_counts()["Global"]
        close(fused, unfused, torch.float32, form)
        with torch.no_grad():
            close(module(x[: GROUPED_MIN_ROWS - 1]), unfused[: GROUPED_MIN_ROWS - 1], torch.float32, form)
    assert not grouped_serves(x[: GROUPED_MIN_ROWS - 1], None, torch.randn(4, 30, 24), None)


def test_the_grouped_ops_fake_implementation_flop_formula_and_errors():
    first, second = torch.randn(2, 3, 6), torch.randn(3, 10, 2)
    with FakeTensorMode():
        assert torch.ops.fxreduce.grouped_lowrank_linear(torch.empty(9, 12), torch.empty(2, 3, 6),
                                                         torch.empty(3, 10, 2), None, True).shape == (9, 30)
    with FlopCounterMode(display=False) as counter:
        torch.ops.fxreduce.grouped_lowrank_linear(torch.randn(9, 12), first, second, None, True)
    assert counter.get_total_flops() == 2 * 9 * (2 * 3 * 6 + 3 * 10 * 2)
    x = torch.randn(9, 12)
    bad = [(torch.randn(9, 11), first, second, None, False), (x, first, torch.randn(2, 10, 2), None, False),
           (x, first, second, torch.randn(29), False), (x, first.double(), second, None, False),
           (x, None, second, None, False), (torch.randn(9, 6), None, second, None, True),
           (x.int(), first, second, None, False), (x, first[0], second, None, False)]
    for args in bad:
        with pytest.raises(RuntimeError, match="fxreduce.grouped_lowrank_linear"):
            torch.ops.fxreduce.grouped_lowrank_linear(*args)
