"""Hypothesis strategies for random, symbolically traceable models with matching inputs.

A pass is only as trustworthy as the variety of graphs it was checked on, so these strategies build
the layers real models use (Linear, Conv2d, BatchNorm with non-trivial statistics, activations,
residual adds, branches, pooling, Dropout, LSTM) in both dialects a traced graph contains:
``call_module`` (``nn.Linear``) and ``call_function`` / ``call_method`` (``F.linear`` on the block's
own parameters, ``x.flatten(1)``). A model is a pure function of hypothesis's draws (its weights come
from a drawn seed), so a failing example replays and shrinks to a short layer list. What is drawn is
a spec (fxreduce.testing.specs) built from the modules in fxreduce.testing.model_blocks.

Usage::

    @given(models(kinds=("cnn",)))
    def test_my_pass_keeps_outputs(generated):
        ...  # generated.module, generated.example_inputs, generated.dynamic
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from fxreduce.errors import InputError

from .specs import (ACTIVATION_MODULES, ActivationSpec, BranchSpec, ConvSpec, DropoutSpec, FixedSpec, GeneratedModel,
                    LayerSpec, LinearSpec, LSTMSpec, ModelSpec, NormSpec, PoolSpec, ResidualSpec, window_out)

MODEL_FAMILIES = ("mlp", "cnn", "lstm")


@dataclass(frozen=True)
class _Sizes:
    batch: tuple[int, int]
    spatial: tuple[int, int]
    features: tuple[int, int]
    seq_len: tuple[int, int]

    def draw_features(self, draw) -> int:
        return draw(st.integers(*self.features))


@st.composite
def _activation(draw) -> ActivationSpec:
    return ActivationSpec(draw(st.sampled_from(tuple(ACTIVATION_MODULES))), draw(st.booleans()))


@st.composite
def _dropout(draw) -> DropoutSpec:
    return DropoutSpec(draw(st.sampled_from((0.1, 0.25, 0.5))), draw(st.booleans()))


@st.composite
def _linear(draw, in_features: int, out_features: int) -> LinearSpec:
    return LinearSpec(in_features, out_features, draw(st.booleans()), draw(st.booleans()))


@st.composite
def _vector_layer(draw, width: int, sizes: _Sizes, batch_first: bool | None) -> tuple[LayerSpec, int]:
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
        return NormSpec(width, 1, draw(st.booleans())), width
    if choice == "lstm":
        lstm = draw(_lstm(width, sizes, batch_first))
        return lstm, lstm.hidden_size
    if choice == "residual":
        body = [draw(_linear(width, width)), draw(_activation())]
        if draw(st.booleans()):
            body.append(draw(_linear(width, width)))
        return ResidualSpec(tuple(body)), width
    merge = draw(st.sampled_from(("add", "cat")))
    a = sizes.draw_features(draw)
    b = a if merge == "add" else sizes.draw_features(draw)
    left = (draw(_linear(width, a)), draw(_activation()))
    right = (draw(_linear(width, b)),)
    return BranchSpec(left, right, merge, -1), a if merge == "add" else a + b


@st.composite
def _lstm(draw, width: int, sizes: _Sizes, batch_first: bool) -> LSTMSpec:
    hidden = sizes.draw_features(draw)
    return LSTMSpec(width, hidden, draw(st.integers(1, 2)), batch_first, draw(st.booleans()))


# (kernel, stride, padding): "same" convs, strided convs, and a shrinking unpadded 3x3.
_CONV_GEOMETRIES = ((3, 1, 1), (1, 1, 0), (3, 2, 1), (1, 2, 0), (3, 1, 0))
_POOL_GEOMETRIES = ((2, 2, 0), (3, 2, 1))


@st.composite
def _plain_conv(draw, in_channels: int, out_channels: int, kernel: int, stride: int, padding: int) -> ConvSpec:
    return ConvSpec(in_channels, out_channels, kernel, stride, padding, 1, draw(st.booleans()), draw(st.booleans()))


@st.composite
def _conv(draw, channels: int, size: int, sizes: _Sizes) -> ConvSpec:
    """A conv, grouped now and then, that keeps a ``size``-pixel feature map at least 2x2."""
    kernel, stride, padding = draw(st.sampled_from([g for g in _CONV_GEOMETRIES if window_out(size, *g) >= 2]))
    grouped = sorted({g for g in (2, 4, channels) if g > 1 and channels % g == 0})
    groups = draw(st.sampled_from((1, 1, 1, *grouped)))
    low = max(1, sizes.features[0] // groups)
    out_channels = groups * draw(st.integers(low, max(low, sizes.features[1] // groups)))
    bias, functional = draw(st.booleans()), draw(st.booleans())
    return ConvSpec(channels, out_channels, kernel, stride, padding, groups, bias, functional)


@st.composite
def _image_layer(draw, channels: int, size: int, sizes: _Sizes) -> tuple[LayerSpec, int]:
    """A layer on ``(N, channels, size, size)`` that leaves every feature map at least 2x2."""
    pools = [g for g in _POOL_GEOMETRIES if window_out(size, *g) >= 2]
    choices = ["conv", "conv", "norm", "act", "act", "dropout", "residual", "branch"] + (["pool"] if pools else [])
    choice = draw(st.sampled_from(choices))
    if choice == "conv":
        conv = draw(_conv(channels, size, sizes))
        return conv, conv.out_channels
    if choice == "norm":
        return NormSpec(channels, 2, draw(st.booleans())), channels
    if choice == "act":
        return draw(_activation()), channels
    if choice == "dropout":
        return draw(_dropout()), channels
    if choice == "pool":
        kernel, stride, padding = draw(st.sampled_from(pools))
        mode = draw(st.sampled_from(("max", "avg")))
        return PoolSpec(mode, kernel, stride, padding, draw(st.booleans())), channels
    if choice == "residual":
        body = [
            draw(_plain_conv(channels, channels, 3, 1, 1)),
            NormSpec(channels, 2, draw(st.booleans())),
            draw(_activation()),
        ]
        if draw(st.booleans()):
            body.append(draw(_plain_conv(channels, channels, 3, 1, 1)))
        return ResidualSpec(tuple(body)), channels
    # A 3x3/pad-1 and a 1x1/pad-0 conv with one stride give equal sizes for every input size.
    stride = draw(st.sampled_from([s for s in (1, 2) if window_out(size, 3, s, 1) >= 2]))
    merge = draw(st.sampled_from(("add", "cat")))
    a = sizes.draw_features(draw)
    b = a if merge == "add" else sizes.draw_features(draw)
    left = (draw(_plain_conv(channels, a, 3, stride, 1)), NormSpec(a, 2, draw(st.booleans())), draw(_activation()))
    right = (draw(_plain_conv(channels, b, 1, stride, 0)),)
    return BranchSpec(left, right, merge, 1), a if merge == "add" else a + b


@st.composite
def _vector_layers(draw, width: int, count: int, sizes: _Sizes) -> tuple[list[LayerSpec], int]:
    layers = []
    for _ in range(count):
        layer, width = draw(_vector_layer(width, sizes, None))
        layers.append(layer)
    return layers, width


@st.composite
def _head(draw, width: int) -> LinearSpec:
    return LinearSpec(width, draw(st.integers(2, 8)), True, draw(st.booleans()))


def _min_spatial(layers: list[LayerSpec], upper: int) -> int:
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
    FixedSpec("AdaptiveAvgPool2d(1)"),
    FixedSpec("F.adaptive_avg_pool2d(x, 1)", "F.adaptive_avg_pool2d", (1,)),
    FixedSpec("x.mean((2, 3), keepdim=True)", "Tensor.mean", ((2, 3), True)),
)
_FLATTENS = (
    FixedSpec("Flatten"),
    FixedSpec("torch.flatten(x, 1)", "torch.flatten", (1,)),
    FixedSpec("x.flatten(1)", "Tensor.flatten", (1,)),
)


@st.composite
def _cnn_spec(draw, max_layers: int, sizes: _Sizes, training: st.SearchStrategy[bool]) -> ModelSpec:
    """Convolutional layers from a conv stem, global pooling, flatten, optional dense layers, head."""
    count = draw(st.integers(1, max_layers))
    image_count = draw(st.integers(1, count))
    in_channels = draw(st.integers(1, min(4, sizes.features[1])))
    size = sizes.spatial[0]
    layers: list[LayerSpec] = [draw(_conv(in_channels, size, sizes))]
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
    layers: list[LayerSpec] = []
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
        layers.append(FixedSpec("x[:, -1]" if batch_first else "x[-1]", "getitem", (index,)))
    else:
        layers.append(FixedSpec(f"x.mean({time_dim})", "Tensor.mean", (time_dim,)))
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
