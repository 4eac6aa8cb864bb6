"""Int8 runtime modules: Linear and Conv2d that multiply in int8 on the CPU, exportable and costed.

Weights are int8 values ``k`` (|k| <= 127) with a float32 scale per output channel, so a weight is
``k * scale`` exactly; ADMM's quantized weights (levels ±q..±nq) are such values with no rounding. The
kernels are torch's quantized engine (fbgemm on x86): ``Int8Linear`` quantizes its input per call
(dynamic, per tensor, the same kernel as ``torch.ao.quantization.quantize_dynamic``); ``Int8Conv2d``
quantizes its input with a static scale found by calibration and requantizes its output with another.
Both use 7-bit activations (0..127, torch's ``reduce_range``), which keeps fbgemm's u8 x s8 pair sums
inside int16 on AVX2 CPUs without VNNI; on others it only halves the activation resolution.

fbgemm rather than oneDNN's quantized kernels because it ran faster at every shape compared (docs/benchmarks.md,
"Design measurements"); the choice lives only in ``_prepack_linear``, ``_conv_plan`` and the ``_run_*``
functions below.

Prepacked fbgemm weights are TorchScript objects: a state_dict cannot hold them and torch.export
refuses them. So the modules keep int8 weights and scales as plain tensors, and the kernels are
torch.library custom ops taking plain tensors (``fxreduce::int8_linear``, ``fxreduce::int8_conv2d``)
with fake kernels: a lowered graph saves weights-only, exports, and runs under the cost model's fake
tensors. Each op prepacks lazily on first use and caches the packed weight until a tensor changes.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from ..errors import InputError, UnsupportedError

INPUT_LEVELS = 127  # 7-bit activations into the int8 GEMM (reduce_range)
OUTPUT_LEVELS = 255  # requantized Conv2d outputs use the full uint8 range
MAX_WEIGHT_LEVEL = 127

_PACKED: dict[int, tuple[tuple, object]] = {}


def _cached_pack(weight: Tensor, key: tuple, pack) -> object:
    """The packed form of ``weight`` for ``key`` (tensor versions, settings, engine), packed once."""
    entry = _PACKED.get(id(weight))
    if entry is not None and entry[0] == key:
        return entry[1]
    if entry is None:
        weakref.finalize(weight, _PACKED.pop, id(weight), None)
    packed = pack()
    _PACKED[id(weight)] = (key, packed)
    return packed


def _versions(*tensors: Tensor | None) -> tuple:
    return tuple((t.data_ptr(), t._version) if t is not None else None for t in tensors)


def _quantized_weight(weight: Tensor, scale: Tensor) -> Tensor:
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    # torch warns once per process that quantized tensors are deprecated; this module uses them on purpose
    # (fbgemm's prepacked weights are quantized tensors), and the first one is always made here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        return torch._make_per_channel_quantized_tensor(weight.contiguous(), scale.double(), zero_points, 0)


def _prepack_linear(weight: Tensor, scale: Tensor, bias: Tensor | None) -> object:
    key = (_versions(weight, scale, bias), torch.backends.quantized.engine)
    return _cached_pack(weight, key, lambda: torch.ops.quantized.linear_prepack(_quantized_weight(weight, scale), bias))


@dataclass(frozen=True)
class _ConvPlan:
    """What an int8 conv call needs that changes only with the module's tensors, made once: the prepacked
    weight, the activation scales as Python numbers, and the input subsampling of a strided 1x1 conv.

    A strided 1x1 conv's plan (``subsample`` set) runs it as the int8 GEMM it is, over the pixels it reads:
    ``packed`` is then a Linear's prepacked weight and the kernel returns float32 from its int32 sums.
    """

    packed: object
    input_scale: float
    input_zero: int
    output_scale: float
    output_zero: int
    subsample: tuple[int, int] | None


def is_pointwise(kernel_size: Sequence[int], padding: Sequence[int], stride: Sequence[int], groups: int) -> bool:
    """A strided 1x1 conv (ResNet's downsample): run as an int8 GEMM over the pixels it reads.

    It reads every stride-th pixel, so the input is subsampled (and copied channels-last) first anyway;
    fbgemm's static GEMM with float32 output then skips the output's requantize and dequantize, which cost
    as much as the GEMM itself at ResNet's downsample sizes.
    """
    return tuple(kernel_size) == (1, 1) and tuple(padding) == (0, 0) and tuple(stride) != (1, 1) and groups == 1


def _conv_plan(weight: Tensor, scale: Tensor, bias: Tensor | None, stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int], groups: int, input_qparams: Tensor, output_qparams: Tensor) -> _ConvPlan:
    pointwise = is_pointwise(weight.shape[2:], padding, stride, groups)
    settings = (tuple(stride), tuple(padding), tuple(dilation), groups)
    key = (_versions(weight, scale, bias, input_qparams, output_qparams), settings, torch.backends.quantized.engine)

    def plan() -> _ConvPlan:
        if pointwise:
            packed = torch.ops.quantized.linear_prepack(_quantized_weight(weight.flatten(1), scale), bias)
        else:
            packed = torch.ops.quantized.conv2d_prepack(_quantized_weight(weight, scale), bias, list(stride),
                                                        list(padding), list(dilation), groups)
        (in_scale, in_zero), (out_scale, out_zero) = input_qparams.tolist(), output_qparams.tolist()
        return _ConvPlan(packed, in_scale, int(in_zero), out_scale, int(out_zero), tuple(stride) if pointwise else None)

    return _cached_pack(weight, key, plan)


def _run_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, relu: bool) -> Tensor:
    packed = _prepack_linear(weight, scale, bias)
    kernel = torch.ops.quantized.linear_relu_dynamic if relu else torch.ops.quantized.linear_dynamic
    return kernel(x.contiguous(), packed, True)  # reduce_range: 7-bit activations


def _run_conv(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, stride: Sequence[int],
              padding: Sequence[int], dilation: Sequence[int], groups: int, input_qparams: Tensor,
              output_qparams: Tensor, relu: bool) -> Tensor:
    plan = _conv_plan(weight, scale, bias, stride, padding, dilation, groups, input_qparams, output_qparams)
    if plan.subsample is not None:
        pixels = x[:, :, :: plan.subsample[0], :: plan.subsample[1]].permute(0, 2, 3, 1)
        n, h, w, channels = pixels.shape
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            pixels.reshape(-1, channels), plan.input_scale, plan.input_zero, plan.packed)
        y = y.view(n, h, w, -1).permute(0, 3, 1, 2)  # channels-last, as the conv kernel returns it
        return y.relu_() if relu else y
    qx = torch.quantize_per_tensor(x, plan.input_scale, plan.input_zero, torch.quint8)
    kernel = torch.ops.quantized.conv2d_relu.new if relu else torch.ops.quantized.conv2d.new
    return kernel(qx, plan.packed, plan.output_scale, plan.output_zero).dequantize()


@torch.library.custom_op("fxreduce::int8_linear", mutates_args=())
def int8_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, relu: bool) -> Tensor:
    """y = x W^T + b (then ReLU if ``relu``) with W = weight * scale[:, None], x quantized per call."""
    return _run_linear(x, weight, scale, bias, relu)


@int8_linear.register_fake
def _int8_linear_fake(x, weight, scale, bias, relu):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("fxreduce::int8_conv2d", mutates_args=())
def int8_conv2d(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int], groups: int, input_qparams: Tensor,
                output_qparams: Tensor, relu: bool) -> Tensor:
    """conv2d with int8 weights, input quantized with ``input_qparams`` (scale, zero point), output
    requantized with ``output_qparams`` and returned as float32 (channels-last, as fbgemm computes it)."""
    return _run_conv(x, weight, scale, bias, stride, padding, dilation, groups, input_qparams, output_qparams, relu)


@int8_conv2d.register_fake
def _int8_conv2d_fake(x, weight, scale, bias, stride, padding, dilation, groups, input_qparams, output_qparams,
                      relu):
    n, _, h, w = x.shape
    kh, kw = weight.shape[2:]
    out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((n, weight.shape[0], out_h, out_w)).contiguous(memory_format=torch.channels_last)


# torch's FLOP counter sees these ops in exported (aten-level) graphs, where no module declares the cost.
@register_flop_formula(torch.ops.fxreduce.int8_linear)
def _int8_linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


@register_flop_formula(torch.ops.fxreduce.int8_conv2d)
def _int8_conv2d_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, out_shape)


_PLAIN = (Tensor, nn.Parameter)


def _eager(*tensors: Tensor | None) -> bool:
    """True when running on plain tensors outside any tracing: then the kernel is called directly.

    The custom op's dispatch has a fixed cost per call that small GEMMs feel; tracing, export and the cost
    model's fake tensors must go through the op so they see one node with a fake kernel.
    """
    return (_get_current_dispatch_mode() is None and not torch.compiler.is_compiling()
            and all(t is None or type(t) in _PLAIN for t in tensors))


def activation_qparams(low: float, high: float, levels: int) -> tuple[float, int]:
    """(scale, zero point) mapping [min(low, 0), max(high, 0)] onto 0..levels, zero exactly representable."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = (high - low) / levels if high > low else 1.0
    scale = max(scale, torch.finfo(torch.float32).tiny)
    zero = int(min(max(round(-low / scale), 0), levels))
    return scale, zero


def check_int8_weight(weight: Tensor, scale: Tensor, where: str) -> None:
    if weight.dtype != torch.int8:
        raise InputError(f"int8 weights must have dtype torch.int8, got {weight.dtype}", where=where)
    if weight.numel() and int(weight.min()) < -MAX_WEIGHT_LEVEL:
        raise InputError(f"int8 weights must lie in [-{MAX_WEIGHT_LEVEL}, {MAX_WEIGHT_LEVEL}] (symmetric); -128 "
                         f"found", where=where, fix="clamp the integer weights to +-127")
    if scale.shape != (weight.shape[0],) or not bool((scale > 0).all()) or not bool(torch.isfinite(scale).all()):
        raise InputError(f"weight scales must be {weight.shape[0]} positive finite floats (one per output channel)",
                         where=where)


def check_input(x: Tensor, where: str, dims: int | None = None) -> None:
    if x.dtype is not torch.float32 or not x.is_cpu:
        raise UnsupportedError(f"int8 kernels take float32 CPU inputs, got {x.dtype} on {x.device}", where=where,
                               fix="run the lowered model on CPU in float32")
    if dims is not None and x.dim() != dims:
        raise InputError(f"expected a {dims}-D input, got shape {tuple(x.shape)}", where=where)


def out_size(size, offset: int, stride: int):
    """(size + offset) // stride + 1 for an int or a sympy size, with floor(floor(y) + c) / s) written
    floor((y + c) / s) as torch's shape env simplifies it: the declared cost then matches an fp32 conv's
    counted cost term for term, and certificates compare like with like."""
    terms = size.args if getattr(size, "is_Add", False) else (size,)
    floors = [term for term in terms if type(term).__name__ == "floor"]
    if len(floors) == 1 and (size - floors[0]).is_Integer:
        return type(floors[0])((floors[0].args[0] + (size - floors[0]) + offset) / stride) + 1
    return (size + offset) // stride + 1


class Int8Linear(nn.Module):
    """Linear with int8 weights: dynamic per-tensor activation quantization, int8 GEMM, float32 out.

    Error (stated by :meth:`error_bound`): with s = (max(x, 0) - min(x, 0)) / 127 every input element is
    off by at most s/2, so output j is off by at most s/2 * ||W_j||_1 from x W^T + b with the dequantized
    weights, plus float32 rounding.
    """

    fxreduce_mac_dtype = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, relu: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.relu = in_features, out_features, relu
        self.weight_int8 = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_int8(cls, weight: Tensor, scale: Tensor, bias: Tensor | None = None, relu: bool = False) -> "Int8Linear":
        check_int8_weight(weight, scale, "Int8Linear")
        module = cls(weight.shape[1], weight.shape[0], bias is not None, relu)
        with torch.no_grad():
            module.weight_int8.copy_(weight)
            module.weight_scale.copy_(scale)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def dequantized_weight(self) -> Tensor:
        """The float32 weight this module multiplies by: int8 values times their channel's scale."""
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        weight, scale, bias = self.weight_int8, self.weight_scale, self.bias
        if _eager(x, weight, scale, bias):
            check_input(x, "Int8Linear")
            return _run_linear(x, weight, scale, bias, self.relu)
        return torch.ops.fxreduce.int8_linear(x, weight, scale, bias, self.relu)

    def reference(self, x: Tensor) -> Tensor:
        """The float32 computation this module approximates (dequantized weights, unquantized input)."""
        y = F.linear(x, self.dequantized_weight(), self.bias)
        return torch.relu(y) if self.relu else y

    def error_bound(self, x: Tensor) -> Tensor:
        """Per output element: the most ``self(x)`` may differ from :meth:`reference`."""
        with torch.no_grad():
            scale = (x.max().clamp(min=0) - x.min().clamp(max=0)) / INPUT_LEVELS
            weight = self.dequantized_weight().abs()
            rounding = scale / 2 * weight.sum(1)
            magnitude = F.linear(x.abs(), weight, None if self.bias is None else self.bias.abs())
            return (rounding * (1 + 1e-4) + 1e-4 * magnitude + 1e-6).expand(*x.shape[:-1], self.out_features)

    def fxreduce_macs(self, input_shapes, training: bool = False) -> dict:
        rows = 1
        for size in input_shapes[0][:-1]:
            rows = rows * size
        return {"int8 GEMM": rows * self.in_features * self.out_features}

    def storage(self) -> "Storage":
        return storage_of(self.weight_int8, scales=self.weight_scale.numel())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"relu={self.relu}, activations=dynamic")


class Int8Conv2d(nn.Module):
    """Conv2d with int8 weights: static activation quantization (scales from calibration), float32 out.

    Error (stated by :meth:`error_bound`): each input element is off by at most s_in/2 plus its distance
    outside the calibrated input range; the output then is off by at most conv(that, |W|), plus s_out/2
    for requantization, plus how far the output may leave the calibrated output range, plus float32 rounding.
    A strided 1x1 conv (:attr:`pointwise`) returns float32 from its int32 sums: no requantization terms.
    """

    fxreduce_mac_dtype = "int8"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int], stride: Sequence[int] = (1, 1),
                 padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1,
                 bias: bool = True, relu: bool = False):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.groups, self.relu = groups, relu
        self.weight_int8 = nn.Parameter(torch.zeros(out_channels, in_channels // groups, *self.kernel_size,
                                                    dtype=torch.int8), requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels), requires_grad=False) if bias else None
        self.register_buffer("input_qparams", torch.tensor([1.0, 0.0]))
        self.register_buffer("output_qparams", torch.tensor([1.0, 0.0]))

    @classmethod
    def from_int8(cls, weight: Tensor, scale: Tensor, bias: Tensor | None, *, stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int], groups: int, input_range: tuple[float, float],
                  output_range: tuple[float, float], relu: bool = False) -> "Int8Conv2d":
        """An int8 conv whose activation scales cover ``input_range`` and ``output_range`` (calibrated min, max)."""
        check_int8_weight(weight, scale, "Int8Conv2d")
        module = cls(weight.shape[1] * groups, weight.shape[0], weight.shape[2:], stride, padding, dilation, groups,
                     bias is not None, relu)
        with torch.no_grad():
            module.weight_int8.copy_(weight)
            module.weight_scale.copy_(scale)
            if bias is not None:
                module.bias.copy_(bias)
            module.input_qparams.copy_(torch.tensor(activation_qparams(*input_range, INPUT_LEVELS)))
            low, high = output_range
            module.output_qparams.copy_(torch.tensor(activation_qparams(0.0 if relu else low, high, OUTPUT_LEVELS)))
        return module

    def dequantized_weight(self) -> Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None, None, None]

    @property
    def pointwise(self) -> bool:
        """Whether this conv runs as an int8 GEMM over the pixels (see :func:`is_pointwise`)."""
        return is_pointwise(self.kernel_size, self.padding, self.stride, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        args = (self.weight_int8, self.weight_scale, self.bias, self.stride, self.padding, self.dilation, self.groups,
                self.input_qparams, self.output_qparams, self.relu)
        if _eager(x, *args[:3], args[7]):
            check_input(x, "Int8Conv2d", dims=4)
            return _run_conv(x, *args)
        return torch.ops.fxreduce.int8_conv2d(x, *args)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def reference(self, x: Tensor) -> Tensor:
        y = self._conv(x, self.dequantized_weight(), self.bias)
        return torch.relu(y) if self.relu else y

    def _range(self, qparams: Tensor, levels: int) -> tuple[float, float, float]:
        scale, zero = qparams.tolist()
        return scale, -zero * scale, (levels - zero) * scale

    def error_bound(self, x: Tensor) -> Tensor:
        """Per output element: the most ``self(x)`` may differ from :meth:`reference`."""
        with torch.no_grad():
            in_scale, in_low, in_high = self._range(self.input_qparams, INPUT_LEVELS)
            # Inputs above the calibrated range still quantize up to uint8's 255 (torch's convention), so
            # the distance outside [low, high] over-counts clipping and the bound stays safe.
            outside = (in_low - x).clamp(min=0) + (x - in_high).clamp(min=0)
            weight = self.dequantized_weight().abs()
            spread = self._conv(outside + in_scale / 2, weight, None)
            magnitude = self._conv(x.abs(), weight, None if self.bias is None else self.bias.abs())
            if self.pointwise:  # float32 out of the int32 sums: no output requantization
                return spread * (1 + 1e-4) + 1e-4 * magnitude + 1e-6
            y = self._conv(x, self.dequantized_weight(), self.bias)
            out_scale, out_low, out_high = self._range(self.output_qparams, OUTPUT_LEVELS)
            above = (y + spread - out_high).clamp(min=0)
            below = torch.zeros_like(y) if self.relu else (out_low - (y - spread)).clamp(min=0)
            return (spread + out_scale / 2 + above + below) * (1 + 1e-4) + 1e-4 * magnitude + 1e-6

    def fxreduce_macs(self, input_shapes, training: bool = False) -> dict:
        n, _, h, w = input_shapes[0]
        kh, kw = self.kernel_size
        out_h = out_size(h, 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1, self.stride[0])
        out_w = out_size(w, 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1, self.stride[1])
        per_output = (self.in_channels // self.groups) * kh * kw
        return {"int8 conv": n * self.out_channels * out_h * out_w * per_output}

    def storage(self) -> "Storage":
        return storage_of(self.weight_int8, scales=self.weight_scale.numel())

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, relu={self.relu}, activations=static")


@dataclass(frozen=True)
class Storage:
    """Bits to store one pruned + quantized weight tensor: values, sparse index, scales.

    ``format`` is the cheapest of: "dense" (every weight coded, zero included), "csr" (column index per
    non-zero + row pointers), "relative" (Deep Compression's gap index of ``index_bits`` bits per entry,
    with a filler entry wherever a gap exceeds what the index can say).
    """

    weights: int
    nonzeros: int
    format: str
    value_bits: int
    index_bits: int
    entries: int
    total_bits: int
    scale_bits: int

    @property
    def dense_fp32_bits(self) -> int:
        return 32 * self.weights

    @property
    def reduction(self) -> float:
        return self.dense_fp32_bits / self.total_bits if self.total_bits else math.inf


def _bits(count: int) -> int:
    """Bits to tell ``count`` things apart."""
    return max(1, math.ceil(math.log2(count))) if count > 1 else 1


def storage_of(values: Tensor, scales: int = 1) -> Storage:
    """The storage of integer weight codes ``values`` (levels ±1..±n and 0 for pruned) with ``scales`` float32 scales.

    Non-zero values need log2(2n) bits (zero is implied by the index); a dense layout codes 2n+1 values.
    """
    codes = values.detach().reshape(values.shape[0], -1).to(torch.int32)
    rows, columns = codes.shape
    flat = codes.flatten()
    nonzero = torch.nonzero(flat).flatten()
    nnz, total = int(nonzero.numel()), int(flat.numel())
    n = int(flat.abs().max()) if total else 0
    scale_bits = 32 * scales
    options = [("dense", _bits(2 * n + 1), 0, total, total * _bits(2 * n + 1))]
    value_bits = _bits(2 * n)
    csr = nnz * (value_bits + _bits(columns)) + (rows + 1) * _bits(nnz + 1)
    options.append(("csr", value_bits, _bits(columns), nnz, csr))
    if nnz:
        gaps = torch.diff(nonzero, prepend=torch.tensor([-1])) - 1
        for index_bits in range(1, 17):
            fillers = int((gaps // 2 ** index_bits).sum())
            entries = nnz + fillers
            # Filler entries store an explicit zero, so the values then need a code for it.
            bits = value_bits if fillers == 0 else _bits(2 * n + 1)
            options.append(("relative", bits, index_bits, entries, entries * (bits + index_bits)))
    form, bits, index_bits, entries, cost = min(options, key=lambda option: option[4])
    return Storage(total, nnz, form, bits, index_bits, entries, cost + scale_bits, scale_bits)


__all__ = ["INPUT_LEVELS", "OUTPUT_LEVELS", "Int8Conv2d", "Int8Linear", "Storage", "activation_qparams",
           "check_int8_weight", "int8_conv2d", "int8_linear", "is_pointwise", "storage_of"]
