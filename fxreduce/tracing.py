"""Capture a model as a torch.fx GraphModule with symbolic shapes and costs on every node.

torch.fx symbolic tracing first (torch.nn modules and fxreduce's runtime modules stay leaves); where it
fails, torch.export (its graph holds aten-level ops). Then one symbolic fake-tensor run annotates
every node (cost_models.propagation). The user's model is deep-copied first and never changed.
"""

from __future__ import annotations

import copy
import os
import traceback
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx as fx

from .cost_models.propagation import InputSpec, propagate
from .errors import InputError, TraceError
from .graph import LeafTracer

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(__file__)


def _as_inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise InputError(f"example_inputs must be a tensor or a tuple of inputs, got {type(example_inputs).__name__}",
                     where="fxreduce.trace", fix="pass example_inputs=(x,)")


def _user_frame(error: BaseException) -> str:
    """The innermost frame of the failure that is the user's code (not torch's, not ours)."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        if not frame.filename.startswith((_TORCH_DIR, _OWN_DIR)) and "<" not in frame.filename:
            return f"{frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
    return "an unknown source line"


def _symbolic_trace(model: torch.nn.Module, leaf_modules: Iterable[type], concrete_args: Mapping | None):
    tracer = LeafTracer(leaf_modules)
    graph = tracer.trace(model, concrete_args=dict(concrete_args) if concrete_args else None)
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


def _export(model: torch.nn.Module, inputs: tuple, dims: Mapping[str, tuple[int, int]]):
    axes: dict[int, dict[int, Any]] = {}
    for index, axis in dims.values():
        axes.setdefault(index, {})[axis % inputs[index].dim()] = torch.export.Dim.AUTO
    dynamic_shapes = tuple(axes.get(i) if isinstance(x, torch.Tensor) else None for i, x in enumerate(inputs))
    program = torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes if axes else None, strict=False)
    return program.module()


def _check_runs(model: torch.nn.Module, inputs: tuple) -> None:
    """Tell bad example inputs apart from an untraceable model: run the model itself once."""
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as error:
        shapes = ", ".join(str(tuple(x.shape)) if isinstance(x, torch.Tensor) else repr(x) for x in inputs)
        raise InputError(f"the model does not run on example inputs of shape {shapes}: "
                         f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                         where=_user_frame(error),
                         fix="pass example inputs of the shape and dtype the model expects") from error


def trace(
    model: torch.nn.Module,
    example_inputs: Any,
    dynamic: Mapping[str, tuple[int, int]] | None = None,
    *,
    method: str = "auto",
    leaf_modules: Sequence[type] = (),
    concrete_args: Mapping[str, Any] | None = None,
    time_limit: float | None = 60.0,
) -> fx.GraphModule:
    """Capture ``model`` as a GraphModule whose nodes carry symbolic shapes and costs.

    ``dynamic`` names the dims that stay symbolic, e.g. {"N": (0, 0), "H": (0, 2), "W": (0, 3)}: name
    -> (input index, axis). ``method`` is "auto" (fx, then torch.export), "fx" or "export". Symbolic
    propagation of a dim that fails or exceeds ``time_limit`` seconds falls back to its example size;
    ``graph_module.meta["fxreduce"].specialised`` says which and why.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}", where="fxreduce.trace",
                         fix="pass the model object (an nn.Module instance), not its class or output")
    if method not in ("auto", "fx", "export"):
        raise InputError(f"unknown capture method {method!r}", where="fxreduce.trace",
                         fix='use "auto", "fx" or "export"')
    inputs = _as_inputs(example_inputs)
    spec = InputSpec(inputs, dict(dynamic or {}))
    spec.validate()
    if isinstance(model, fx.GraphModule) and method == "auto":
        gm, used = copy.deepcopy(model), "symbolic_trace"
    else:
        model = copy.deepcopy(model)
        gm, used = _capture(model, inputs, spec, method, leaf_modules, concrete_args)
    propagate(gm, spec, method=used, source=type(model).__name__, time_limit=time_limit)
    return gm


def _capture(model, inputs, spec, method, leaf_modules, concrete_args) -> tuple[fx.GraphModule, str]:
    errors: list[tuple[str, BaseException]] = []
    if method in ("auto", "fx"):
        try:
            return _symbolic_trace(model, leaf_modules, concrete_args), "symbolic_trace"
        except Exception as error:
            errors.append(("torch.fx.symbolic_trace", error))
    if method in ("auto", "export"):
        try:
            return _export(model, inputs, spec.dims), "torch.export"
        except Exception as error:
            errors.append(("torch.export", error))
    _check_runs(model, inputs)
    first = errors[0][1]
    tried = "; ".join(f"{how}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}" for how, e in errors)
    raise TraceError(f"cannot capture {type(model).__name__} as a graph ({tried})", where=_user_frame(first),
                     fix="mark the offending submodule as a leaf (leaf_modules=[...]), fix non-tensor arguments "
                         "with concrete_args={...}, or try method='export'") from first
