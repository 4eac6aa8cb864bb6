"""Model references, example-input shapes and evaluation points: the words the CLI and saved files use.

A MODEL reference names a model without holding its code, so a saved rewrite can say what to rebuild:

    default | fxreduce:demo       the embedded demo CNN below
    torchvision:NAME              torchvision.models.get_model(NAME, weights=None), and no backbone
                                  weights either (nothing is downloaded)
    package.module:factory        an installed module's factory (any attribute path, e.g. mod:Class.build)
    path/to/file.py:factory       the user's own file; allowed on the command line, never from a saved file

Every model comes back in eval mode: the CLI rewrites and costs inference graphs (``cost --training``
counts a training step itself). An input shape such as "N=2,3,H,W" names the symbolic dims; a name
without a value gets an example size (2 on axis 0, ``default_size`` elsewhere).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import keyword
import os
import re
import sys
from dataclasses import dataclass

import torch
from torch import nn

from .errors import InputError
from .blocks import BasicBlock

DEMO_REFS = ("default", "fxreduce:demo")
DEFAULT_SIZE = 64
_TORCHVISION_SIZES = {"inception_v3": 299}
_DTYPES = {
    "float": torch.float32, "float32": torch.float32, "half": torch.float16, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "double": torch.float64, "float64": torch.float64,
    "long": torch.int64, "int64": torch.int64, "int": torch.int32, "int32": torch.int32, "bool": torch.bool,
}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REF_HELP = "write default, torchvision:NAME, package.module:factory or path/to/file.py:factory"


class DemoNet(nn.Module):
    """A compact ResNet-style classifier: stem, two residual stages, global pooling, dropout, linear head.

    Global average pooling makes it accept any input height and width, so N, H and W all stay symbolic.
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = BasicBlock(width, width, 1)
        self.stage2 = BasicBlock(width, 2 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(self.dropout(torch.flatten(self.pool(x), 1)))


def demo(num_classes: int = 10) -> DemoNet:
    """The demo model with fixed weights and BatchNorm statistics that look trained (not 0 and 1),
    so folding them changes every folded weight and a wrong fold shows in the outputs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DemoNet(num_classes)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                channels = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(channels))
                module.running_var.copy_(torch.rand(channels) + 0.5)
                with torch.no_grad():
                    module.weight.copy_(torch.rand(channels) + 0.5)
                    module.bias.copy_(0.1 * torch.randn(channels))
    return model.eval()


def ref_kind(ref: str) -> str:
    """ "demo", "torchvision", "module" or "path": which form a model reference takes."""
    if ref in DEMO_REFS:
        return "demo"
    if ref.startswith("torchvision:"):
        return "torchvision"
    location, colon, factory = ref.rpartition(":")
    if not colon or not location or not factory:
        raise InputError(f"malformed model reference {ref!r}", where="MODEL", fix=_REF_HELP)
    if location.endswith(".py") or "/" in location or os.sep in location:
        return "path"
    return "module"


def default_example_size(ref: str) -> int:
    """Example size of named non-batch dims: what the model was designed for, where that is known."""
    if ref_kind(ref) == "torchvision":
        return _TORCHVISION_SIZES.get(ref.partition(":")[2], 224)
    return DEFAULT_SIZE


def load_model(ref: str, *, allow_path: bool = True, seed: int | None = None) -> nn.Module:
    """The model a reference names, in eval mode.

    ``allow_path=False`` refuses file paths: a saved file must not make fxreduce import code from an
    arbitrary file. ``seed`` fixes random initialisation, so a rebuild matches the model it came from.
    """
    kind = ref_kind(ref)
    if kind == "path" and not allow_path:
        raise InputError(f"model reference {ref!r} is a file path, which is not allowed here", where="MODEL",
                         fix="make the model importable (an installed package) and use package.module:factory")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if kind == "demo":
            model = demo()
        elif kind == "torchvision":
            model = _torchvision(ref.partition(":")[2])
        else:
            location, _, factory = ref.rpartition(":")
            module = _import_path(location) if kind == "path" else _import_module(location)
            model = _call_factory(module, factory, ref)
    return model.eval()


def _torchvision(name: str) -> nn.Module:
    try:
        import torchvision
    except ImportError:
        raise InputError("torchvision is not installed", where=f"torchvision:{name}",
                         fix="pip install torchvision") from None
    available = torchvision.models.list_models()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=1, cutoff=0.5)
        fix = f"did you mean torchvision:{close[0]}?" if close else "see torchvision.models.list_models()"
        raise InputError(f"unknown torchvision model {name!r}", where=f"torchvision:{name}", fix=fix)
    # Detection and segmentation builders also take backbone weights, downloaded by default: none either.
    builder = torchvision.models.get_model_builder(name)
    extra = {"weights_backbone": None} if "weights_backbone" in inspect.signature(builder).parameters else {}
    return torchvision.models.get_model(name, weights=None, **extra)


def import_code(location: str, where: str = "MODEL"):
    """A module by dotted name (``my_package.passes``), or a .py file by path (``./lowrank_pass.py``).

    The CLI's ``--import`` loads passes this way; importing their file registers them.
    """
    if location.endswith(".py") or "/" in location or os.sep in location:
        return _import_path(location, where)
    return _import_module(location, where)


def _import_module(name: str, where: str = "MODEL"):
    if not all(_NAME.fullmatch(part) and not keyword.iskeyword(part) for part in name.split(".")):
        raise InputError(f"{name!r} is not a module name", where=where, fix=_REF_HELP)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        raise InputError(f"cannot import module {name!r}: {error}", where=where,
                         fix="install the package that provides it, or check the spelling") from None


def _import_path(location: str, where: str = "MODEL"):
    """The module of a .py file, executed once however often it is named (its passes register once)."""
    path = os.path.abspath(location)
    if not os.path.isfile(path):
        raise InputError(f"no such file {location!r}", where=where, fix="check the path of the .py file")
    name = "fxreduce_user_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == path:
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _call_factory(module, factory: str, ref: str) -> nn.Module:
    target: object = module
    for part in factory.split("."):
        if not hasattr(target, part):
            public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            close = difflib.get_close_matches(factory, public, n=1, cutoff=0.5)
            raise InputError(f"{module.__name__} has no attribute {factory!r}", where=ref,
                             fix=f"did you mean {close[0]!r}?" if close else "name a function or class in it")
        target = getattr(target, part)
    if not callable(target):
        raise InputError(f"{factory!r} in {module.__name__} is not callable", where=ref,
                         fix="name a function or class that builds the model")
    required = _required_parameters(target)
    if required:
        raise InputError(f"{factory} needs arguments ({', '.join(required)})", where=ref,
                         fix="name a factory that builds the model without arguments (wrap the call in a function)")
    model = target()
    if not isinstance(model, nn.Module):
        raise InputError(f"{factory}() returned {type(model).__name__}, not a torch.nn.Module", where=ref,
                         fix="the factory must build and return the model")
    return model


def _required_parameters(function) -> list[str]:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


@dataclass(frozen=True)
class InputShape:
    """Example inputs and the named dims of an input-shape text.

    ``dims`` maps a name to (input index, axis), as fxreduce.trace takes it; ``text`` restates the
    shape with every named dim's example size, so a saved file rebuilds the same inputs.
    """

    inputs: tuple[torch.Tensor, ...]
    dims: dict[str, tuple[int, int]]
    text: str

    @classmethod
    def of(cls, inputs: tuple[torch.Tensor, ...], dims: dict[str, tuple[int, int]]) -> "InputShape":
        """The shape of existing example inputs (e.g. a traced graph's), written out as text."""
        names = {(index, axis % inputs[index].dim()): name for name, (index, axis) in dims.items()}
        parts = []
        for index, tensor in enumerate(inputs):
            sizes = [f"{names[(index, axis)]}={size}" if (index, axis) in names else str(size)
                     for axis, size in enumerate(tensor.shape)]
            suffix = "" if tensor.dtype == torch.float32 else f":{str(tensor.dtype).removeprefix('torch.')}"
            parts.append(",".join(sizes) + suffix)
        return cls(tuple(inputs), dict(dims), ";".join(parts))

    def size(self, name: str) -> int:
        index, axis = self.dims[name]
        return int(self.inputs[index].shape[axis])

    def default_at(self) -> dict[str, int]:
        """Batch-like dims (axis 0) at 1, the others at their example size."""
        return {name: 1 if axis == 0 else self.size(name) for name, (_, axis) in self.dims.items()}

    def parse_at(self, text: str | None) -> dict[str, int]:
        """ "N=1,H=224" -> values of named dims; dims not given keep their default."""
        values = self.default_at()
        for item in filter(None, (part.strip() for part in (text or "").split(","))):
            name, equals, value = item.partition("=")
            name = name.strip()
            if not equals or not value.strip().isdigit() or int(value) < 1:
                raise InputError(f"cannot read {item!r} in --at", where=f"--at {text}",
                                 fix="write NAME=VALUE pairs with positive integers, e.g. N=1,H=224,W=224")
            if name not in self.dims:
                named = ", ".join(self.dims) or "none"
                raise InputError(f"dim {name!r} is not named in the input shape {self.text!r}", where=f"--at {text}",
                                 fix=f"the named dims are: {named}")
            values[name] = int(value)
        return values


def parse_input_shape(text: str, *, default_size: int = DEFAULT_SIZE, seed: int = 0) -> InputShape:
    """ "N,3,H=224,W=224;N,T:long" -> seeded example inputs and their named dims.

    An integer is a fixed size, a name a symbolic dim; inputs are separated by ';' and may end in a
    dtype (":long" for token ids, drawn from [0, 2) so any embedding accepts them). Named dims need
    an example size >= 2: torch specialises sizes 0 and 1.
    """
    generator = torch.Generator().manual_seed(seed)
    inputs, dims = [], {}
    for index, piece in enumerate(part.strip() for part in text.split(";")):
        body, _, dtype_name = piece.partition(":")
        dtype_name = dtype_name.strip()
        if dtype_name and dtype_name not in _DTYPES:
            raise InputError(f"unknown dtype {dtype_name!r} in input shape {text!r}", where="--input-shape",
                             fix=f"use one of: {', '.join(_DTYPES)}")
        shape = []
        for axis, item in enumerate(part.strip() for part in body.split(",")):
            name, equals, value = item.partition("=")
            name, value = name.strip(), value.strip()
            if name.isdigit() and not equals:
                shape.append(int(name))
                continue
            if not _NAME.fullmatch(name) or (equals and not value.isdigit()):
                raise InputError(f"cannot read {item!r} in input shape {text!r}", where="--input-shape",
                                 fix="write sizes as integers or NAME / NAME=SIZE, e.g. N,3,H=224,W=224")
            if name in dims:
                raise InputError(f"dim {name!r} names two axes of the input shape {text!r}", where="--input-shape",
                                 fix=f"give each axis its own name (e.g. {name}2); when the model ties them, "
                                     f"the cost shows them equal")
            size = int(value) if equals else (2 if axis == 0 else default_size)
            if size < 2:
                raise InputError(f"dim {name} has example size {size}; torch specialises sizes 0 and 1",
                                 where="--input-shape", fix=f"trace with {name}=2 or more and evaluate at "
                                                            f"{name}={size} with --at")
            dims[name] = (index, axis)
            shape.append(size)
        inputs.append(_example(shape, _DTYPES[dtype_name or "float"], generator))
    return InputShape.of(tuple(inputs), dims)


def _example(shape: list[int], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(0, 2, shape, generator=generator).to(dtype)
