"""Rewrite a model part by part: capture named submodules, run the pipeline on each, swap them in place.

Some models cannot be captured whole (Faster R-CNN's box selection is data dependent), yet most of
their cost sits in parts that can (the backbone, the box head). ``apply(model, spec, submodules=[...],
example_inputs=...)`` runs the whole model once on the example inputs to record what each named
submodule receives, captures each submodule on those inputs, rewrites it with the pipeline, and
returns a copy of the model with the rewritten GraphModules in their places; the rest stays Python.
The report and the cost cover the rewritten parts only, and say so. The user's model is not changed.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import sympy
import torch
import torch.fx as fx

from .copying import copy_model
from .cost_models import certify, graph_info
from .errors import InputError
from .passes import Pass
from .pipeline import Pipeline, PipelineResult
from .pipeline import apply as apply_graph
from .text import count, error_summary
from .tracing import trace


@dataclass
class SubmoduleResult:
    """The whole model with its named parts rewritten; per part what the pipeline did, the graph it
    captured (before the rewrite, for contract checks) and the inputs it received in the example run."""

    model: torch.nn.Module
    parts: dict[str, PipelineResult]
    captured: dict[str, fx.GraphModule] = field(default_factory=dict)
    inputs: dict[str, tuple] = field(default_factory=dict)

    @property
    def report(self) -> "SubmoduleReport":
        return SubmoduleReport(self.parts)


@dataclass
class SubmoduleReport:
    """Each part's rewrite report, then the totals over the rewritten parts at their captured sizes."""

    parts: dict[str, PipelineResult]

    def totals(self, metric: str) -> tuple[sympy.Expr, sympy.Expr]:
        before = after = sympy.Integer(0)
        for part in self.parts.values():
            report = part.report
            before += sympy.sympify(getattr(report.before.at(**report.at), metric))
            after += sympy.sympify(getattr(report.after.at(**report.at), metric))
        return before, after

    @property
    def certificate(self):
        before, after = self.totals("flops")
        return certify(before, after)

    def lines(self) -> list[str]:
        lines = []
        for name, part in self.parts.items():
            info = graph_info(part.graph_module)
            lines.append(f"submodule {name} ({info.source}, captured by {info.method}):")
            lines += ["  " + line for line in part.report.lines()]
        (flops_b, flops_a), (params_b, params_a) = self.totals("flops"), self.totals("params")
        change = f" ({100 * float((flops_a - flops_b) / flops_b):+.2f}%)" if flops_b else ""
        lines.append(f"rewritten parts ({', '.join(self.parts)}) at their captured sizes: FLOPs {count(flops_b)} -> "
                     f"{count(flops_a)}{change}, params {count(params_b)} -> {count(params_a)}; the rest of the "
                     f"model stays Python and is not counted")
        return lines

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _as_inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise InputError("apply(..., submodules=...) needs the whole model's example inputs",
                     where="fxreduce.apply(example_inputs=...)", fix="pass example_inputs=(x,) for model(x)")


def _check_names(model: torch.nn.Module, names: Sequence[str]) -> None:
    known = dict(model.named_modules())
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise InputError(f"submodules must be a non-empty list of names, got {names!r}",
                         where="fxreduce.apply(submodules=...)", fix="e.g. submodules=['backbone']")
    for name in names:
        if name not in known or not name:
            close = difflib.get_close_matches(name, [k for k in known if k], n=3, cutoff=0.5)
            raise InputError(f"{type(model).__name__} has no submodule {name!r}",
                             where="fxreduce.apply(submodules=...)",
                             fix=f"did you mean {' or '.join(map(repr, close))}?" if close
                             else "list them with [name for name, _ in model.named_modules()]")
    for name in names:
        nested = [other for other in names if other != name and other.startswith(name + ".")]
        if nested:
            raise InputError(f"submodule {nested[0]!r} lies inside {name!r}", where="fxreduce.apply(submodules=...)",
                             fix="name either the part or the parts inside it, not both")


def record_inputs(model: torch.nn.Module, names: Sequence[str], example_inputs: tuple) -> dict[str, tuple]:
    """What each named submodule receives (its first call) when the model runs on ``example_inputs``."""
    seen: dict[str, tuple] = {}
    keywords: dict[str, list[str]] = {}

    def hook(name: str):
        def record(module, args, kwargs) -> None:
            if name not in seen:
                seen[name] = tuple(args)
                keywords[name] = sorted(kwargs)
        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name), with_kwargs=True) for name in names]
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception as error:
        shapes = ", ".join(str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
                           for x in example_inputs)
        raise InputError(f"{type(model).__name__} does not run on example inputs ({shapes}): "
                         f"{error_summary(error)}",
                         where="fxreduce.apply(example_inputs=...)",
                         fix="pass inputs the whole model accepts") from error
    finally:
        for handle in handles:
            handle.remove()
    for name in names:
        if name not in seen:
            raise InputError(f"submodule {name!r} is never called when the model runs on the example inputs",
                             where="fxreduce.apply(submodules=...)", fix="name a submodule the forward pass calls")
        if keywords[name]:
            raise InputError(f"submodule {name!r} is called with keyword arguments {', '.join(keywords[name])}; "
                             f"only positional inputs are captured", where="fxreduce.apply(submodules=...)",
                             fix="name the part that calls it, or a submodule called with positional inputs")
    return seen


def apply_to_submodules(model: torch.nn.Module, pipeline: Pipeline | Pass | str | Sequence[Pass | str],
                        submodules: Sequence[str], example_inputs: Any, *, seed: int = 0,
                        dynamic: Mapping[str, Mapping[str, tuple[int, int]]] | None = None) -> SubmoduleResult:
    """Capture and rewrite each named submodule of ``model`` in place, on a copy; see the module docstring.

    ``dynamic`` maps a submodule name to its named symbolic dims, as fxreduce.trace takes them
    (e.g. {"roi_heads.box_head": {"R": (0, 0)}}); other dims keep the sizes the example run gave them.
    """
    if not isinstance(model, torch.nn.Module) or isinstance(model, fx.GraphModule):
        raise InputError("submodules=... rewrites parts of an nn.Module, got "
                         f"{type(model).__name__}", where="fxreduce.apply(submodules=...)",
                         fix="pass the model itself (not a traced graph) with its example_inputs")
    _check_names(model, submodules)
    unknown = set(dynamic or {}) - set(submodules)
    if unknown:
        raise InputError(f"dynamic names {sorted(unknown)[0]!r}, which is not among the submodules",
                         where="fxreduce.apply(dynamic=...)", fix="key dynamic by submodule name")
    if not isinstance(pipeline, Pipeline):
        pipeline = Pipeline(pipeline, seed=seed)
    rewritten = copy_model(model, where="fxreduce.apply(submodules=...)")
    inputs = record_inputs(rewritten, list(submodules), _as_inputs(example_inputs))
    parts: dict[str, PipelineResult] = {}
    captured: dict[str, fx.GraphModule] = {}
    for name in submodules:
        captured[name] = trace(rewritten.get_submodule(name), inputs[name], (dynamic or {}).get(name))
        parts[name] = apply_graph(captured[name], pipeline)
    for name, part in parts.items():
        rewritten.set_submodule(name, part.graph_module)
    return SubmoduleResult(rewritten, parts, captured, inputs)


def apply(model: torch.nn.Module | fx.GraphModule, pipeline: Pipeline | Pass | str | Sequence[Pass | str], *,
          seed: int = 0, submodules: Sequence[str] | None = None, example_inputs: Any = None,
          dynamic: Mapping[str, Mapping[str, tuple[int, int]]] | None = None) -> PipelineResult | SubmoduleResult:
    """Run a pipeline on a traced GraphModule, or, with ``submodules``, on those parts of an nn.Module."""
    if submodules is None:
        if example_inputs is not None or dynamic is not None:
            raise InputError("example_inputs and dynamic are for submodules=...; a traced graph has its own",
                             where="fxreduce.apply", fix="trace the model with fxreduce.trace, or name submodules")
        return apply_graph(model, pipeline, seed=seed)
    return apply_to_submodules(model, pipeline, submodules, example_inputs, seed=seed, dynamic=dynamic)
