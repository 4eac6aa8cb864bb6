"""Capture a model as a torch.fx GraphModule with symbolic shapes and costs on every node.

torch.fx symbolic tracing first (torch.nn modules and fxreduce's runtime modules stay leaves); where it
fails, torch.export (its graph holds aten-level ops). Then one symbolic fake-tensor run annotates
every node (cost_models.propagation). The user's model is deep-copied first and never changed.

Inputs come positionally or by keyword (a dict; the graph then takes them positionally in that order);
a named dim may tie axes of several inputs. Transformers models go to torch.export first, with their
cache classes made exportable (fxreduce.hf). Inputs a forward needs but the examples lack, and cache
objects passed as inputs, are InputErrors before any capture.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx as fx

from . import hf
from .copying import copy_model, with_history
from .cost_models.propagation import InputSpec, propagate
from .errors import InputError, TraceError
from .graph import unique_name
from .text import error_summary

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(__file__)


@dataclass
class _Inputs:
    """The example inputs as positional values, with their keyword names (where given by keyword) and the
    non-tensor keyword values that become constants of the captured call."""

    values: tuple
    names: tuple[str, ...] = ()
    constants: dict[str, Any] = field(default_factory=dict)


def _cache_error(where: str, value: Any) -> InputError:
    return InputError(f"a {type(value).__name__} (a transformers cache) is passed as input {where}; fxreduce "
                      f"captures the forward over a whole sequence, which builds its own cache",
                      where="example_inputs",
                      fix="leave past_key_values out of the example inputs (the cache the model returns is part "
                          "of the graph's outputs)")


def _as_inputs(example_inputs: Any) -> _Inputs:
    if isinstance(example_inputs, torch.Tensor):
        return _Inputs((example_inputs,))
    if isinstance(example_inputs, (tuple, list)):
        for index, value in enumerate(example_inputs):
            if hf.is_cache(value):
                raise _cache_error(str(index), value)
        return _Inputs(tuple(example_inputs))
    if isinstance(example_inputs, Mapping):
        inputs = _Inputs(())
        values = []
        for name, value in example_inputs.items():
            if not isinstance(name, str):
                raise InputError(f"keyword inputs need str names, got {name!r}", where="fxreduce.trace",
                                 fix='e.g. example_inputs={"input_ids": ids, "attention_mask": mask}')
            if hf.is_cache(value):
                raise _cache_error(repr(name), value)
            if isinstance(value, torch.Tensor):
                inputs.names += (name,)
                values.append(value)
            else:
                inputs.constants[name] = value
        inputs.values = tuple(values)
        return inputs
    raise InputError(f"example_inputs must be a tensor, a tuple of inputs or a dict of keyword inputs, got "
                     f"{type(example_inputs).__name__}", where="fxreduce.trace",
                     fix='pass example_inputs=(x,) or {"input_ids": ids}')


def _positions(name: str, where: Any, inputs: _Inputs) -> list[tuple[int, int]]:
    """(input, axis) pairs of one dim: one pair, or several that the dim ties; inputs by index or keyword."""
    many = isinstance(where, list) or (isinstance(where, tuple) and where and isinstance(where[0], (tuple, list)))
    positions = []
    for position in (where if many else [where]):
        if not (isinstance(position, (tuple, list)) and len(position) == 2):
            raise InputError(f"dim {name!r} must map to (input, axis) or a list of them, got {position!r}",
                             where="dynamic", fix='e.g. dynamic={"N": (0, 0)} or {"T": ("input_ids", 1)}')
        index, axis = position
        if isinstance(index, str):
            if index not in inputs.names:
                known = ", ".join(inputs.names) or "none (the inputs are positional)"
                raise InputError(f"dim {name!r} names the input {index!r}, which is not a tensor keyword input",
                                 where="dynamic", fix=f"the keyword inputs are: {known}")
            index = inputs.names.index(index)
        positions.append((index, axis))
    return positions


def _named_dims(dynamic: Mapping[str, Any] | None, inputs: _Inputs, model: torch.nn.Module):
    """dims (name -> first position) and tied axes (name -> the other positions)."""
    dims, tied = {}, {}
    for name, where in (dynamic or {}).items():
        positions = _positions(name, where, inputs)
        dims[name] = positions[0]
        if positions[1:]:
            tied[name] = tuple(positions[1:])
    if hf.is_transformers_model(model) and "input_ids" in inputs.names:
        ids = inputs.names.index("input_ids")
        named = {position: name for name, position in dims.items()} | \
                {position: name for name, positions in tied.items() for position in positions}
        on_ids = {axis % inputs.values[ids].dim(): name for (index, axis), name in named.items() if index == ids}
        for other in hf.SHAPED_LIKE_IDS:
            if other not in inputs.names:
                continue
            index = inputs.names.index(other)
            if (inputs.values[index].shape != inputs.values[ids].shape
                    or any(position[0] == index for position in named)):
                continue
            for axis, name in on_ids.items():
                if name in dims:
                    tied[name] = tuple(tied.get(name, ())) + ((index, axis),)
    return dims, tied


def _check_arguments(model: torch.nn.Module, inputs: _Inputs, concrete_args: Mapping | None) -> None:
    """A forward that needs arguments the example inputs lack, or gets ones it does not take: say which."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    parameters = list(signature.parameters.values())
    kinds = inspect.Parameter
    positional = [p for p in parameters if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    takes_varargs = any(p.kind is kinds.VAR_POSITIONAL for p in parameters)
    takes_varkw = any(p.kind is kinds.VAR_KEYWORD for p in parameters)
    given = set(inputs.names) | set(inputs.constants) | set(concrete_args or {})
    label = f"{type(model).__name__}.forward"
    where = f"{label}({', '.join(p.name for p in parameters)})"
    if inputs.names or inputs.constants:
        known = [p.name for p in parameters if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)]
        for name in given:
            if name in known:
                continue
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.8 if takes_varkw else 0.6)
            if takes_varkw and not close:
                continue  # forward(**kwargs) may take it
            raise InputError(f"{label} takes no argument {name!r}" + (" (it would land in **kwargs)" if takes_varkw
                                                                      else ""), where=where,
                             fix=f"did you mean {close[0]!r}?" if close else f"its arguments are: {', '.join(known)}")
        missing = [p.name for p in parameters if p.default is p.empty and p.name not in given
                   and p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)]
    else:
        if len(inputs.values) > len(positional) and not takes_varargs:
            raise InputError(f"{label} takes {len(positional)} input(s), but {len(inputs.values)} example inputs "
                             f"were given", where=where, fix="pass one example input per argument")
        missing = [p.name for p in positional[len(inputs.values):] if p.default is p.empty and p.name not in given]
        missing += [p.name for p in parameters if p.kind is kinds.KEYWORD_ONLY and p.default is p.empty
                    and p.name not in given]
    if missing:
        raise InputError(f"{label} needs argument(s) {', '.join(missing)} that the example inputs lack",
                         where=where,
                         fix="pass an example of every input forward needs, positionally (example_inputs=(x, "
                             f"{missing[0]})) or by keyword (example_inputs={{..., {missing[0]!r}: ...}})")


def _user_frame(error: BaseException) -> str:
    """The innermost frame of the failure that is the user's code (not torch's, not ours)."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        if not frame.filename.startswith((_TORCH_DIR, _OWN_DIR)) and "<" not in frame.filename:
            return f"{frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
    return "an unknown source line"


class LeafTracer(fx.Tracer):
    """fx Tracer that keeps torch.nn modules, fxreduce runtime modules and user-named types as leaves."""

    def __init__(self, leaf_modules: Iterable[type] = ()):
        super().__init__()
        self.extra_leaves = tuple(leaf_modules)

    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
        return (
            isinstance(module, self.extra_leaves)
            or type(module).__module__.startswith("fxreduce.modules")
            or super().is_leaf_module(module, qualified_name)
        )


def _symbolic_trace(model: torch.nn.Module, leaf_modules: Iterable[type], concrete_args: Mapping | None,
                    notes: list[str] | None = None) -> fx.GraphModule:
    """fx's symbolic trace, with functional dropout that follows the module's mode kept so (see
    :func:`_mode_following_dropout`); ``notes`` says which calls became modules."""
    def graph_in(training: bool | None) -> fx.Graph:
        was = model.training
        if training is not None:
            model.train(training)
        try:
            return LeafTracer(leaf_modules).trace(model, concrete_args=dict(concrete_args) if concrete_args else None)
        finally:
            model.train(was)

    graph = graph_in(None)
    gm = fx.GraphModule(model, graph, model.__class__.__name__)
    if any(_dropout_flag(node) is not None for node in graph.nodes):
        converted = _mode_following_dropout(gm, graph_in(not model.training))
        if converted and notes is not None:
            notes.append(f"functional dropout whose training flag is the module's mode ({', '.join(converted)}) "
                         f"became nn.Dropout modules, so the graph follows train() / eval() as the model did")
    return gm


# Functional dropout and the module that applies it by the module's mode.
_DROPOUT_MODULES = {
    torch.nn.functional.dropout: torch.nn.Dropout,
    torch.nn.functional.dropout1d: torch.nn.Dropout1d,
    torch.nn.functional.dropout2d: torch.nn.Dropout2d,
    torch.nn.functional.dropout3d: torch.nn.Dropout3d,
    torch.nn.functional.alpha_dropout: torch.nn.AlphaDropout,
    torch.nn.functional.feature_alpha_dropout: torch.nn.FeatureAlphaDropout,
}


def _dropout_arguments(node: fx.Node) -> dict[str, Any] | None:
    if node.op != "call_function" or node.target not in _DROPOUT_MODULES:
        return None
    bound = fx.operator_schemas.normalize_function(node.target, node.args, node.kwargs,
                                                   normalize_to_only_use_kwargs=True)
    return None if bound is None else bound.kwargs


def _dropout_flag(node: fx.Node) -> bool | None:
    """The constant ``training`` argument of a functional dropout node, None for other nodes."""
    arguments = _dropout_arguments(node)
    training = None if arguments is None else arguments.get("training", True)
    return training if isinstance(training, bool) else None


def _mode_following_dropout(gm: fx.GraphModule, other_mode: fx.Graph) -> list[str]:
    """fx records ``F.dropout(x, p, self.training)`` with the flag of the mode it traced in, so the graph kept
    dropping in eval (or never dropped in training). Where the trace in the other mode ``other_mode`` is the
    same graph but for the flags of dropout calls, each call whose flag differs follows the mode: it becomes
    the nn.Dropout module of its kind. Returns the names of the calls replaced."""
    ours, theirs = list(gm.graph.nodes), list(other_mode.nodes)
    if len(ours) != len(theirs) or any((a.op, a.target, a.name) != (b.op, b.target, b.name)
                                       for a, b in zip(ours, theirs)):
        return []
    flags = [(node, _dropout_flag(node), _dropout_flag(other)) for node, other in zip(ours, theirs)]
    following = [node for node, flag, other in flags if flag is not None and other is not None and flag != other]
    if any(not isinstance(_dropout_arguments(node)["p"], (int, float)) for node in following):
        return []
    for node in following:
        arguments = _dropout_arguments(node)
        name = unique_name(gm, node.name)
        gm.add_submodule(name, _DROPOUT_MODULES[node.target](arguments["p"], arguments.get("inplace", False)))
        with gm.graph.inserting_before(node):
            module_call = gm.graph.call_module(name, (arguments["input"],))
        module_call.meta = dict(node.meta)
        node.replace_all_uses_with(module_call)
        gm.graph.erase_node(node)
    gm.recompile()
    return [node.name for node in following]


def dynamic_shapes(spec: InputSpec) -> tuple | None:
    """torch.export's dynamic_shapes for the named dims (and their tied axes) of ``spec``."""
    axes: dict[int, dict[int, Any]] = {}
    for name in spec.dims:
        for index, axis in spec.positions(name):
            axes.setdefault(index, {})[axis] = torch.export.Dim.AUTO
    if not axes:
        return None
    return tuple(axes.get(i) if isinstance(x, torch.Tensor) else None for i, x in enumerate(spec.example_inputs))


def _export(model: torch.nn.Module, spec: InputSpec):
    program = torch.export.export(model, tuple(spec.example_inputs), dynamic_shapes=dynamic_shapes(spec), strict=False)
    return program.module()


def _check_runs(model: torch.nn.Module, inputs: tuple, names: Sequence[str] = ()) -> None:
    """Tell bad example inputs apart from an untraceable model: run the model itself once."""
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as error:
        shapes = [str(tuple(x.shape)) if isinstance(x, torch.Tensor) else repr(x) for x in inputs]
        shapes = ", ".join(f"{name} {shape}" for name, shape in zip(names, shapes)) if names else ", ".join(shapes)
        raise InputError(f"the model does not run on example inputs of shape {shapes}: "
                         f"{error_summary(error)}",
                         where=_user_frame(error),
                         fix="pass example inputs of the shape and dtype the model expects") from error


def trace(
    model: torch.nn.Module,
    example_inputs: Any,
    dynamic: Mapping[str, Any] | None = None,
    *,
    method: str = "auto",
    leaf_modules: Sequence[type] = (),
    concrete_args: Mapping[str, Any] | None = None,
    time_limit: float | None = 60.0,
) -> fx.GraphModule:
    """Capture ``model`` as a GraphModule whose nodes carry symbolic shapes and costs.

    ``example_inputs`` is a tensor, a tuple of positional inputs, or a dict of keyword inputs (e.g.
    {"input_ids": ids, "attention_mask": mask}; the graph then takes them positionally in that order, and
    non-tensor values are constants of the call). ``dynamic`` names the dims that stay symbolic, e.g.
    {"N": (0, 0), "H": (0, 2), "W": (0, 3)}: name -> (input, axis), the input by index or keyword name;
    a list of positions ties axes that are always equal ({"T": [("input_ids", 1), ("attention_mask", 1)]}).
    ``method`` is "auto" (fx, then torch.export; transformers models torch.export first), "fx" or "export".
    Symbolic propagation of a dim that fails or exceeds ``time_limit`` seconds falls back to its example
    size; ``graph_info(graph_module).specialised`` says which and why, ``.notes`` what capture left
    out. Transformers models: see fxreduce.hf.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}", where="fxreduce.trace",
                         fix="pass the model object (an nn.Module instance), not its class or output")
    if method not in ("auto", "fx", "export"):
        raise InputError(f"unknown capture method {method!r}", where="fxreduce.trace",
                         fix='use "auto", "fx" or "export"')
    inputs = _as_inputs(example_inputs)
    _check_arguments(model, inputs, concrete_args)
    if hf.is_transformers_model(model) and not inputs.names:
        inputs.names = _parameter_names(model, len(inputs.values))
    dims, tied = _named_dims(dynamic, inputs, model)
    spec = InputSpec(inputs.values, dims, tied, inputs.names)
    spec.validate()
    notes: list[str] = []
    # Outside inference mode: a copy made inside it holds inference tensors, which no later training step
    # (a training cost, a pass that fine-tunes) can use.
    with torch.inference_mode(False):
        if isinstance(model, fx.GraphModule) and method == "auto" and not inputs.names:
            gm, used = copy.deepcopy(model), "symbolic_trace"
        else:
            model = _private_copy(model, notes)
            gm, used = _capture(model, inputs, spec, method, leaf_modules, concrete_args, notes)
    propagate(gm, spec, method=used, source=type(model).__name__, time_limit=time_limit, notes=tuple(notes))
    return gm


def _private_copy(model: torch.nn.Module, notes: list[str]) -> torch.nn.Module:
    """A deep copy of ``model`` (fxreduce.copying); ``notes`` names the attributes it had to copy detached."""
    stale = [path for path, _ in with_history(model)]
    copied = copy_model(model, where="fxreduce.trace")
    if stale:
        notes.append(f"{', '.join(stale)} held tensors computed with autograd by an earlier run (not graph "
                     f"leaves, which deepcopy refuses); fxreduce's copy holds them detached")
    return copied


def _capture(model, inputs: _Inputs, spec: InputSpec, method, leaf_modules, concrete_args,
             notes: list[str]) -> tuple[fx.GraphModule, str]:
    """Capture fxreduce's private copy ``model``; ``notes`` collects what capture left out."""
    transformers_model = hf.is_transformers_model(model)
    base = type(model)
    names = inputs.names
    if names:
        hf.positional_forward(model, names, inputs.constants)
    attempts = ["fx", "export"] if method == "auto" else [method]
    if transformers_model and method == "auto":
        attempts.reverse()  # transformers' forwards build masks and caches in Python: fx fails on them
    errors: list[tuple[str, BaseException]] = []
    for attempt in attempts:
        if attempt == "fx":
            try:
                return _symbolic_trace(model, leaf_modules, concrete_args, notes), "symbolic_trace"
            except Exception as error:
                errors.append(("torch.fx.symbolic_trace", error))
            continue
        not_registered = hf.register_caches(model) if transformers_model else None
        try:
            return _export(model, spec), "torch.export"
        except Exception as error:
            if not (transformers_model and hf.uses_cache(model) and hf.accepts_cache_flag(base)
                    and (not_registered or hf.is_cache_failure(error))):
                errors.append(("torch.export", error))
                continue
            reason = not_registered or f"{error_summary(error)}"
        # The cache class cannot be exported: capture without it, and say so.
        model.__class__ = base
        hf.positional_forward(model, names, {**inputs.constants, "use_cache": False})
        try:
            gm = _export(model, spec)
        except Exception as error:
            errors.append(("torch.export", error))
            continue
        notes.append(hf.CACHE_DROPPED.format(reason=reason))
        return gm, "torch.export"
    _check_runs(model, inputs.values, names)
    first = errors[0][1]
    tried = "; ".join(f"{how}: {error_summary(e)}" for how, e in errors)
    if transformers_model:
        fix = hf.capture_fix(errors, keyword_inputs=bool(inputs.names))
    else:
        fix = ("mark the offending submodule as a leaf (leaf_modules=[...]), fix non-tensor arguments with "
               "concrete_args={...}, or try method='export'")
    raise TraceError(f"cannot capture {base.__name__} as a graph ({tried})", where=_user_frame(first),
                     fix=fix) from first


def _parameter_names(model: torch.nn.Module, count: int) -> tuple[str, ...]:
    """The names of the first ``count`` positional parameters of ``model``'s forward."""
    kinds = inspect.Parameter
    parameters = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    return tuple(parameters[:count])
