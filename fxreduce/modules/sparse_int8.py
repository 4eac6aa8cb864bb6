"""Sparse int8 runtime modules: Linear and Conv2d for pruned layers, multiplying only the stored non-zeros.

A pruned layer (ADMM-NN keeps 2-20% of the weights) run on the dense int8 kernel still multiplies every zero.
These modules store the int8 weights as CSR by output channel (int8 values, int32 column index, int64 row
pointers) and run fxreduce's own kernels (``torch.ops.fxreduce.sparse_int8_linear`` / ``sparse_int8_conv2d``,
C++ in fxreduce/csrc/sparse_int8_*): the input is quantized exactly as the dense int8 modules quantize it, the
images of a batch are the vector lanes, and each stored weight is one broadcast multiply-add over them, so the
work is batch x non-zeros (x output pixels). The int32 sums equal the dense int8 kernel's bit for bit.

``SparseInt8Linear`` quantizes its input per call like :class:`~fxreduce.modules.int8.Int8Linear` (the same
qparams, 7-bit) and returns the same float32 outputs up to float rounding. ``SparseInt8Conv2d`` quantizes with
the calibrated static input scale like :class:`~fxreduce.modules.int8.Int8Conv2d` and returns channels-last
float32 like it (the next layer's kernels, e.g. torch's max_pool2d, are much faster on it than on NCHW), but
straight from the int32 sums: no output requantization, so it differs from the dense module by at most that
module's requantization step (half an output level), and is that much closer to the float layer.

Without the native extension both run the torch reference below (same numbers, dense speed).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from .. import native
from ..errors import InputError, OptionError
from .int8 import INPUT_LEVELS, Int8Conv2d, Int8Linear, check_input, out_size, activation_qparams, check_int8_weight
from .int8 import Storage, storage_of

MAX_POOL = 4  # the largest max pooling window the sparse conv kernel fuses (its epilogue tile holds 16 pixels)


def to_csr(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """int8 weight (out, ...) -> CSR by output channel over its flattened rows: (values, columns, row_ptr)."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    nonzero = rows.nonzero()
    counts = torch.bincount(nonzero[:, 0], minlength=rows.shape[0])
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return rows[nonzero[:, 0], nonzero[:, 1]].contiguous(), nonzero[:, 1].to(torch.int32).contiguous(), row_ptr


def from_csr(values: Tensor, columns: Tensor, row_ptr: Tensor, columns_total: int) -> Tensor:
    """The dense (rows, columns_total) int8 matrix of a CSR weight."""
    rows = row_ptr.numel() - 1
    dense = torch.zeros(rows, columns_total, dtype=torch.int8)
    row_of = torch.repeat_interleave(torch.arange(rows), row_ptr.diff())
    dense[row_of, columns.long()] = values
    return dense


# ---------------------------------------------------------------------------------------------------------
# The torch references: the ops' definitions, and what runs where the kernels do not.
def _quantize(x: Tensor, scale: float, zero: int) -> Tensor:
    """torch's uint8 quantization: nearbyint(x * float32(1 / scale)) + zero, clamped to 0..255."""
    inverse = torch.tensor(1.0) / torch.tensor(scale, dtype=torch.float32)
    return (torch.round(x * inverse) + zero).clamp(0, 255)


def linear_qparams(x: Tensor) -> tuple[float, int]:
    """The (scale, zero point) fbgemm's dynamic Linear picks for ``x`` with 7-bit activations (reduce_range)."""
    scale, zero = torch._choose_qparams_per_tensor(x.detach(), reduce_range=True)
    return float(torch.tensor(scale, dtype=torch.float32)), int(zero)


def _sums_to_float(sums: Tensor, zero: int, row_sums: Tensor, multipliers: Tensor, bias: Tensor | None,
                   relu: bool, channel_dim: int) -> Tensor:
    shape = [1] * sums.dim()
    shape[channel_dim] = -1
    y = (sums - zero * row_sums.reshape(shape)).float() * multipliers.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return torch.relu(y) if relu else y


def sparse_int8_linear_reference(x: Tensor, values: Tensor, columns: Tensor, row_ptr: Tensor, in_features: int,
                                 scale: Tensor, bias: Tensor | None, relu: bool) -> Tensor:
    x_scale, zero = linear_qparams(x)
    weight = from_csr(values, columns, row_ptr, in_features)
    sums = (_quantize(x, x_scale, zero).double() @ weight.double().t()).to(torch.int64)
    multipliers = torch.tensor(x_scale, dtype=torch.float32) * scale
    return _sums_to_float(sums, zero, weight.sum(1, dtype=torch.int64), multipliers, bias, relu, -1)


def sparse_int8_conv2d_reference(x: Tensor, values: Tensor, columns: Tensor, row_ptr: Tensor, kernel: Sequence[int],
                                 scale: Tensor, bias: Tensor | None, stride: Sequence[int], padding: Sequence[int],
                                 dilation: Sequence[int], input_qparams: Tensor, relu: bool, pool: int = 1) -> Tensor:
    x_scale, zero = float(input_qparams[0]), int(input_qparams[1])
    weight = from_csr(values, columns, row_ptr, math.prod(kernel)).reshape(-1, *kernel)
    q = F.pad(_quantize(x, x_scale, zero).double(), (padding[1], padding[1], padding[0], padding[0]), value=zero)
    sums = F.conv2d(q, weight.double(), None, stride, 0, dilation).to(torch.int64)
    multipliers = torch.tensor(x_scale, dtype=torch.float32) * scale
    y = _sums_to_float(sums, zero, weight.flatten(1).sum(1, dtype=torch.int64), multipliers, bias, relu, 1)
    return F.max_pool2d(y, pool) if pool > 1 else y


def _linear(x, values, columns, row_ptr, in_features, scale, bias, relu) -> Tensor:
    if native.serves(x):
        return torch.ops.fxreduce.sparse_int8_linear(x, values, columns, row_ptr, in_features, scale, bias, relu)
    return sparse_int8_linear_reference(x, values, columns, row_ptr, in_features, scale, bias, relu)


def _conv2d(x, values, columns, row_ptr, kernel, scale, bias, stride, padding, dilation, input_qparams, relu, pool):
    args = (x, values, columns, row_ptr, list(kernel), scale, bias, list(stride), list(padding), list(dilation),
            input_qparams, relu, pool)
    if native.serves(x):
        return torch.ops.fxreduce.sparse_int8_conv2d(*args)
    return sparse_int8_conv2d_reference(*args)


if native.available():
    _ops = torch.ops.fxreduce

    @torch.library.register_fake("fxreduce::sparse_int8_linear")
    def _linear_fake(x, values, columns, row_ptr, in_features, scale, bias, relu):
        return x.new_empty((*x.shape[:-1], row_ptr.shape[0] - 1))

    def _conv_out(size, kernel, stride, padding, dilation):
        return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1

    @torch.library.register_fake("fxreduce::sparse_int8_conv2d")
    def _conv_fake(x, values, columns, row_ptr, kernel, scale, bias, stride, padding, dilation, input_qparams, relu,
                   pool=1):
        return x.new_empty((x.shape[0], row_ptr.shape[0] - 1,
                            *(_conv_out(x.shape[2 + d], kernel[1 + d], stride[d], padding[d], dilation[d]) // pool
                              for d in range(2)))).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("fxreduce::sparse_int8_linear_int32")
    def _linear_int32_fake(xq, values, columns, row_ptr, in_features):
        return xq.new_empty((xq.shape[0], row_ptr.shape[0] - 1), dtype=torch.int32)

    @torch.library.register_fake("fxreduce::sparse_int8_conv2d_int32")
    def _conv_int32_fake(xq, values, columns, row_ptr, kernel, stride, padding, dilation, zero, pool=1):
        return _conv_fake(xq, values, columns, row_ptr, kernel, None, None, stride, padding, dilation, None,
                          False, pool).to(torch.int32)

    # The FLOPs are the stored non-zeros' multiply-adds: what the cost model certifies pruning saves. A fused max
    # pool computes the conv at every pixel of its windows: pool^2 conv pixels per output pixel.
    @register_flop_formula(_ops.sparse_int8_linear)
    def _linear_flops(x_shape, values_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * values_shape[0]

    @register_flop_formula(_ops.sparse_int8_conv2d)
    def _conv_flops(x_shape, values_shape, columns, row_ptr, kernel, scale, bias, stride, padding, dilation,
                    input_qparams, relu, pool=1, *, out_shape=None, **kwargs) -> int:
        return 2 * out_shape[0] * out_shape[2] * out_shape[3] * pool * pool * values_shape[0]


def _csr_buffers(module: nn.Module, weight: Tensor) -> None:
    values, columns, row_ptr = to_csr(weight)
    module.register_buffer("values", values)
    module.register_buffer("columns", columns)
    module.register_buffer("row_ptr", row_ptr)


class SparseInt8Linear(nn.Module):
    """Linear with CSR int8 weights: the input quantized per call as :class:`Int8Linear` does, then only the
    stored non-zeros multiplied. Same error bound as :class:`Int8Linear` (:meth:`error_bound`)."""

    fxreduce_mac_dtype = "int8"

    def __init__(self, in_features: int, out_features: int, nonzeros: int = 0, bias: bool = True, relu: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.relu = in_features, out_features, relu
        self.register_buffer("values", torch.zeros(nonzeros, dtype=torch.int8))
        self.register_buffer("columns", torch.zeros(nonzeros, dtype=torch.int32))
        self.register_buffer("row_ptr", torch.zeros(out_features + 1, dtype=torch.long))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_int8(cls, weight: Tensor, scale: Tensor, bias: Tensor | None = None,
                  relu: bool = False) -> "SparseInt8Linear":
        check_int8_weight(weight, scale, "SparseInt8Linear")
        module = cls(weight.shape[1], weight.shape[0], 0, bias is not None, relu)
        _csr_buffers(module, weight)
        with torch.no_grad():
            module.weight_scale.copy_(scale)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    @property
    def density(self) -> float:
        return self.values.numel() / max(1, self.in_features * self.out_features)

    def weight_codes(self) -> Tensor:
        """The dense int8 weight (out_features, in_features)."""
        return from_csr(self.values, self.columns, self.row_ptr, self.in_features)

    def dequantized_weight(self) -> Tensor:
        return self.weight_codes().float() * self.weight_scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, "SparseInt8Linear")
        return _linear(x, self.values, self.columns, self.row_ptr, self.in_features, self.weight_scale, self.bias,
                       self.relu)

    reference = Int8Linear.reference
    error_bound = Int8Linear.error_bound

    def fxreduce_macs(self, input_shapes, training: bool = False) -> dict:
        rows = 1
        for size in input_shapes[0][:-1]:
            rows = rows * size
        return {"int8 sparse GEMM": rows * self.values.numel()}

    def storage(self) -> Storage:
        return storage_of(self.weight_codes(), scales=self.weight_scale.numel())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"relu={self.relu}, non-zeros={self.values.numel()} ({self.density:.1%}), activations=dynamic")


class SparseInt8Conv2d(nn.Module):
    """Conv2d (groups=1) with CSR int8 weights over (in_channels, kh, kw): the input quantized with the
    calibrated static scale as :class:`Int8Conv2d` does, float32 out straight from the int32 sums.

    Error (:meth:`error_bound`): each input element is off by at most s_in/2 plus its distance outside the
    calibrated range, so the output by at most conv(that, |W|), plus float32 rounding; no output requantization.

    With ``pool`` > 1 a following ``max_pool2d(pool)`` (window = stride, no padding, floor mode) runs in the
    kernel: each window's int32 sums are max-pooled before the float epilogue, which is non-decreasing in the
    sum, so the result equals pooling this module's unpooled output bit for bit, and the full-size conv
    output is never written (lower_int8 fuses it; ``fuse_pool``).
    """

    fxreduce_mac_dtype = "int8"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int], stride: Sequence[int] = (1, 1),
                 padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), nonzeros: int = 0,
                 bias: bool = True, relu: bool = False, pool: int = 1):
        super().__init__()
        if not isinstance(pool, int) or not 1 <= pool <= MAX_POOL:
            raise OptionError(f"pool must be a max pooling window side in 1..{MAX_POOL}, got {pool!r}",
                              where="SparseInt8Conv2d", fix=f"leave windows above {MAX_POOL} to F.max_pool2d")
        self.pool = pool
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.groups, self.relu = 1, relu
        self.register_buffer("values", torch.zeros(nonzeros, dtype=torch.int8))
        self.register_buffer("columns", torch.zeros(nonzeros, dtype=torch.int32))
        self.register_buffer("row_ptr", torch.zeros(out_channels + 1, dtype=torch.long))
        self.register_buffer("weight_scale", torch.ones(out_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels), requires_grad=False) if bias else None
        self.register_buffer("input_qparams", torch.tensor([1.0, 0.0]))

    @classmethod
    def from_int8(cls, weight: Tensor, scale: Tensor, bias: Tensor | None, *, stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int], input_range: tuple[float, float],
                  relu: bool = False, groups: int = 1, pool: int = 1) -> "SparseInt8Conv2d":
        """A sparse int8 conv whose input scale covers ``input_range`` (the calibrated min, max)."""
        check_int8_weight(weight, scale, "SparseInt8Conv2d")
        if groups != 1:
            raise OptionError(f"SparseInt8Conv2d runs groups=1 only, got groups={groups}", where="SparseInt8Conv2d",
                              fix="run grouped convs on Int8Conv2d")
        if weight.dim() != 4:
            raise InputError(f"expected a 4-D conv weight, got shape {tuple(weight.shape)}", where="SparseInt8Conv2d")
        module = cls(weight.shape[1], weight.shape[0], weight.shape[2:], stride, padding, dilation, 0,
                     bias is not None, relu, pool)
        _csr_buffers(module, weight)
        with torch.no_grad():
            module.weight_scale.copy_(scale)
            if bias is not None:
                module.bias.copy_(bias)
            module.input_qparams.copy_(torch.tensor(activation_qparams(*input_range, INPUT_LEVELS)))
        return module

    @property
    def density(self) -> float:
        return self.values.numel() / max(1, self.out_channels * self.in_channels * math.prod(self.kernel_size))

    def weight_codes(self) -> Tensor:
        """The dense int8 weight (out_channels, in_channels, kh, kw)."""
        flat = from_csr(self.values, self.columns, self.row_ptr, self.in_channels * math.prod(self.kernel_size))
        return flat.reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def dequantized_weight(self) -> Tensor:
        return self.weight_codes().float() * self.weight_scale[:, None, None, None]

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, "SparseInt8Conv2d", dims=4)
        return _conv2d(x, self.values, self.columns, self.row_ptr, (self.in_channels, *self.kernel_size),
                       self.weight_scale, self.bias, self.stride, self.padding, self.dilation, self.input_qparams,
                       self.relu, self.pool)

    _conv = Int8Conv2d._conv
    _range = Int8Conv2d._range

    def _pooled(self, y: Tensor) -> Tensor:
        return F.max_pool2d(y, self.pool) if self.pool > 1 else y

    def reference(self, x: Tensor) -> Tensor:
        return self._pooled(Int8Conv2d.reference(self, x))

    def error_bound(self, x: Tensor) -> Tensor:
        """Per output element: the most ``self(x)`` may differ from :meth:`reference`. Max pooling moves no
        output further than the largest bound in its window, so a pooled output's bound is that maximum."""
        with torch.no_grad():
            in_scale, in_low, in_high = self._range(self.input_qparams, INPUT_LEVELS)
            outside = (in_low - x).clamp(min=0) + (x - in_high).clamp(min=0)
            weight = self.dequantized_weight().abs()
            spread = self._conv(outside + in_scale / 2, weight, None)
            magnitude = self._conv(x.abs(), weight, None if self.bias is None else self.bias.abs())
            return self._pooled(spread * (1 + 1e-4) + 1e-4 * magnitude + 1e-6)

    def fxreduce_macs(self, input_shapes, training: bool = False) -> dict:
        n, _, h, w = input_shapes[0]
        kh, kw = self.kernel_size
        out_h = out_size(h, 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1, self.stride[0])
        out_w = out_size(w, 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1, self.stride[1])
        if self.pool > 1:  # the conv pixels of whole windows
            out_h, out_w = out_h // self.pool * self.pool, out_w // self.pool * self.pool
        return {"int8 sparse conv": n * out_h * out_w * self.values.numel()}

    def storage(self) -> Storage:
        return storage_of(self.weight_codes(), scales=self.weight_scale.numel())

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, relu={self.relu}, "
                f"non-zeros={self.values.numel()} ({self.density:.1%}), activations=static"
                + (f", max_pool={self.pool}" if self.pool > 1 else ""))


__all__ = ["SparseInt8Conv2d", "SparseInt8Linear", "from_csr", "linear_qparams",
           "sparse_int8_conv2d_reference", "sparse_int8_linear_reference", "to_csr"]
