"""The Pass base and the registry of passes by name.

A pass is a small callable on torch.fx.passes.infra's PassBase: it receives a traced GraphModule,
rewrites a deep copy, and records every rewrite (nodes replaced, nodes added, the contract claimed) and
every layer it left alone with the reason. It never mutates its input and is deterministic for a seed.
Options are a dataclass; each field carries its help text and range check, so specs, the CLI and
errors all describe options the same way. Passes never import each other or the pipeline.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..cost_models.propagation import set_mode
from ..errors import OptionError, PassNotFoundError


@dataclass(frozen=True)
class Contract:
    """What a pass promises. ``kind`` is "exact", "bounded" or "reference"; ``statement`` says it in words."""

    kind: str
    statement: str
    tolerance: float = 1e-5

    def __str__(self) -> str:
        return f"{self.kind}: {self.statement}"


def option(default: Any, help: str, check: tuple[str, Callable[[Any], bool]] | None = None) -> Any:
    """A pass option: default, help text, and an optional (description, predicate) range check."""
    return field(default=default, metadata={"help": help, "check": check})


@dataclass
class Rewrite:
    """One rewrite: the names of the nodes it replaced (in the input graph) and added (in the output)."""

    replaced: list[str]
    added: list[str]
    what: str
    contract: Contract | None = None


@dataclass
class Skipped:
    """A layer the pass could have rewritten but left alone, and why."""

    node: str
    reason: str


@dataclass
class PassOutcome:
    graph_module: fx.GraphModule
    rewrites: list[Rewrite]
    skipped: list[Skipped]

    @property
    def modified(self) -> bool:
        return bool(self.rewrites)


@dataclass
class NoOptions:
    """The options of a pass that takes none."""


class Pass(PassBase):
    """Base of every fxreduce pass. Subclasses set the class attributes and implement :meth:`rewrite`.

    ``needs`` are graph properties that must hold before the pass runs, ``invalidates`` those it breaks
    and ``provides`` those it establishes; the pipeline checks an order against them.
    ``exports`` says whether torch.export works on the pass's output in inference mode.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    contract: ClassVar[Contract]
    needs: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()
    exports: ClassVar[bool] = True

    def __init__(self, **options: Any):
        self.options = build_options(self.name, self.Options, options)

    def __repr__(self) -> str:
        values = ", ".join(f"{f.name}={getattr(self.options, f.name)!r}" for f in dataclasses.fields(self.options))
        return f"{self.name}({values})"

    def rewrite(self, gm: fx.GraphModule, outcome: PassOutcome) -> None:
        """Rewrite ``gm`` (already a private copy) in place, appending to outcome.rewrites / .skipped."""
        raise NotImplementedError

    def run(self, gm: fx.GraphModule) -> PassOutcome:
        """The pass on a deep copy of ``gm``; the input is never changed."""
        copied = copy.deepcopy(gm)
        outcome = PassOutcome(copied, [], [])
        self.rewrite(copied, outcome)
        if outcome.modified:
            copied.graph.lint()
            copied.recompile()
        return outcome

    def check(self, before: fx.GraphModule, after: fx.GraphModule, inputs: tuple) -> str | None:
        """Check this pass's contract on one input; None if it holds, else what broke.

        The default checks an exact contract: eval-mode outputs equal within the contract's tolerance.
        Passes with a bounded or reference contract override this.
        """
        return compare_outputs(run_eval(before, inputs), run_eval(after, inputs), self.contract.tolerance)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        outcome = self.run(graph_module)
        return PassResult(outcome.graph_module, outcome.modified)


def run_eval(gm: torch.nn.Module, inputs: tuple) -> object:
    """Outputs of ``gm`` in eval mode without gradients; the module's mode is restored afterwards."""
    was_training = gm.training
    set_mode(gm, False)
    try:
        with torch.no_grad():
            return gm(*inputs)
    finally:
        set_mode(gm, was_training)


def compare_outputs(expected: object, actual: object, tolerance: float) -> str | None:
    """None if every tensor of ``actual`` equals ``expected`` within a relative ``tolerance``."""
    expected_leaves = torch.utils._pytree.tree_leaves(expected)
    actual_leaves = torch.utils._pytree.tree_leaves(actual)
    if len(expected_leaves) != len(actual_leaves):
        return f"output structure changed: {len(expected_leaves)} leaves before, {len(actual_leaves)} after"
    for index, (e, a) in enumerate(zip(expected_leaves, actual_leaves)):
        if not isinstance(e, torch.Tensor):
            if e != a:
                return f"output {index} changed: {e!r} -> {a!r}"
            continue
        if e.shape != a.shape:
            return f"output {index} shape changed: {tuple(e.shape)} -> {tuple(a.shape)}"
        scale = e.abs().max().item() if e.numel() else 0.0
        error = (e.double() - a.double()).abs().max().item() if e.numel() else 0.0
        if not error <= tolerance * max(scale, 1.0):
            return f"output {index} differs by {error:.3g} (allowed {tolerance:g} x max(|output|, 1) = " \
                   f"{tolerance * max(scale, 1.0):.3g})"
    return None


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry under its ``name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"a pass named {cls.name!r} is already registered")
    REGISTRY[cls.name] = cls
    return cls


def closest(name: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f"did you mean {match[0]!r}?" if match else f"choose from: {', '.join(sorted(candidates))}"


def get_pass(name: str) -> type[Pass]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise PassNotFoundError(f"unknown pass {name!r}", where="pipeline spec",
                                fix=closest(name, list(REGISTRY)) + " (`fxreduce passes` lists them)") from None


def option_fields(options_type: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(options_type))


def build_options(pass_name: str, options_type: type, values: dict[str, Any]) -> Any:
    """Options from keyword values: unknown names, wrong types and out-of-range values raise OptionError."""
    fields = {f.name: f for f in option_fields(options_type)}
    for key in values:
        if key not in fields:
            raise OptionError(f"pass {pass_name} has no option {key!r}", where=f"{pass_name}({key}=...)",
                              fix=closest(key, list(fields)) if fields else "this pass takes no options")
    for key, value in values.items():
        default = fields[key].default
        if default is not None and default is not dataclasses.MISSING:
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                values[key] = value = float(value)
            if isinstance(default, tuple) and isinstance(value, list):
                values[key] = value = tuple(value)
            if not isinstance(value, type(default)) and value is not None:
                raise OptionError(f"option {key} of {pass_name} must be {type(default).__name__}, got {value!r}",
                                  where=f"{pass_name}({key}={value!r})", fix=fields[key].metadata.get("help", ""))
        check = fields[key].metadata.get("check")
        if check is not None and value is not None and not check[1](value):
            raise OptionError(f"option {key}={value!r} of {pass_name} is out of range: needs {check[0]}",
                              where=f"{pass_name}({key}={value!r})", fix=fields[key].metadata.get("help", ""))
    return options_type(**values)
