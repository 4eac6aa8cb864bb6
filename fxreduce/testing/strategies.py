"""Hypothesis strategies for random, symbolically traceable models with matching inputs.

A pass is only as trustworthy as the variety of graphs it was checked on, so these strategies build
the layers real models use (Linear, Conv2d, BatchNorm with non-trivial statistics, activations,
residual adds, branches, pooling, Dropout, LSTM) in both dialects a traced graph contains:
``call_module`` (``nn.Linear``) and ``call_function`` / ``call_method`` (``F.linear`` on the block's
own parameters, ``x.flatten(1)``). A model is a pure function of hypothesis's draws (its weights come
from a drawn seed), so a failing example replays and shrinks to a short layer list.

Usage::

    @given(models(kinds=("cnn",)))
    def test_my_pass_keeps_outputs(generated):
        ...  # generated.module, generated.example_inputs, generated.dynamic
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from fxreduce.errors import InputError

MODEL_FAMILIES = ("mlp", "cnn", "lstm")

_ACTIVATION_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}
_ACTIVATION_FUNCTIONS = {
    "relu": "torch.relu",
    "gelu": "F.gelu",
    "tanh": "torch.tanh",
    "sigmoid": "torch.sigmoid",
    "silu": "F.silu",
}
# Functions a `_Call` block may apply, by the name its repr shows; names keep the modules picklable.
# "Tensor.<name>" ops are called as methods, so the traced graph holds call_method nodes.
_CALLS = {
    "torch.relu": torch.relu,
    "F.gelu": F.gelu,
    "torch.tanh": torch.tanh,
    "torch.sigmoid": torch.sigmoid,
    "F.silu": F.silu,
    "F.max_pool2d": F.max_pool2d,
    "F.avg_pool2d": F.avg_pool2d,
    "F.adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "torch.flatten": torch.flatten,
    "getitem": operator.getitem,
}


# --- runtime blocks: the small modules a generated model is made of ------------------------------


class _Call(nn.Module):
    """Applies a named function (``_CALLS``) so the traced graph holds call_function/call_method."""

    def __init__(self, op: str, *args: Any):
        super().__init__()
        self.op, self.args = op, args

    def forward(self, x):
        if self.op.startswith("Tensor."):
            return getattr(x, self.op.removeprefix("Tensor."))(*self.args)
        return _CALLS[self.op](x, *self.args)

    def extra_repr(self) -> str:
        return f"{self.op}, args={self.args}"


class _FunctionalLinear(nn.Module):
    """``F.linear`` on its own parameters: a get_attr + call_function pattern instead of call_module."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"in_features={in_features}, out_features={out_features}, bias={self.bias is not None}"


class _FunctionalConv2d(nn.Module):
    """``F.conv2d`` on its own parameters, the functional twin of ``nn.Conv2d``."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight = conv.weight
        self.register_parameter("bias", conv.bias)
        self.stride, self.padding, self.groups = conv.stride, conv.padding, conv.groups

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}, stride={self.stride}, padding={self.padding}, groups={self.groups}"


class _FunctionalDropout(nn.Module):
    """``F.dropout(x, p, self.training)``, the form whose mode is baked in when traced."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)


class _LSTM(nn.Module):
    """Runs an ``nn.LSTM`` and keeps the output sequence, as ``out, _ = self.lstm(x)`` in user code."""

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        self.lstm = lstm

    def forward(self, x):
        out, _ = self.lstm(x)
        return out


class _Residual(nn.Module):
    """``x + body(x)``: a skip connection around a shape-preserving body."""

    def __init__(self, body: nn.Sequential):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class _Branch(nn.Module):
    """Two paths from one input, merged by ``+`` or ``torch.cat``."""

    def __init__(self, left: nn.Sequential, right: nn.Sequential, merge: str, dim: int):
        super().__init__()
        self.left, self.right, self.merge, self.dim = left, right, merge, dim

    def forward(self, x):
        a, b = self.left(x), self.right(x)
        if self.merge == "add":
            return a + b
        return torch.cat([a, b], self.dim)


class _GeneratedNet(nn.Module):
    """The root of every generated model: its layers in order."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def _randomise_norm(norm: nn.modules.batchnorm._BatchNorm) -> None:
    """Give a BatchNorm statistics other than (0, 1) and some negative scales, so folding it is tested."""
    with torch.no_grad():
        norm.running_mean.normal_(0.0, 0.5)
        norm.running_var.uniform_(0.25, 2.0)
        norm.num_batches_tracked.fill_(100)
        if norm.affine:
            sign = torch.where(torch.rand(norm.num_features) < 0.2, -1.0, 1.0)
            norm.weight.uniform_(0.5, 1.5).mul_(sign)
            norm.bias.normal_(0.0, 0.2)


# --- layer specs: what hypothesis draws, and what a failing example prints -----------------------


class _Layer(ABC):
    """One drawn layer: it builds its module and says how it changes a spatial size."""

    @abstractmethod
    def build(self) -> nn.Module: ...

    def out_size(self, size: int) -> int:
        return size

    def __repr__(self):
        return str(self)


def _window_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True, repr=False)
class _Linear(_Layer):
    in_features: int
    out_features: int
    bias: bool = True
    functional: bool = False

    def build(self):
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias)
        return _FunctionalLinear(linear) if self.functional else linear

    def __str__(self):
        name = "F.linear" if self.functional else "Linear"
        return f"{name}({self.in_features}->{self.out_features}{'' if self.bias else ', bias=False'})"


@dataclass(frozen=True, repr=False)
class _Conv(_Layer):
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    groups: int = 1
    bias: bool = True
    functional: bool = False

    def build(self):
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel, self.stride, self.padding,
            groups=self.groups, bias=self.bias,
        )
        return _FunctionalConv2d(conv) if self.functional else conv

    def out_size(self, size):
        return _window_out(size, self.kernel, self.stride, self.padding)

    def __str__(self):
        name = "F.conv2d" if self.functional else "Conv2d"
        extra = (f", g{self.groups}" if self.groups > 1 else "") + ("" if self.bias else ", bias=False")
        return (
            f"{name}({self.in_channels}->{self.out_channels}, k{self.kernel}, s{self.stride}, "
            f"p{self.padding}{extra})"
        )


@dataclass(frozen=True, repr=False)
class _Norm(_Layer):
    features: int
    dims: int
    affine: bool = True

    def build(self):
        norm = (nn.BatchNorm1d if self.dims == 1 else nn.BatchNorm2d)(self.features, affine=self.affine)
        _randomise_norm(norm)
        return norm

    def __str__(self):
        return f"BatchNorm{self.dims}d({self.features}{'' if self.affine else ', affine=False'})"


@dataclass(frozen=True, repr=False)
class _Activation(_Layer):
    name: str
    functional: bool = False

    def build(self):
        if self.functional:
            return _Call(_ACTIVATION_FUNCTIONS[self.name])
        return _ACTIVATION_MODULES[self.name]()

    def __str__(self):
        return _ACTIVATION_FUNCTIONS[self.name] if self.functional else _ACTIVATION_MODULES[self.name].__name__


@dataclass(frozen=True, repr=False)
class _Dropout(_Layer):
    p: float
    functional: bool = False

    def build(self):
        return _FunctionalDropout(self.p) if self.functional else nn.Dropout(self.p)

    def __str__(self):
        return f"{'F.dropout' if self.functional else 'Dropout'}({self.p})"


@dataclass(frozen=True, repr=False)
class _Pool(_Layer):
    mode: str
    kernel: int
    stride: int
    padding: int
    functional: bool = False

    def build(self):
        if self.functional:
            return _Call(f"F.{self.mode}_pool2d", self.kernel, self.stride, self.padding)
        module = nn.MaxPool2d if self.mode == "max" else nn.AvgPool2d
        return module(self.kernel, self.stride, self.padding)

    def out_size(self, size):
        return _window_out(size, self.kernel, self.stride, self.padding)

    def __str__(self):
        name = f"F.{self.mode}_pool2d" if self.functional else f"{self.mode.capitalize()}Pool2d"
        return f"{name}(k{self.kernel}, s{self.stride}, p{self.padding})"


_FIXED_MODULES = {"AdaptiveAvgPool2d(1)": lambda: nn.AdaptiveAvgPool2d(1), "Flatten": nn.Flatten}


@dataclass(frozen=True, repr=False)
class _Fixed(_Layer):
    """A parameter-free reshaping step (global pooling, flattening, picking a time step)."""

    label: str
    op: str | None = None
    args: tuple = ()

    def build(self):
        if self.op is None:
            return _FIXED_MODULES[self.label]()
        return _Call(self.op, *self.args)

    def __str__(self):
        return self.label


@dataclass(frozen=True, repr=False)
class _LSTMLayer(_Layer):
    input_size: int
    hidden_size: int
    num_layers: int
    batch_first: bool
    bias: bool = True

    def build(self):
        return _LSTM(nn.LSTM(self.input_size, self.hidden_size, self.num_layers, self.bias, self.batch_first))

    def __str__(self):
        return (
            f"LSTM({self.input_size}->{self.hidden_size}, layers={self.num_layers}, "
            f"batch_first={self.batch_first}{'' if self.bias else ', bias=False'})"
        )


def _sequence_out(layers: tuple[_Layer, ...], size: int) -> int:
    for layer in layers:
        size = layer.out_size(size)
    return size


@dataclass(frozen=True, repr=False)
class _ResidualLayer(_Layer):
    body: tuple[_Layer, ...]

    def build(self):
        return _Residual(nn.Sequential(*(layer.build() for layer in self.body)))

    def __str__(self):
        return f"Residual[{', '.join(map(str, self.body))}]"


@dataclass(frozen=True, repr=False)
class _BranchLayer(_Layer):
    left: tuple[_Layer, ...]
    right: tuple[_Layer, ...]
    merge: str
    dim: int

    def build(self):
        left = nn.Sequential(*(layer.build() for layer in self.left))
        right = nn.Sequential(*(layer.build() for layer in self.right))
        return _Branch(left, right, self.merge, self.dim)

    def out_size(self, size):
        return _sequence_out(self.left, size)

    def __str__(self):
        merge = "add" if self.merge == "add" else f"cat(dim={self.dim})"
        return f"Branch[{', '.join(map(str, self.left))} | {', '.join(map(str, self.right))} -> {merge}]"


# --- the drawn model ----------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class ModelSpec:
    """Everything drawn for one model; ``build()`` turns it into the same module and inputs every time.

    ``dynamic`` maps dim names to ``(input index, dim index)``; ``min_sizes`` gives the smallest size
    each of those dims may take (2 for batch and time, since torch specialises sizes 0 and 1 when
    tracing with symbolic shapes; for H and W the size that keeps every feature map at least 2x2).
    """

    kind: str
    layers: tuple[_Layer, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    dynamic: dict[str, tuple[int, int]]
    min_sizes: dict[str, int]
    seed: int
    training: bool = False

    def build(self) -> GeneratedModel:
        """Build the module from ``seed`` without disturbing torch's global RNG state."""
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed)
            module = _GeneratedNet([layer.build() for layer in self.layers])
        module.train(self.training)
        return GeneratedModel(self, module, self.make_inputs())

    def make_inputs(self, *, seed: int | None = None, **sizes: int) -> tuple[torch.Tensor, ...]:
        """Inputs with the dims named in ``dynamic`` resized, e.g. ``make_inputs(N=3, H=11)``.

        Values come from their own generator (``seed``, default the model's), so the call is repeatable.
        """
        shapes = [list(shape) for shape in self.input_shapes]
        for name, size in sizes.items():
            if name not in self.dynamic:
                raise InputError(
                    f"unknown dynamic dim {name!r}", where=f"{self.kind} model",
                    fix=f"use one of {sorted(self.dynamic)}",
                )
            if size < self.min_sizes[name]:
                raise InputError(
                    f"dim {name}={size} is below the model's minimum {self.min_sizes[name]}",
                    where=f"{self.kind} model", fix=f"pass {name} >= {self.min_sizes[name]}",
                )
            index, dim = self.dynamic[name]
            shapes[index][dim] = size
        generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        return tuple(torch.randn(shape, generator=generator) for shape in shapes)

    def __str__(self):
        shapes = ", ".join(str(tuple(shape)) for shape in self.input_shapes)
        mode = "train" if self.training else "eval"
        layers = " -> ".join(map(str, self.layers))
        return (
            f"{self.kind}, seed={self.seed}, {mode}, inputs=[{shapes}], dynamic={self.dynamic}, "
            f"min_sizes={self.min_sizes}: {layers}"
        )

    def __repr__(self):
        return f"ModelSpec({self})"

    def _repr_pretty_(self, printer, cycle):
        printer.text(repr(self))


@dataclass(eq=False, repr=False)
class GeneratedModel:
    """A generated module with inputs that fit it; its repr is the layer spec, for failure reports.

    ``module`` is in the drawn mode (eval unless asked otherwise); ``example_inputs`` is a tuple of
    tensors; ``dynamic`` maps dim names to ``(input index, dim index)``, e.g. ``{"N": (0, 0),
    "H": (0, 2), "W": (0, 3)}`` for a CNN; ``make_inputs`` gives inputs with those dims resized.
    """

    spec: ModelSpec
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def dynamic(self) -> dict[str, tuple[int, int]]:
        return dict(self.spec.dynamic)

    @property
    def min_sizes(self) -> dict[str, int]:
        return dict(self.spec.min_sizes)

    @property
    def min_spatial(self) -> int | None:
        """Smallest H and W the model accepts (CNNs end in global pooling, so any larger size works)."""
        return self.spec.min_sizes.get("H")

    @property
    def training(self) -> bool:
        return self.spec.training

    def make_inputs(self, *, seed: int | None = None, **sizes: int) -> tuple[torch.Tensor, ...]:
        """Inputs with the dims named in ``dynamic`` resized, e.g. ``make_inputs(N=3, H=11)``."""
        return self.spec.make_inputs(seed=seed, **sizes)

    def __repr__(self):
        return f"GeneratedModel({self.spec})"

    def _repr_pretty_(self, printer, cycle):
        """Hypothesis prints falsifying examples with this; it would otherwise dump every field."""
        printer.text(repr(self))


# --- drawing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sizes:
    batch: tuple[int, int]
    spatial: tuple[int, int]
    features: tuple[int, int]
    seq_len: tuple[int, int]

    def draw_features(self, draw) -> int:
        return draw(st.integers(*self.features))


@st.composite
def _activation(draw) -> _Activation:
    return _Activation(draw(st.sampled_from(tuple(_ACTIVATION_MODULES))), draw(st.booleans()))


@st.composite
def _dropout(draw) -> _Dropout:
    return _Dropout(draw(st.sampled_from((0.1, 0.25, 0.5))), draw(st.booleans()))


@st.composite
def _linear(draw, in_features: int, out_features: int) -> _Linear:
    return _Linear(in_features, out_features, draw(st.booleans()), draw(st.booleans()))


@st.composite
def _vector_layer(draw, width: int, sizes: _Sizes, batch_first: bool | None) -> tuple[_Layer, int]:
    """A layer on ``(..., width)`` features; ``batch_first`` is None for flat ``(N, width)`` input."""
    choices = ["linear", "linear", "act", "act", "dropout", "residual", "branch"]
    choices += ["norm"] if batch_first is None else ["lstm"]
    choice = draw(st.sampled_from(choices))
    if choice == "linear":
        out = sizes.draw_features(draw)
        return draw(_linear(width, out)), out
    if choice == "act":
        return draw(_activation()), width
    if choice == "dropout":
        return draw(_dropout()), width
    if choice == "norm":
        return _Norm(width, 1, draw(st.booleans())), width
    if choice == "lstm":
        lstm = draw(_lstm(width, sizes, batch_first))
        return lstm, lstm.hidden_size
    if choice == "residual":
        body = [draw(_linear(width, width)), draw(_activation())]
        if draw(st.booleans()):
            body.append(draw(_linear(width, width)))
        return _ResidualLayer(tuple(body)), width
    merge = draw(st.sampled_from(("add", "cat")))
    a = sizes.draw_features(draw)
    b = a if merge == "add" else sizes.draw_features(draw)
    left = (draw(_linear(width, a)), draw(_activation()))
    right = (draw(_linear(width, b)),)
    return _BranchLayer(left, right, merge, -1), a if merge == "add" else a + b


@st.composite
def _lstm(draw, width: int, sizes: _Sizes, batch_first: bool) -> _LSTMLayer:
    hidden = sizes.draw_features(draw)
    return _LSTMLayer(width, hidden, draw(st.integers(1, 2)), batch_first, draw(st.booleans()))


# (kernel, stride, padding): "same" convs, strided convs, and a shrinking unpadded 3x3.
_CONV_GEOMETRIES = ((3, 1, 1), (1, 1, 0), (3, 2, 1), (1, 2, 0), (3, 1, 0))
_POOL_GEOMETRIES = ((2, 2, 0), (3, 2, 1))


@st.composite
def _plain_conv(draw, in_channels: int, out_channels: int, kernel: int, stride: int, padding: int) -> _Conv:
    return _Conv(in_channels, out_channels, kernel, stride, padding, 1, draw(st.booleans()), draw(st.booleans()))


@st.composite
def _conv(draw, channels: int, size: int, sizes: _Sizes) -> _Conv:
    """A conv, grouped now and then, that keeps a ``size``-pixel feature map at least 2x2."""
    kernel, stride, padding = draw(st.sampled_from([g for g in _CONV_GEOMETRIES if _window_out(size, *g) >= 2]))
    grouped = sorted({g for g in (2, 4, channels) if g > 1 and channels % g == 0})
    groups = draw(st.sampled_from((1, 1, 1, *grouped)))
    low = max(1, sizes.features[0] // groups)
    out_channels = groups * draw(st.integers(low, max(low, sizes.features[1] // groups)))
    bias, functional = draw(st.booleans()), draw(st.booleans())
    return _Conv(channels, out_channels, kernel, stride, padding, groups, bias, functional)


@st.composite
def _image_layer(draw, channels: int, size: int, sizes: _Sizes) -> tuple[_Layer, int]:
    """A layer on ``(N, channels, size, size)`` that leaves every feature map at least 2x2."""
    pools = [g for g in _POOL_GEOMETRIES if _window_out(size, *g) >= 2]
    choices = ["conv", "conv", "norm", "act", "act", "dropout", "residual", "branch"] + (["pool"] if pools else [])
    choice = draw(st.sampled_from(choices))
    if choice == "conv":
        conv = draw(_conv(channels, size, sizes))
        return conv, conv.out_channels
    if choice == "norm":
        return _Norm(channels, 2, draw(st.booleans())), channels
    if choice == "act":
        return draw(_activation()), channels
    if choice == "dropout":
        return draw(_dropout()), channels
    if choice == "pool":
        kernel, stride, padding = draw(st.sampled_from(pools))
        mode = draw(st.sampled_from(("max", "avg")))
        return _Pool(mode, kernel, stride, padding, draw(st.booleans())), channels
    if choice == "residual":
        body = [
            draw(_plain_conv(channels, channels, 3, 1, 1)),
            _Norm(channels, 2, draw(st.booleans())),
            draw(_activation()),
        ]
        if draw(st.booleans()):
            body.append(draw(_plain_conv(channels, channels, 3, 1, 1)))
        return _ResidualLayer(tuple(body)), channels
    # A 3x3/pad-1 and a 1x1/pad-0 conv with one stride give equal sizes for every input size.
    stride = draw(st.sampled_from([s for s in (1, 2) if _window_out(size, 3, s, 1) >= 2]))
    merge = draw(st.sampled_from(("add", "cat")))
    a = sizes.draw_features(draw)
    b = a if merge == "add" else sizes.draw_features(draw)
    left = (draw(_plain_conv(channels, a, 3, stride, 1)), _Norm(a, 2, draw(st.booleans())), draw(_activation()))
    right = (draw(_plain_conv(channels, b, 1, stride, 0)),)
    return _BranchLayer(left, right, merge, 1), a if merge == "add" else a + b


@st.composite
def _vector_layers(draw, width: int, count: int, sizes: _Sizes) -> tuple[list[_Layer], int]:
    layers = []
    for _ in range(count):
        layer, width = draw(_vector_layer(width, sizes, None))
        layers.append(layer)
    return layers, width


@st.composite
def _head(draw, width: int) -> _Linear:
    return _Linear(width, draw(st.integers(2, 8)), True, draw(st.booleans()))


def _min_spatial(layers: list[_Layer], upper: int) -> int:
    """Smallest input H/W for which every layer's output stays at least 2 pixels across."""
    for size in range(2, upper):
        current = size
        for layer in layers:
            current = layer.out_size(current)
            if current < 2:
                break
        else:
            return size
    return upper


@st.composite
def _mlp_spec(draw, max_layers: int, sizes: _Sizes, training: st.SearchStrategy[bool]) -> ModelSpec:
    width = sizes.draw_features(draw)
    batch = draw(st.integers(*sizes.batch))
    layers, out = draw(_vector_layers(width, draw(st.integers(1, max_layers)), sizes))
    layers.append(draw(_head(out)))
    seed = draw(st.integers(0, 2**32 - 1))
    return ModelSpec("mlp", tuple(layers), ((batch, width),), {"N": (0, 0)}, {"N": 2}, seed, draw(training))


_GLOBAL_POOLS = (
    _Fixed("AdaptiveAvgPool2d(1)"),
    _Fixed("F.adaptive_avg_pool2d(x, 1)", "F.adaptive_avg_pool2d", (1,)),
    _Fixed("x.mean((2, 3), keepdim=True)", "Tensor.mean", ((2, 3), True)),
)
_FLATTENS = (
    _Fixed("Flatten"),
    _Fixed("torch.flatten(x, 1)", "torch.flatten", (1,)),
    _Fixed("x.flatten(1)", "Tensor.flatten", (1,)),
)


@st.composite
def _cnn_spec(draw, max_layers: int, sizes: _Sizes, training: st.SearchStrategy[bool]) -> ModelSpec:
    """Convolutional layers from a conv stem, global pooling, flatten, optional dense layers, head."""
    count = draw(st.integers(1, max_layers))
    image_count = draw(st.integers(1, count))
    in_channels = draw(st.integers(1, min(4, sizes.features[1])))
    size = sizes.spatial[0]
    layers: list[_Layer] = [draw(_conv(in_channels, size, sizes))]
    channels, size = layers[0].out_channels, layers[0].out_size(size)
    for _ in range(image_count - 1):
        layer, channels = draw(_image_layer(channels, size, sizes))
        size = layer.out_size(size)
        layers.append(layer)
    min_spatial = _min_spatial(layers, sizes.spatial[0])
    layers += [draw(st.sampled_from(_GLOBAL_POOLS)), draw(st.sampled_from(_FLATTENS))]
    dense, width = draw(_vector_layers(channels, count - image_count, sizes))
    layers += [*dense, draw(_head(width))]
    batch = draw(st.integers(*sizes.batch))
    height, width = draw(st.integers(*sizes.spatial)), draw(st.integers(*sizes.spatial))
    return ModelSpec(
        "cnn", tuple(layers), ((batch, in_channels, height, width),),
        {"N": (0, 0), "H": (0, 2), "W": (0, 3)}, {"N": 2, "H": min_spatial, "W": min_spatial},
        draw(st.integers(0, 2**32 - 1)), draw(training),
    )


@st.composite
def _lstm_spec(draw, max_layers: int, sizes: _Sizes, training: st.SearchStrategy[bool]) -> ModelSpec:
    """Per-step layers around at least one LSTM, a reduction over time (last step or mean), head."""
    batch_first = draw(st.booleans())
    in_width = width = sizes.draw_features(draw)
    count = draw(st.integers(1, max_layers))
    lstm_at = draw(st.integers(0, count - 1))
    layers: list[_Layer] = []
    for index in range(count):
        if index == lstm_at:
            layer = draw(_lstm(width, sizes, batch_first))
            width = layer.hidden_size
        else:
            layer, width = draw(_vector_layer(width, sizes, batch_first))
        layers.append(layer)
    time_dim = 1 if batch_first else 0
    if draw(st.booleans()):
        index = (slice(None), -1) if batch_first else -1
        layers.append(_Fixed("x[:, -1]" if batch_first else "x[-1]", "getitem", (index,)))
    else:
        layers.append(_Fixed(f"x.mean({time_dim})", "Tensor.mean", (time_dim,)))
    layers.append(draw(_head(width)))
    batch, steps = draw(st.integers(*sizes.batch)), draw(st.integers(*sizes.seq_len))
    shape = (batch, steps, in_width) if batch_first else (steps, batch, in_width)
    dynamic = {"N": (0, 1 - time_dim), "T": (0, time_dim)}
    return ModelSpec(
        "lstm", tuple(layers), (shape,), dynamic, {"N": 2, "T": 2},
        draw(st.integers(0, 2**32 - 1)), draw(training),
    )


_SPECS = {"mlp": _mlp_spec, "cnn": _cnn_spec, "lstm": _lstm_spec}


def _size_range(name: str, value: Any, minimum: int, why: str) -> tuple[int, int]:
    if (
        not isinstance(value, (tuple, list)) or len(value) != 2
        or not all(isinstance(v, int) for v in value) or not minimum <= value[0] <= value[1]
    ):
        raise InputError(
            f"{name}={value!r} is not an inclusive range (low, high) with {minimum} <= low <= high",
            where="fxreduce.testing.strategies", fix=f"pass e.g. {name}=({minimum}, {minimum + 4}); {why}",
        )
    return value[0], value[1]


def model_specs(
    kinds: tuple[str, ...] = MODEL_FAMILIES,
    max_layers: int = 6,
    *,
    training: bool | st.SearchStrategy[bool] = False,
    batch: tuple[int, int] = (2, 4),
    spatial: tuple[int, int] = (8, 16),
    features: tuple[int, int] = (4, 32),
    seq_len: tuple[int, int] = (2, 8),
) -> st.SearchStrategy[ModelSpec]:
    """Strategy of unbuilt ``ModelSpec``s; ``models`` takes the same arguments and builds them."""
    unknown = [kind for kind in kinds if kind not in _SPECS]
    if unknown or not kinds:
        raise InputError(f"unknown model kinds {unknown or list(kinds)}", where="models(kinds=...)",
                         fix=f"choose from {list(MODEL_FAMILIES)}")
    if not isinstance(max_layers, int) or max_layers < 1:
        raise InputError(f"max_layers={max_layers!r} must be an int >= 1", where="models(max_layers=...)")
    specialised = "torch specialises sizes 0 and 1 when tracing with symbolic shapes"
    sizes = _Sizes(
        batch=_size_range("batch", batch, 2, specialised),
        spatial=_size_range("spatial", spatial, 2, specialised),
        features=_size_range("features", features, 1, "a layer needs at least one feature"),
        seq_len=_size_range("seq_len", seq_len, 2, specialised),
    )
    modes = training if isinstance(training, st.SearchStrategy) else st.just(bool(training))
    return st.one_of(*(_SPECS[kind](max_layers, sizes, modes) for kind in kinds))


def models(
    kinds: tuple[str, ...] = MODEL_FAMILIES,
    max_layers: int = 6,
    *,
    training: bool | st.SearchStrategy[bool] = False,
    batch: tuple[int, int] = (2, 4),
    spatial: tuple[int, int] = (8, 16),
    features: tuple[int, int] = (4, 32),
    seq_len: tuple[int, int] = (2, 8),
) -> st.SearchStrategy[GeneratedModel]:
    """Strategy of small, symbolically traceable models (``GeneratedModel``) with fitting inputs.

    ``kinds`` picks among "mlp", "cnn" and "lstm"; ``max_layers`` bounds the body (a residual block or
    a branch counts as one layer; pooling, flattening and the Linear head come on top). ``training``
    is the module's mode, or a strategy of modes. The size ranges are inclusive (low, high).
    """
    return model_specs(
        kinds, max_layers, training=training, batch=batch, spatial=spatial, features=features, seq_len=seq_len,
    ).map(ModelSpec.build)


def mlp_models(max_layers: int = 6, **options: Any) -> st.SearchStrategy[GeneratedModel]:
    """Models on ``(N, features)`` input: Linear, BatchNorm1d, activations, Dropout, residuals, branches."""
    return models(("mlp",), max_layers, **options)


def cnn_models(max_layers: int = 6, **options: Any) -> st.SearchStrategy[GeneratedModel]:
    """Models on ``(N, C, H, W)`` input ending in global pooling, so any H, W >= ``min_spatial`` fit."""
    return models(("cnn",), max_layers, **options)


def lstm_models(max_layers: int = 6, **options: Any) -> st.SearchStrategy[GeneratedModel]:
    """Models around ``nn.LSTM`` on ``(N, T, F)`` or ``(T, N, F)`` input, reduced over time before the head."""
    return models(("lstm",), max_layers, **options)


def linear_shapes(features: tuple[int, int] = (4, 32)) -> st.SearchStrategy[tuple[int, int]]:
    """``(in_features, out_features)`` pairs for a Linear, each drawn from ``features`` (inclusive)."""
    low, high = _size_range("features", features, 1, "a layer needs at least one feature")
    return st.tuples(st.integers(low, high), st.integers(low, high))
