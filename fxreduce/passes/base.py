"""The Pass base and the registry of passes by name.

A pass is a small callable on torch.fx.passes.infra's PassBase: it receives a traced GraphModule,
rewrites a deep copy, and records every rewrite (nodes replaced, nodes added, the contract claimed) and
every layer it left alone with the reason. It never mutates its input and is deterministic for a seed.
Options are a dataclass; each field carries its help text and range check, so specs, the CLI and
errors all describe options the same way; passes that rewrite layers share :class:`LayerSelection`.
A pass declares the layer kinds it rewrites (``needs``) and may replace by others (``invalidates``):
torch.fx's ``ensures`` hook records on the output which kinds the pass took out of the graph, and
``requires`` refuses to run a pass on a graph from which earlier passes took every kind it rewrites (it
would find nothing), naming them. Passes never import each other or the pipeline.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import meta
from ..cost_models.latency import Profile, load_profile
from ..errors import OptionError, PassError, PassNotFoundError
from ..graph import Layer, find_layers
from ..testing.kit import compare_outputs, run_eval


@dataclass(frozen=True)
class Contract:
    """What a pass promises. ``kind`` is "exact", "bounded" or "reference"; ``statement`` says it in words."""

    kind: str
    statement: str
    tolerance: float = 1e-5

    def __str__(self) -> str:
        return f"{self.kind}: {self.statement}"


EVAL_EXACT = Contract("exact", "outputs equal the original's in eval mode (float tolerance)")


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


@dataclass
class LayerSelection:
    """Options of a pass that rewrites layers: which ones, as a glob over their names."""

    layers: str = option("*", "glob over layer names (module paths or node names; an LSTM's gate matrices as "
                              "'lstm.hh_l0') to rewrite, e.g. 'layer1.*'",
                         check=("a non-empty glob", lambda value: isinstance(value, str) and bool(value.strip())))

    def selects(self, layer: Layer, *names: str) -> bool:
        """Whether the glob matches the layer (or one of ``names``, e.g. an LSTM gate's)."""
        return layer.matches(self.layers, *names)


@dataclass
class LatencyObjective:
    """Options of a pass that can decide by this machine's predicted time instead of multiply-adds."""

    objective: str = option("flops", "flops: decide by multiply-adds; latency: by this machine's latency profile "
                                     "(lower_int8 keeps a layer in float32 where int8 is predicted no faster, "
                                     "sparse_lowrank picks each layer's form by predicted time or leaves it dense)",
                            check=("flops or latency", lambda value: value in ("flops", "latency")))
    profile: str = option(None, "latency profile for objective='latency': a path, or None for the one "
                                "`fxreduce calibrate` wrote", check=("a path or None", lambda value: value is None
                                                                     or isinstance(value, str)))

    def latency_profile(self) -> Profile | None:
        """The profile to decide by, or None under the FLOP objective."""
        return load_profile(self.profile) if self.objective == "latency" else None


class Pass(PassBase):
    """Base of every fxreduce pass. Subclasses set the class attributes and implement :meth:`rewrite`.

    ``needs``: the layer kinds the pass rewrites; running it after passes that took all of them out of
    the graph is an error (it would find nothing). ``invalidates``: the layer kinds it may replace by
    others. ``exports`` says whether torch.export works on the pass's output in inference mode.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    contract: ClassVar[Contract]
    needs: ClassVar[frozenset[str]] = frozenset()
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
        """The pass on a deep copy of ``gm``, between torch.fx's ``requires`` (on the input) and ``ensures``
        (on the output: torch's ``PassBase.__call__`` hands it the input, which a pass here never changes)."""
        self.requires(gm)
        copied = copy.deepcopy(gm)
        copied.meta[meta.HELD] = _kinds_held(copied, self.invalidates)
        outcome = PassOutcome(copied, [], [])
        self.rewrite(copied, outcome)
        if outcome.modified:
            copied.graph.lint()
            copied.recompile()
        self.ensures(copied)
        return outcome

    def requires(self, graph_module: fx.GraphModule) -> None:
        """Refuse a graph from which earlier passes took every layer kind this pass rewrites."""
        removed = meta.removed_properties(graph_module)
        kinds = sorted(kind for kind in self.needs if kind in removed and removed[kind] != self.name)
        if not kinds or _kinds_held(graph_module, self.needs):
            return  # a pass run again after itself just finds nothing left to rewrite
        culprits = sorted({removed[kind] for kind in kinds})
        raise PassError(f"pass {self.name} rewrites {' and '.join(kinds)} layers, which the earlier pass"
                        f"{'es' if len(culprits) > 1 else ''} {' and '.join(culprits)} took out of the graph",
                        where=f"pass {self.name}",
                        fix=f"run {self.name} before {' and '.join(culprits)}, or leave one of them out where both "
                            f"rewrite the same layers")

    def ensures(self, graph_module: fx.GraphModule) -> None:
        """Record on the output which ``invalidates`` kinds this pass took out (its input held them)."""
        held = graph_module.meta.pop(meta.HELD, frozenset())
        present = _kinds_held(graph_module, self.invalidates)
        meta.record_removed(graph_module, set(held - present), set(present), self.name)

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """What ``fxreduce passes`` shows: summary, contract, graph properties and every option."""
        options = []
        for item in option_fields(cls.Options):
            if item.default is not dataclasses.MISSING:
                default = item.default
            elif item.default_factory is not dataclasses.MISSING:
                default = item.default_factory()
            else:
                default = None
            check = item.metadata.get("check")
            options.append({"name": item.name, "default": default, "help": item.metadata.get("help", ""),
                            "range": check[0] if check else None})
        return {"name": cls.name, "summary": cls.summary, "contract": str(cls.contract), "exports": cls.exports,
                "needs": sorted(cls.needs), "invalidates": sorted(cls.invalidates), "options": options}

    def check(self, before: fx.GraphModule, after: fx.GraphModule, inputs: tuple) -> str | None:
        """Check this pass's contract on one input; None if it holds, else what broke.

        The default checks an exact contract: eval-mode outputs equal within the contract's tolerance.
        Passes with a bounded or reference contract override this.
        """
        return compare_outputs(run_eval(before, inputs), run_eval(after, inputs), self.contract.tolerance)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        outcome = self.run(graph_module)
        return PassResult(outcome.graph_module, outcome.modified)

    def __call__(self, graph_module: fx.GraphModule) -> PassResult:
        """torch.fx's pass protocol; :meth:`run` already checks ``requires`` and ``ensures``."""
        return self.call(graph_module)


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


def _kinds_held(gm: fx.GraphModule, kinds: frozenset[str]) -> frozenset[str]:
    return frozenset(kind for kind in kinds if find_layers(gm, [kind]))


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
