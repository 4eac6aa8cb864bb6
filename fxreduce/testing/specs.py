"""Layer and model specs: what the strategies draw, what builds a module from it, what a failure prints.

A spec is a frozen value whose ``str`` reads like the layer list it builds, so a falsifying example is
readable and shrinks; ``ModelSpec.build`` makes the same module and inputs from it every time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from fxreduce.errors import InputError

from .model_blocks import (Branch, Call, FunctionalConv2d, FunctionalDropout, FunctionalLinear, GeneratedNet,
                           LSTMSequence, Residual, randomise_norm)

ACTIVATION_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}
_ACTIVATION_FUNCTIONS = {
    "relu": "torch.relu",
    "gelu": "F.gelu",
    "tanh": "torch.tanh",
    "sigmoid": "torch.sigmoid",
    "silu": "F.silu",
}


class LayerSpec(ABC):
    """One drawn layer: it builds its module and says how it changes a spatial size."""

    @abstractmethod
    def build(self) -> nn.Module: ...

    def out_size(self, size: int) -> int:
        return size

    def __repr__(self):
        return str(self)


def window_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output size of a conv or pool window along one spatial axis."""
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True, repr=False)
class LinearSpec(LayerSpec):
    in_features: int
    out_features: int
    bias: bool = True
    functional: bool = False

    def build(self):
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias)
        return FunctionalLinear(linear) if self.functional else linear

    def __str__(self):
        name = "F.linear" if self.functional else "Linear"
        return f"{name}({self.in_features}->{self.out_features}{'' if self.bias else ', bias=False'})"


@dataclass(frozen=True, repr=False)
class ConvSpec(LayerSpec):
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
        return FunctionalConv2d(conv) if self.functional else conv

    def out_size(self, size):
        return window_out(size, self.kernel, self.stride, self.padding)

    def __str__(self):
        name = "F.conv2d" if self.functional else "Conv2d"
        extra = (f", g{self.groups}" if self.groups > 1 else "") + ("" if self.bias else ", bias=False")
        return (
            f"{name}({self.in_channels}->{self.out_channels}, k{self.kernel}, s{self.stride}, "
            f"p{self.padding}{extra})"
        )


@dataclass(frozen=True, repr=False)
class NormSpec(LayerSpec):
    features: int
    dims: int
    affine: bool = True

    def build(self):
        norm = (nn.BatchNorm1d if self.dims == 1 else nn.BatchNorm2d)(self.features, affine=self.affine)
        randomise_norm(norm)
        return norm

    def __str__(self):
        return f"BatchNorm{self.dims}d({self.features}{'' if self.affine else ', affine=False'})"


@dataclass(frozen=True, repr=False)
class ActivationSpec(LayerSpec):
    name: str
    functional: bool = False

    def build(self):
        if self.functional:
            return Call(_ACTIVATION_FUNCTIONS[self.name])
        return ACTIVATION_MODULES[self.name]()

    def __str__(self):
        return _ACTIVATION_FUNCTIONS[self.name] if self.functional else ACTIVATION_MODULES[self.name].__name__


@dataclass(frozen=True, repr=False)
class DropoutSpec(LayerSpec):
    p: float
    functional: bool = False

    def build(self):
        return FunctionalDropout(self.p) if self.functional else nn.Dropout(self.p)

    def __str__(self):
        return f"{'F.dropout' if self.functional else 'Dropout'}({self.p})"


@dataclass(frozen=True, repr=False)
class PoolSpec(LayerSpec):
    mode: str
    kernel: int
    stride: int
    padding: int
    functional: bool = False

    def build(self):
        if self.functional:
            return Call(f"F.{self.mode}_pool2d", self.kernel, self.stride, self.padding)
        module = nn.MaxPool2d if self.mode == "max" else nn.AvgPool2d
        return module(self.kernel, self.stride, self.padding)

    def out_size(self, size):
        return window_out(size, self.kernel, self.stride, self.padding)

    def __str__(self):
        name = f"F.{self.mode}_pool2d" if self.functional else f"{self.mode.capitalize()}Pool2d"
        return f"{name}(k{self.kernel}, s{self.stride}, p{self.padding})"


_FIXED_MODULES = {"AdaptiveAvgPool2d(1)": lambda: nn.AdaptiveAvgPool2d(1), "Flatten": nn.Flatten}


@dataclass(frozen=True, repr=False)
class FixedSpec(LayerSpec):
    """A parameter-free reshaping step (global pooling, flattening, picking a time step)."""

    label: str
    op: str | None = None
    args: tuple = ()

    def build(self):
        if self.op is None:
            return _FIXED_MODULES[self.label]()
        return Call(self.op, *self.args)

    def __str__(self):
        return self.label


@dataclass(frozen=True, repr=False)
class LSTMSpec(LayerSpec):
    input_size: int
    hidden_size: int
    num_layers: int
    batch_first: bool
    bias: bool = True

    def build(self):
        return LSTMSequence(nn.LSTM(self.input_size, self.hidden_size, self.num_layers, self.bias, self.batch_first))

    def __str__(self):
        return (
            f"LSTM({self.input_size}->{self.hidden_size}, layers={self.num_layers}, "
            f"batch_first={self.batch_first}{'' if self.bias else ', bias=False'})"
        )


def _sequence_out(layers: tuple[LayerSpec, ...], size: int) -> int:
    for layer in layers:
        size = layer.out_size(size)
    return size


@dataclass(frozen=True, repr=False)
class ResidualSpec(LayerSpec):
    body: tuple[LayerSpec, ...]

    def build(self):
        return Residual(nn.Sequential(*(layer.build() for layer in self.body)))

    def __str__(self):
        return f"Residual[{', '.join(map(str, self.body))}]"


@dataclass(frozen=True, repr=False)
class BranchSpec(LayerSpec):
    left: tuple[LayerSpec, ...]
    right: tuple[LayerSpec, ...]
    merge: str
    dim: int

    def build(self):
        left = nn.Sequential(*(layer.build() for layer in self.left))
        right = nn.Sequential(*(layer.build() for layer in self.right))
        return Branch(left, right, self.merge, self.dim)

    def out_size(self, size):
        return _sequence_out(self.left, size)

    def __str__(self):
        merge = "add" if self.merge == "add" else f"cat(dim={self.dim})"
        return f"Branch[{', '.join(map(str, self.left))} | {', '.join(map(str, self.right))} -> {merge}]"


@dataclass(frozen=True, repr=False)
class ModelSpec:
    """Everything drawn for one model; ``build()`` turns it into the same module and inputs every time.

    ``dynamic`` maps dim names to ``(input index, dim index)``; ``min_sizes`` gives the smallest size
    each of those dims may take (2 for batch and time, since torch specialises sizes 0 and 1 when
    tracing with symbolic shapes; for H and W the size that keeps every feature map at least 2x2).
    """

    kind: str
    layers: tuple[LayerSpec, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    dynamic: dict[str, tuple[int, int]]
    min_sizes: dict[str, int]
    seed: int
    training: bool = False

    def build(self) -> GeneratedModel:
        """Build the module from ``seed`` without disturbing torch's global RNG state."""
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed)
            module = GeneratedNet([layer.build() for layer in self.layers])
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
