"""Sparse int8 kernels (fxreduce/csrc/sparse_int8_*) against the dense int8 kernels, on every ISA this machine runs.

Contracts: the int32 sums equal a dense int8 GEMM's (torch._int_mm) / an exact dense conv's bit for bit, at
densities 0-100%, with empty rows and columns, any stride, padding and dilation; SparseInt8Linear's outputs
equal Int8Linear's (fbgemm) up to float rounding, SparseInt8Conv2d's equal the dense int8 conv up to that conv's
output requantization and stay within their stated bound; the torch reference gives the same numbers; bad
indices and shapes are errors, never crashes; lower_int8 picks the sparse kernel for pruned layers and the
cost model certifies the cut in FLOPs.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxreduce as fr
from fxreduce import native
from fxreduce.errors import FxReduceError
from fxreduce.modules.int8 import Int8Conv2d, Int8Linear
from fxreduce.modules.sparse_int8 import (SparseInt8Conv2d, SparseInt8Linear, sparse_int8_conv2d_reference,
                                          sparse_int8_linear_reference, to_csr)

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels not built: {native.MISSING}")
ISAS = native.supported_isas() or ["none"]
ops = torch.ops.fxreduce


def sparse_weight(seed: int, shape: tuple[int, ...], density: float, empty_rows: bool, empty_columns: bool):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(-127, 128, shape, generator=g)
    weight = values * (torch.rand(shape, generator=g) < density)
    if empty_rows and shape[0] > 1:
        weight[:: 2] = 0
    if empty_columns:
        weight.view(shape[0], -1)[:, :: 3] = 0
    return weight.to(torch.int8)


densities = st.sampled_from([0.0, 0.02, 0.1, 0.5, 1.0])


# Rows up to 150: a Linear's kernel computes up to four blocks of images per task (16 images a block on AVX2, 32 on
# AVX-512), so this reaches a second group with a partial last block on every ISA.
@pytest.mark.parametrize("isa", ISAS)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 150), out=st.integers(1, 40), k=st.integers(1, 90),
       density=densities, empty_rows=st.booleans(), empty_columns=st.booleans())
def test_linear_int32_sums_equal_the_dense_int8_gemm(isa, seed, rows, out, k, density, empty_rows, empty_columns):
    weight = sparse_weight(seed, (out, k), density, empty_rows, empty_columns)
    xq = torch.randint(0, 128, (rows, k), generator=torch.Generator().manual_seed(seed + 1), dtype=torch.uint8)
    with native.forced_isa(isa):
        sums = ops.sparse_int8_linear_int32(xq, *to_csr(weight), k)
    # torch's dense int8 GEMM wants more than 16 rows and sizes in multiples of 8: zero padding adds nothing.
    up = lambda n: -(-n // 8) * 8  # noqa: E731
    a = F.pad(xq, (0, up(k) - k, 0, max(17, rows) - rows)).to(torch.int8)
    dense = torch._int_mm(a, F.pad(weight, (0, up(k) - k, 0, up(out) - out)).t().contiguous())[:rows, :out]
    assert torch.equal(sums, dense)
    assert torch.equal(sums.double(), xq.double() @ weight.double().t())


@pytest.mark.parametrize("isa", ISAS)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 40), channels=st.integers(1, 6), out=st.integers(1, 9),
       size=st.tuples(st.integers(1, 11), st.integers(1, 11)), kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)), zero=st.integers(0, 255), density=densities,
       empty_rows=st.booleans(), empty_columns=st.booleans())
def test_conv_int32_sums_equal_the_dense_conv_exactly(isa, seed, batch, channels, out, size, kernel, stride, padding,
                                                     dilation, zero, density, empty_rows, empty_columns):
    span = [dilation[d] * (kernel[d] - 1) + 1 for d in range(2)]
    size = tuple(max(size[d], span[d] - 2 * padding[d]) for d in range(2))
    weight = sparse_weight(seed, (out, channels, *kernel), density, empty_rows, empty_columns)
    g = torch.Generator().manual_seed(seed)
    xq = torch.randint(0, 256, (batch, channels, *size), generator=g, dtype=torch.uint8)
    with native.forced_isa(isa):
        sums = ops.sparse_int8_conv2d_int32(xq, *to_csr(weight), [channels, *kernel], list(stride), list(padding),
                                            list(dilation), zero)
    padded = F.pad(xq.double(), (padding[1], padding[1], padding[0], padding[0]), value=zero)
    dense = F.conv2d(padded, weight.double(), stride=stride, dilation=dilation)  # exact: integers below 2^53
    assert torch.equal(sums.double(), dense)


@pytest.mark.parametrize("isa", ISAS)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 150), out=st.integers(1, 30), k=st.integers(1, 60),
       density=densities, relu=st.booleans(), bias=st.booleans(), shift=st.floats(-2, 2))
def test_sparse_linear_equals_the_dense_int8_linear(isa, seed, rows, out, k, density, relu, bias, shift):
    g = torch.Generator().manual_seed(seed)
    weight = sparse_weight(seed, (out, k), density, False, False)
    scale = torch.rand(out, generator=g) * 0.01 + 1e-4
    b = torch.randn(out, generator=g) if bias else None
    x = torch.randn(rows, k, generator=g) * 3 + shift
    sparse = SparseInt8Linear.from_int8(weight, scale, b, relu)
    dense = Int8Linear.from_int8(weight, scale, b, relu)
    with native.forced_isa(isa):
        y = sparse(x)
    expected = dense(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * max(1.0, float(expected.abs().max())))
    torch.testing.assert_close(sparse_int8_linear_reference(x, sparse.values, sparse.columns, sparse.row_ptr, k,
                                                            scale, b, relu), y, rtol=1e-5, atol=1e-5)
    assert float((y - sparse.reference(x)).abs().sub(sparse.error_bound(x)).max()) <= 0


@pytest.mark.parametrize("isa", ISAS)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 35), density=densities, relu=st.booleans(),
       geometry=st.sampled_from([((1, 1), (0, 0), (1, 1)), ((2, 1), (1, 2), (1, 1)), ((1, 2), (2, 0), (2, 1))]),
       wide=st.booleans())
def test_sparse_conv_matches_the_dense_int8_conv_and_its_bound(isa, seed, batch, density, relu, geometry, wide):
    g = torch.Generator().manual_seed(seed)
    stride, padding, dilation = geometry
    weight = sparse_weight(seed, (6, 4, 3, 3), density, False, False)
    scale = torch.rand(6, generator=g) * 0.01 + 1e-4
    bias = torch.randn(6, generator=g)
    x = torch.randn(batch, 4, 9, 8, generator=g) * (3 if wide else 1)  # wide: beyond the calibrated range
    settings = dict(stride=stride, padding=padding, dilation=dilation, input_range=(-1.5, 2.0), relu=relu)
    sparse = SparseInt8Conv2d.from_int8(weight, scale, bias, **settings)
    with native.forced_isa(isa):
        y = sparse(x)
    reference = sparse_int8_conv2d_reference(x, sparse.values, sparse.columns, sparse.row_ptr, (4, 3, 3), scale, bias,
                                             stride, padding, dilation, sparse.input_qparams, relu)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
    assert float((y - sparse.reference(x)).abs().sub(sparse.error_bound(x)).max()) <= 0
    # Inside the calibrated range (beyond it fbgemm's 7-bit u8 x s8 pair sums may saturate in int16; ours do not)
    # the dense conv differs only by its output requantization.
    inside = x.clamp(-1.5, 2.0)
    with torch.no_grad(), native.forced_isa(isa):
        full, y = sparse.reference(inside), sparse(inside)
    dense = Int8Conv2d.from_int8(weight, scale, bias, groups=1, output_range=(float(full.min()) - 1,
                                                                             float(full.max()) + 1), **settings)
    step = float(dense.output_qparams[0])
    assert float((dense(inside) - y).abs().max()) <= step / 2 * (1 + 1e-3) + 1e-5


@pytest.mark.parametrize("isa", ISAS)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 40), channels=st.integers(1, 4), out=st.integers(1, 20),
       size=st.tuples(st.integers(4, 14), st.integers(4, 14)), kernel=st.integers(1, 3), stride=st.integers(1, 2),
       padding=st.integers(0, 1), pool=st.integers(1, 4), zero=st.integers(0, 255), density=densities,
       relu=st.booleans())
def test_fused_max_pool_equals_pooling_the_unpooled_output_bit_for_bit(isa, seed, batch, channels, out, size, kernel,
                                                                        stride, padding, pool, zero, density, relu):
    outputs = [(size[d] + 2 * padding - kernel) // stride + 1 for d in range(2)]
    if min(outputs) < pool:
        size = tuple(size[d] + (pool - outputs[d]) * stride for d in range(2))
    g = torch.Generator().manual_seed(seed)
    weight = sparse_weight(seed, (out, channels, kernel, kernel), density, False, False)
    csr, geometry = to_csr(weight), ([channels, kernel, kernel], [stride] * 2, [padding] * 2, [1, 1])
    xq = torch.randint(0, 256, (batch, channels, *size), generator=g, dtype=torch.uint8)
    x = torch.randn(batch, channels, *size, generator=g)
    scale, bias = torch.rand(out, generator=g) * 0.01, torch.randn(out, generator=g)
    qparams = torch.tensor([0.02, zero])
    with native.forced_isa(isa):
        pooled_sums = ops.sparse_int8_conv2d_int32(xq, *csr, *geometry, zero, pool)
        sums = ops.sparse_int8_conv2d_int32(xq, *csr, *geometry, zero)
        args = (*csr, geometry[0], scale, bias, *geometry[1:], qparams, relu)
        pooled, unpooled = ops.sparse_int8_conv2d(x, *args, pool), ops.sparse_int8_conv2d(x, *args)
    assert torch.equal(pooled_sums.double(), F.max_pool2d(sums.double(), pool))
    assert torch.equal(pooled, F.max_pool2d(unpooled, pool))
    assert pooled.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(sparse_int8_conv2d_reference(x, *args, pool), pooled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@given(seed=st.integers(0, 2**16), exponent=st.integers(-6, 3), zero=st.integers(0, 255), padding=st.integers(0, 1))
def test_input_quantization_rounds_and_clamps_as_torch_does(isa, seed, exponent, zero, padding):
    """The kernels quantize the input themselves: on exact ties (a power-of-two scale makes x / scale exact),
    past the uint8 range and through the vector and scalar tails, the codes equal clamp(round(x / scale) + zero),
    as torch's quantizer rounds them, read back through a 1x1 identity conv whose epilogue multiplies by 1."""
    g = torch.Generator().manual_seed(seed)
    scale = 2.0 ** exponent
    codes = torch.randint(-700, 700, (3, 5, 4, 7), generator=g) + 0.5 * torch.randint(0, 2, (3, 5, 4, 7), generator=g)
    x = (codes * scale).float()
    identity = torch.eye(5, dtype=torch.int8).reshape(5, 5, 1, 1)
    with native.forced_isa(isa):
        y = ops.sparse_int8_conv2d(x, *to_csr(identity), [5, 1, 1], torch.full((5,), 1 / scale), None, [1, 1],
                                   [padding] * 2, [1, 1], torch.tensor([scale, float(zero)]), False)
    expected = torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero  # torch.round: ties to even
    inside = y[:, :, padding:y.shape[2] - padding, padding:y.shape[3] - padding]
    assert torch.equal(inside, expected.float())


def test_bad_indices_and_shapes_raise_clear_errors():
    weight = sparse_weight(0, (5, 7), 0.5, False, False)
    values, columns, row_ptr = to_csr(weight)
    x, scale = torch.randn(3, 7), torch.ones(5)
    call = ops.sparse_int8_linear
    bad_columns = columns.clone()
    bad_columns[0] = 7
    negative = columns.clone()
    negative[-1] = -1
    decreasing = row_ptr.clone()
    decreasing[2] = decreasing[3] + 1

    def with_value(row: int, column: int, value: float) -> torch.Tensor:
        batch = torch.randn(20, 7)
        batch[row, column] = value
        return batch

    cases = {
        "column indices must lie in": (x, values, bad_columns, row_ptr, 7, scale, None, False),
        "must lie in": (x, values, negative, row_ptr, 7, scale, None, False),
        "non-decreasing": (x, values, columns, decreasing, 7, scale, None, False),
        "end at nnz": (x, values, columns, row_ptr[:-1], 7, scale, None, False),
        "entries for": (x, values, columns[:-1], row_ptr, 7, scale, None, False),
        "last dimension": (torch.randn(3, 6), values, columns, row_ptr, 7, scale, None, False),
        "scale must be": (x, values, columns, row_ptr, 7, torch.ones(4), None, False),
        "bias must be": (x, values, columns, row_ptr, 7, scale, torch.ones(6), False),
        "values must be int8": (x, values.int(), columns, row_ptr, 7, scale, None, False),
        "columns must be int32": (x, values, columns.long(), row_ptr, 7, scale, None, False),
        "input must be a Float": (x.double(), values, columns, row_ptr, 7, scale, None, False),
    }
    for message, args in cases.items():
        with pytest.raises(RuntimeError, match=message):
            call(*args)
    # 140 elements: a NaN in each ISA's range pass's vector loop, an inf in its scalar tail
    for isa in ISAS:
        with native.forced_isa(isa):
            with pytest.raises(RuntimeError, match=r"NaN or infinite values \(range \[nan"):
                call(with_value(2, 3, float("nan")), values, columns, row_ptr, 7, scale, None, False)
            with pytest.raises(RuntimeError, match="NaN or infinite values"):
                call(with_value(19, 6, float("inf")), values, columns, row_ptr, 7, scale, None, False)
    conv = sparse_weight(1, (4, 2, 3, 3), 0.5, False, False)
    csr = to_csr(conv)
    qparams = torch.tensor([0.1, 3.0])
    with pytest.raises(RuntimeError, match="channels"):
        ops.sparse_int8_conv2d(torch.randn(1, 3, 5, 5), *csr, [2, 3, 3], torch.ones(4), None, [1, 1], [0, 0], [1, 1],
                               qparams, False)
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        ops.sparse_int8_conv2d(torch.randn(1, 2, 2, 5), *csr, [2, 3, 3], torch.ones(4), None, [1, 1], [0, 0], [1, 1],
                               qparams, False)
    with pytest.raises(RuntimeError, match="stride must be"):
        ops.sparse_int8_conv2d(torch.randn(1, 2, 5, 5), *csr, [2, 3, 3], torch.ones(4), None, [0, 1], [0, 0], [1, 1],
                               qparams, False)
    for pool, message in ((0, "pool must be"), (5, "pool must be"), (4, "smaller than the pooling window")):
        with pytest.raises(RuntimeError, match=message):
            ops.sparse_int8_conv2d(torch.randn(1, 2, 5, 5), *csr, [2, 3, 3], torch.ones(4), None, [1, 1], [0, 0],
                                   [1, 1], qparams, False, pool)
    with pytest.raises(RuntimeError, match="non-negative weight scales"):
        ops.sparse_int8_conv2d(torch.randn(1, 2, 5, 5), *csr, [2, 3, 3], -torch.ones(4), None, [1, 1], [0, 0], [1, 1],
                               qparams, False, 2)
    with pytest.raises(FxReduceError, match="pool must be"):
        SparseInt8Conv2d(2, 4, (3, 3), pool=5)
    with pytest.raises(RuntimeError, match="zero point"):
        ops.sparse_int8_conv2d(torch.randn(1, 2, 5, 5), *csr, [2, 3, 3], torch.ones(4), None, [1, 1], [0, 0], [1, 1],
                               torch.tensor([0.1, 300.0]), False)
    with pytest.raises(FxReduceError):
        SparseInt8Linear.from_int8(weight.float(), torch.ones(5))
    with pytest.raises(FxReduceError):
        SparseInt8Conv2d.from_int8(sparse_weight(2, (4, 1, 3, 3), 0.5, False, False), torch.ones(4), None,
                                   stride=(1, 1), padding=(0, 0), dilation=(1, 1), input_range=(0, 1), groups=2)
    with pytest.raises(FxReduceError):
        SparseInt8Linear.from_int8(weight, torch.ones(5))(torch.randn(3, 7, dtype=torch.float64))


def test_flop_formulas_count_the_stored_nonzeros():
    weight = sparse_weight(3, (20, 50), 0.1, False, False)
    linear = SparseInt8Linear.from_int8(weight, torch.ones(20))
    conv = SparseInt8Conv2d.from_int8(sparse_weight(4, (8, 3, 3, 3), 0.2, False, False), torch.ones(8), None,
                                      stride=(1, 1), padding=(1, 1), dilation=(1, 1), input_range=(-1, 1))
    with FlopCounterMode(display=False) as counter:
        linear(torch.randn(6, 50))
        conv(torch.randn(2, 3, 5, 5))
    assert counter.get_total_flops() == 2 * 6 * linear.values.numel() + 2 * 2 * 25 * conv.values.numel()
    assert linear.fxreduce_macs([(6, 50)]) == {"int8 sparse GEMM": 6 * linear.values.numel()}
    pooled = SparseInt8Conv2d.from_int8(sparse_weight(4, (8, 3, 3, 3), 0.2, False, False), torch.ones(8), None,
                                        stride=(1, 1), padding=(1, 1), dilation=(1, 1), input_range=(-1, 1), pool=2)
    with FlopCounterMode(display=False) as counter:
        pooled(torch.randn(2, 3, 5, 5))  # 5x5 conv pixels, pooled to 2x2: the 4x4 of whole windows are computed
    assert counter.get_total_flops() == 2 * 2 * 16 * pooled.values.numel()
    assert pooled.fxreduce_macs([(2, 3, 5, 5)]) == {"int8 sparse conv": 2 * 16 * pooled.values.numel()}


class Pruned(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.dense_conv = nn.Conv2d(16, 8, 3)
        self.fc = nn.Linear(8 * 6 * 6, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.dense_conv(self.conv(x)))
        return self.head(torch.relu(self.fc(x.flatten(1))))


def test_lower_int8_runs_pruned_layers_sparse_and_certifies_the_flop_cut():
    torch.manual_seed(0)
    model = Pruned().eval()
    with torch.no_grad():
        for layer, density in ((model.conv, 0.05), (model.fc, 0.02), (model.head, 0.5)):
            layer.weight.mul_(torch.rand_like(layer.weight) < density)
    x = torch.randn(4, 3, 8, 8)
    gm = fr.trace(model, (x,), {"N": (0, 0)})
    result = fr.apply(gm, fr.Pipeline([fr.get_pass("lower_int8")(calibration=x)]))
    lowered = result.graph_module
    kinds = {name: type(module).__name__ for name, module in lowered.named_modules()
             if "Int8" in type(module).__name__}
    assert sorted(kinds.values()) == ["Int8Conv2d", "Int8Linear", "SparseInt8Conv2d", "SparseInt8Linear"]
    text = "\n".join(result.report.lines())
    assert "sparse kernel: " in text and "dense kernel: " in text
    before, after = fr.cost(gm).at(N=1), fr.cost(lowered).at(N=1)
    pixels = {"conv": 64, "dense_conv": 36, "fc": 1, "head": 1}
    modules = dict(lowered.named_modules())
    expected = 0
    for name, count in pixels.items():
        module = next(m for path, m in modules.items() if path.endswith(name) and "Int8" in type(m).__name__)
        stored = module.values.numel() if "Sparse" in type(module).__name__ else module.weight_int8.numel()
        expected += stored * count
    assert int(after.macs_by_dtype["int8"]) == expected  # each sparse layer counts its stored non-zeros
    assert int(after.macs) < int(before.macs)
    with torch.no_grad():
        assert float((lowered(x) - gm(x)).abs().max()) < 0.5
    everything_dense = fr.apply(gm, fr.Pipeline([fr.get_pass("lower_int8")(calibration=x, sparse_density=0.0)]))
    assert not any("Sparse" in type(m).__name__ for m in everything_dense.graph_module.modules())


class PrunedLeNet(nn.Module):
    """LeNet's pattern: conv -> max pool, conv -> ReLU -> pool module, and a pool the kernel cannot run."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 16, 3)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), 2)
        x = self.pool(torch.relu(self.conv2(x)))
        return F.max_pool2d(self.conv3(x), 3, stride=1)  # overlapping windows: left to torch


def pruned_lenet() -> tuple[fx.GraphModule, torch.Tensor]:
    """PrunedLeNet at 10% density, traced, and an input."""
    torch.manual_seed(0)
    model = PrunedLeNet().eval()
    with torch.no_grad():
        for conv in (model.conv1, model.conv2, model.conv3):
            conv.weight.mul_(torch.rand_like(conv.weight) < 0.1)
    x = torch.randn(3, 1, 20, 20)
    return fr.trace(model, (x,), {"N": (0, 0)}), x


def test_lower_int8_fuses_a_following_max_pool_into_the_sparse_conv():
    gm, x = pruned_lenet()
    lower = fr.get_pass("lower_int8")(calibration=x)
    result = fr.apply(gm, fr.Pipeline([lower]))
    lowered = result.graph_module
    assert lower.check(gm, lowered, (x,)) is None and lower.check(gm, lowered, (3 * x,)) is None
    pools = {name: module.pool for name, module in lowered.named_modules() if isinstance(module, SparseInt8Conv2d)}
    assert sorted(pools.values()) == [1, 2, 2]
    remaining = [node for node in lowered.graph.nodes if "pool" in node.name]
    assert len(remaining) == 1  # the overlapping pool
    text = "\n".join(result.report.lines())
    assert text.count("max_pool2d(2) fused") == 2 and "ReLU fused, max_pool2d(2) fused" in text
    with torch.no_grad():
        unfused = fr.apply(gm, fr.Pipeline([fr.get_pass("lower_int8")(calibration=x, fuse_pool=False)])).graph_module
        assert torch.equal(lowered(x), unfused(x))
    assert int(fr.cost(lowered).at(N=1).macs) == int(fr.cost(unfused).at(N=1).macs)


def test_the_cost_model_counts_the_fused_relu_and_pool_as_other_ops():
    gm, x = pruned_lenet()
    fused, unfused = (fr.apply(gm, fr.Pipeline([fr.get_pass("lower_int8")(calibration=x, fuse_pool=pool)])).graph_module
                      for pool in (True, False))
    # conv1's 16x16 output and conv2's 6x6 pool into whole windows, so the fused kernels read every element the
    # pools read; conv2's fused ReLU runs on its 16x3x3 pooled outputs, not on the 16x6x6 the pool reads.
    assert int(fr.cost(fused).at(N=1).other) == int(fr.cost(unfused).at(N=1).other) - 16 * 6 * 6 + 16 * 3 * 3
