"""AntMan's modules: exact at full rank, Eckart-Young at rank r, grouped forms equal their own to_dense(),
the MAC and parameter formulas match what torch counts and holds, and the LSTM runs them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxreduce as fr
from fxreduce.errors import OptionError
from fxreduce.modules import DecomposedLSTM
from fxreduce.modules.factorized import (GroupLinear, LowRankLinear, SparseLowRankLinear, factorize,
                                         macs_per_row)

seeds = st.integers(0, 2**31 - 1)
COMPOSED = ("sparse_lr", "lr_sparse", "grouped_shuffle")


def _dense(seed: int, out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=generator), torch.randn(out, generator=generator)


@given(seeds, st.integers(1, 12), st.integers(1, 12), st.sampled_from(("lr",) + COMPOSED))
def test_full_rank_with_one_group_is_exact(seed, out, inp, form):
    weight, bias = _dense(seed, out, inp)
    module = factorize(weight, form, rank=min(out, inp), groups=1, bias=bias)
    x = torch.randn(3, 2, inp, generator=torch.Generator().manual_seed(seed + 1))
    torch.testing.assert_close(module(x), x @ weight.T + bias, rtol=1e-4, atol=1e-4)


@given(seeds, st.integers(2, 24), st.integers(2, 24), st.data())
def test_rank_r_truncation_meets_eckart_young(seed, out, inp, data):
    weight, bias = _dense(seed, out, inp)
    rank = data.draw(st.integers(1, min(out, inp) - 1))
    module = LowRankLinear.from_linear(weight, rank, bias)
    sigma = torch.linalg.svdvals(weight.double())[rank].item()
    x = torch.randn(16, inp, generator=torch.Generator().manual_seed(seed + 1))
    error = (module(x) - (x @ weight.T + bias)).norm(dim=1)
    assert bool((error <= sigma * x.norm(dim=1) * (1 + 1e-4) + 1e-4).all())
    # ... and the bound is tight: the truncation error is exactly sigma_{r+1} in the spectral norm.
    assert torch.linalg.matrix_norm(weight - module.dense_weight(), ord=2).item() == pytest.approx(sigma, rel=1e-4)


@given(seeds, st.sampled_from(("group",) + COMPOSED), st.sampled_from((2, 3)), st.integers(1, 3), st.booleans())
def test_grouped_forms_equal_their_own_dense_form(seed, form, groups, blocks, shuffle):
    out, inp = 6 * groups, 4 * groups
    weight, bias = _dense(seed, out, inp)
    if form == "group":
        module = GroupLinear.from_linear(weight, groups, bias, shuffle=shuffle)
    else:
        module = SparseLowRankLinear.from_linear(weight, groups * blocks, groups, form, bias)
    x = torch.randn(5, inp, generator=torch.Generator().manual_seed(seed + 1))
    torch.testing.assert_close(module(x), module.to_dense()(x), rtol=1e-4, atol=1e-4)
    assert isinstance(module.to_dense(), nn.Linear)


def _assert_gradients_equal_the_dense_forms(module, input_shape, generator):
    """With random float64 parameters and input, the gradients of ``module(x)`` equal autograd through
    ``x @ module.dense_weight().T + b`` (dense_weight() is built from the factors by differentiable ops)."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    x = torch.randn(*input_shape, generator=generator, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(*x.shape[:-1], module.out_features, generator=generator, dtype=torch.float64)
    grads = torch.autograd.grad((module(x) * upstream).sum(), [x, *module.parameters()])
    reference = x @ module.dense_weight().T + (0 if module.bias is None else module.bias)
    expected = torch.autograd.grad((reference * upstream).sum(), [x, *module.parameters()])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@given(seeds, st.sampled_from((2, 3)), st.booleans(), st.booleans(), st.integers(1, 3), st.booleans())
def test_group_linear_gradients_equal_autograd_through_its_dense_form(seed, groups, shuffle, bias, leading,
                                                                     transposed):
    # The grouped GEMM has its own backward (in-place block views), whichever orientation the forward runs in.
    module = GroupLinear(4 * groups, 6 * groups, groups, bias=bias, shuffle=shuffle, dtype=torch.float64)
    module.transposed_output = transposed
    _assert_gradients_equal_the_dense_forms(module, [2] * leading + [4 * groups], torch.Generator().manual_seed(seed))


@given(seeds, st.sampled_from(COMPOSED), st.sampled_from((2, 3)), st.integers(1, 2))
def test_composed_forms_gradients_equal_autograd_through_their_dense_form(seed, form, groups, leading):
    # A grouped first factor hands its output over column-major (transposed GEMM); the second reads it in place.
    module = SparseLowRankLinear(4 * groups, 6 * groups, 2 * groups, groups, form, dtype=torch.float64)
    _assert_gradients_equal_the_dense_forms(module, [3] * leading + [4 * groups], torch.Generator().manual_seed(seed))


def test_group_init_keeps_the_diagonal_blocks_and_shuffle_permutes_outputs():
    weight = torch.arange(24.0).view(6, 4)
    plain = GroupLinear.from_linear(weight, 2)
    expected = torch.zeros(6, 4)
    expected[:3, :2], expected[3:, 2:] = weight[:3, :2], weight[3:, 2:]
    assert torch.equal(plain.dense_weight(), expected)
    shuffled = GroupLinear.from_linear(weight, 2, shuffle=True)
    # Output k of group i sits at k * groups + i: rows 0, 2, 4 read input group 0, and the init keeps W there.
    dense = shuffled.dense_weight()
    assert torch.equal(dense[0::2, :2], weight[0::2, :2]) and torch.equal(dense[1::2, 2:], weight[1::2, 2:])
    assert not dense[0::2, 2:].any() and not dense[1::2, :2].any()


def test_grouped_shuffle_routes_every_input_group_to_every_output_group():
    # With the shuffle, one output group reads all input groups; without it, V and U would stay
    # block-diagonal and W' block-diagonal too.
    weight, bias = _dense(0, 8, 8)
    module = SparseLowRankLinear.from_linear(weight, 8, 2, "grouped_shuffle", bias)
    dense = module.dense_weight()
    assert bool((dense[:4, 4:] != 0).any()) and bool((dense[4:, :4] != 0).any())
    # Each of the 4 blocks gets rank 2 of the 8: the best rank-2 approximation of each block.
    for rows in (slice(0, 4), slice(4, 8)):
        for cols in (slice(0, 4), slice(4, 8)):
            block_error = torch.linalg.matrix_norm(weight[rows, cols] - dense[rows, cols], ord=2)
            assert block_error.item() == pytest.approx(torch.linalg.svdvals(weight[rows, cols])[2].item(), rel=1e-4)


@pytest.mark.parametrize("form, rank, groups", [("lr", 6, 1), ("group", None, 4), ("sparse_lr", 8, 4),
                                                ("lr_sparse", 8, 4), ("grouped_shuffle", 8, 4)])
def test_declared_macs_and_params_match_torch(form, rank, groups):
    weight, bias = _dense(0, 24, 16)
    module = factorize(weight, form, rank, groups, bias)
    x = torch.randn(5, 3, 16)
    declared = sum(module.fxreduce_macs([(5, 3, 16)]).values())
    assert declared == 15 * macs_per_row(form, 16, 24, rank, groups)
    counter = torch.utils.flop_counter.FlopCounterMode(display=False)
    with counter:
        module(x)
    assert counter.get_total_flops() == 2 * declared
    count = (GroupLinear.count_params(16, 24, groups) if form == "group" else LowRankLinear.count_params(16, 24, rank)
             if form == "lr" else SparseLowRankLinear.count_params(16, 24, rank, groups, form))
    assert count == sum(p.numel() for p in module.parameters())
    assert sum(module.fxreduce_macs([(5, 3, 16)], training=True).values()) == 3 * declared


def test_the_papers_example_shapes():
    # techniques.md: 6000 x 1500 gate matrix: 9.0M dense, LR r=100 0.75M (12x), grouped+shuffle r=600 g=20 0.225M.
    assert macs_per_row("dense", 1500, 6000, None) == 9_000_000
    assert macs_per_row("lr", 1500, 6000, 100) == 750_000
    assert macs_per_row("grouped_shuffle", 1500, 6000, 600, 20) == 225_000


def test_traced_cost_uses_the_declared_formula():
    model = nn.Sequential(LowRankLinear(32, 64, 4), nn.ReLU(), GroupLinear(64, 32, 4))
    gm = fr.trace(model, (torch.randn(2, 32),), dynamic={"N": (0, 0)})
    n = fr.cost_models.symbol("N")
    assert sum(fr.cost(gm).macs_by_dtype.values()) == n * (4 * 96 + 64 * 32 // 4)


@pytest.mark.parametrize("form", ["lr", "grouped_shuffle"])
def test_decomposed_lstm_runs_factorised_gates_like_their_dense_form(form):
    torch.manual_seed(0)
    reference = nn.LSTM(8, 16, batch_first=True)
    lstm = DecomposedLSTM.from_torch(reference)
    dense = DecomposedLSTM.from_torch(reference)
    for kind in ("ih", "hh"):
        module = factorize(lstm.projection(kind, 0).weight, form, 8, 2, lstm.projection(kind, 0).bias)
        lstm.set_projection(kind, 0, False, module)
        dense.set_projection(kind, 0, False, module.to_dense())
    x = torch.randn(3, 5, 8, requires_grad=True)
    out, (h, c) = lstm(x)
    expected, (h_ref, c_ref) = dense(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c, c_ref, rtol=1e-4, atol=1e-5)
    out.sum().backward()  # trains through the fast path (lr) or the autograd path (grouped)
    assert all(p.grad is not None for p in lstm.parameters())
    assert hasattr(lstm.projection("hh", 0), "gemm_factors") == (form == "lr")


def test_bad_shapes_are_rejected_with_the_module_named():
    with pytest.raises(OptionError, match="rank"):
        LowRankLinear(8, 4, 5)
    with pytest.raises(OptionError, match="groups=3 does not divide in_features=8"):
        GroupLinear(8, 6, 3)
    with pytest.raises(OptionError, match="groups=3 does not divide rank=4"):
        SparseLowRankLinear(6, 6, 4, 3, "sparse_lr")
    with pytest.raises(OptionError, match="form"):
        SparseLowRankLinear(6, 6, 4, 2, "dense")
