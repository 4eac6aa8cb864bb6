"""Pipelines: compose passes, check their order, re-propagate shapes after each, report every rewrite.

A spec string names passes and their options with Python literal syntax: "fold_batchnorm,
remove_dropout" or "sparse_lowrank(rank=64, form='lr')". After each pass the pipeline lints and
recompiles the graph, re-runs symbolic shape/cost propagation, costs each rewrite before and after, and
certifies the pass's total FLOPs change. A failure names the pass that failed.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any, Sequence

import sympy
import torch
import torch.fx as fx

from . import meta
from .cost_models import Certificate, GraphCost, certify, graph_cost, graph_info, propagate
from .cost_models.latency import Latency, Profile, load_profile
from .cost_models.symbolic import NodeCost, pinned_dims
from .errors import FxReduceError, OptionError, PassError, ProfileError
from .passes import Pass, Rewrite, Skipped, get_pass
from .text import count, formula, joined_names

def parse_spec(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """ "a(x=1, y='s'),b" -> [("a", {"x": 1, "y": "s"}), ("b", {})]; options are Python literals."""
    try:
        tree = ast.parse(f"[{spec}]", mode="eval").body
    except SyntaxError as error:
        raise OptionError(f"cannot parse pipeline spec {spec!r}: {error.msg}", where=f"column {error.offset}",
                          fix="write passes as name or name(option=value), separated by commas") from None
    parsed = []
    for element in tree.elts:
        if isinstance(element, ast.Name):
            parsed.append((element.id, {}))
            continue
        if not (isinstance(element, ast.Call) and isinstance(element.func, ast.Name)) or element.args:
            raise OptionError(f"cannot parse {ast.unparse(element)!r} in pipeline spec", where=spec,
                              fix="write name(option=value, ...) with named options only")
        options = {}
        for keyword in element.keywords:
            try:
                options[keyword.arg] = ast.literal_eval(keyword.value)
            except ValueError:
                raise OptionError(f"option {keyword.arg} of {element.func.id} is not a literal: "
                                  f"{ast.unparse(keyword.value)}", where=spec,
                                  fix="use numbers, strings, booleans, tuples or lists (quote strings)") from None
        parsed.append((element.func.id, options))
    if not parsed:
        raise OptionError("the pipeline spec names no pass", where=repr(spec), fix="e.g. 'fold_batchnorm'")
    return parsed


@dataclass
class RewriteCost:
    """A rewrite with its cost before (replaced nodes) and after (added nodes)."""

    rewrite: Rewrite
    replaced: list[str]
    added: list[str]
    before: NodeCost
    after: NodeCost


@dataclass
class StepReport:
    pass_: Pass
    rewrites: list[RewriteCost]
    skipped: list[Skipped]
    cost_before: GraphCost
    cost_after: GraphCost
    certificate: Certificate


@dataclass
class RewriteReport:
    """What a pipeline did: per pass, one line per rewrite, what it skipped and why, and the totals.

    Beside each certified FLOP cut stands the predicted speedup on this machine, from the latency
    profile ``profile`` (a Profile or a path; None: the one ``fxreduce calibrate`` wrote), at ``at`` and
    the example sizes of the other dims. Without a profile the report says so and shows FLOPs only.
    """

    steps: list[StepReport] = field(default_factory=list)
    at: dict[str, int] = field(default_factory=dict)
    profile: Any = None
    _predicted: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def predicted(self) -> list[tuple[Latency, Latency]] | str:
        """Each step's (before, after) predicted latency, or the reason there is none (no usable profile)."""
        key = (tuple(sorted(self.at.items())), id(self.profile))
        if key not in self._predicted:
            try:
                profile = self.profile if isinstance(self.profile, Profile) else load_profile(self.profile)
            except ProfileError as error:
                self._predicted[key] = f"{error.what} ({error.fix})"
            else:
                dims = {**_example_sizes(self.before), **self.at}
                latency = {}
                for cost in [step.cost_before for step in self.steps] + [self.after]:
                    if id(cost.graph_module) not in latency:
                        latency[id(cost.graph_module)] = cost.latency(profile, **dims)
                self._predicted[key] = [(latency[id(step.cost_before.graph_module)],
                                         latency[id(step.cost_after.graph_module)]) for step in self.steps]
        return self._predicted[key]

    @property
    def before(self) -> GraphCost:
        return self.steps[0].cost_before

    @property
    def after(self) -> GraphCost:
        return self.steps[-1].cost_after

    @property
    def certificate(self) -> Certificate:
        return certify(self.before, self.after)

    def _sizes(self, before: GraphCost, after: GraphCost) -> dict[str, Any]:
        """Where two graphs' costs compare: at ``at``, and at the size either one fixes a dim to."""
        return {**pinned_dims(before, after), **self.at}

    def _value(self, cost: GraphCost, metric: str, sizes: dict[str, Any]) -> sympy.Expr:
        return sympy.sympify(getattr(cost.at(**{k: v for k, v in sizes.items() if k in cost.symbols or k in self.at}),
                                     metric))

    def lines(self) -> list[str]:
        where = ", ".join(f"{k}={v}" for k, v in self.at.items())
        lines = []
        predicted = self.predicted() if self.steps else []
        for index, step in enumerate(self.steps):
            latency = predicted[index] if isinstance(predicted, list) else None
            head = f"{step.pass_!r}: {len(step.rewrites)} rewrite(s), {len(step.skipped)} left alone"
            if not step.rewrites and not step.skipped:
                head += " (nothing to rewrite)"
            lines.append(head + f"  [{step.pass_.contract}]")
            sizes = self._sizes(step.cost_before, step.cost_after)
            before, after = ({cost.symbols[k]: v for k, v in sizes.items() if k in cost.symbols}
                             for cost in (step.cost_before, step.cost_after))
            for item in step.rewrites:
                flops_before = count(sympy.sympify(item.before.flops).subs(before))
                flops_after = count(sympy.sympify(item.after.flops).subs(after))
                other_before = count(sympy.sympify(item.before.other).subs(before))
                other_after = count(sympy.sympify(item.after.other).subs(after))
                target = joined_names(item.added) if item.added else "(removed)"
                lines.append(f"  {joined_names(item.replaced)} -> {target}: {item.rewrite.what}; "
                             f"FLOPs {flops_before} -> {flops_after}, other ops {other_before} -> {other_after}"
                             + (_predicted_speedup(latency, item) if latency else ""))
            for skipped in step.skipped:
                lines.append(f"  left alone {skipped.node}: {skipped.reason}")
            for dim in sorted(set(step.cost_before.symbols) - set(step.cost_after.symbols)):
                lines.append(f"  note: dim {dim} is no longer symbolic after this pass "
                             f"({step.cost_after.specialised.get(dim, 'unknown reason')})")
            for dim in sorted(set(step.cost_after.symbols) - set(step.cost_before.symbols)):
                lines.append(f"  note: dim {dim} is symbolic after this pass (before it: "
                             f"{step.cost_before.specialised.get(dim, 'unknown reason')})")
            flops_b, flops_a = (self._value(cost, "flops", sizes) for cost in (step.cost_before, step.cost_after))
            lines.append(f"  total FLOPs{f' at {where}' if where else ''}: {count(flops_b)} -> {count(flops_a)}"
                         f"{_percent(flops_b, flops_a)}; {step.certificate}")
            if latency:
                lines.append(f"  predicted latency: {_latency_change(*latency)}")
        if self.steps:
            sizes = self._sizes(self.before, self.after)
            b, a = (self._value(cost, "flops", sizes) for cost in (self.before, self.after))
            params_b, params_a = (self._value(cost, "params", sizes) for cost in (self.before, self.after))
            lines.append(f"pipeline: FLOPs {count(b)} -> {count(a)}{_percent(b, a)}, params {count(params_b)} -> "
                         f"{count(params_a)}; symbolic FLOPs after: {_shorten(self.after.flops)}")
            if isinstance(predicted, list):
                dims = ", ".join(f"{k}={v}" for k, v in predicted[0][0].dims.items())
                lines.append(f"pipeline: predicted latency{f' at {dims}' if dims else ''}: "
                             f"{_latency_change(predicted[0][0], predicted[-1][1])}")
            else:
                lines.append(f"pipeline: predicted latency: {predicted}")
        return lines

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _example_sizes(cost: GraphCost) -> dict[str, int]:
    spec = graph_info(cost.graph_module).spec
    return {name: spec.hint(name) for name in spec.dims}


def _latency_change(before: Latency, after: Latency) -> str:
    return (f"{before.seconds * 1e3:.3g} ms -> {after.seconds * 1e3:.3g} ms, "
            f"{before.seconds / after.seconds:.2f}x ({after.method})")


def _predicted_speedup(latency: tuple[Latency, Latency], item: RewriteCost) -> str:
    """The predicted time of the nodes a rewrite replaced against the nodes it added."""
    before = sum(node.seconds for node in latency[0].nodes if node.name in item.rewrite.replaced)
    after = sum(node.seconds for node in latency[1].nodes if node.name in item.rewrite.added)
    if not before:
        return ""
    return f"; predicted {before / after:.2f}x" if after else f"; predicted saves {before * 1e6:.3g} us"


def _percent(before: sympy.Expr, after: sympy.Expr) -> str:
    if before.is_Number and after.is_Number and before != 0:
        return f" ({100 * float((after - before) / before):+.2f}%)"
    return ""


def _shorten(expr: sympy.Expr, limit: int = 160) -> str:
    text = formula(expr)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class PipelineResult:
    graph_module: fx.GraphModule
    report: RewriteReport


def _instantiate(item: Pass | str | type) -> list[Pass]:
    if isinstance(item, Pass):
        return [item]
    if isinstance(item, type) and issubclass(item, Pass):
        return [item()]
    if isinstance(item, str):
        return [get_pass(name)(**options) for name, options in parse_spec(item)]
    raise PassError(f"a pipeline takes passes, pass classes or spec strings, got {type(item).__name__}",
                    where="Pipeline([...])")


class Pipeline:
    """An ordered composition of passes (each checks its place in the order when it runs)."""

    def __init__(self, passes: Sequence[Pass | str | type] | Pass | type | str, *, seed: int = 0):
        single = isinstance(passes, (str, Pass)) or (isinstance(passes, type) and issubclass(passes, Pass))
        items = [passes] if single else list(passes)
        self.passes: list[Pass] = [p for item in items for p in _instantiate(item)]
        self.seed = seed

    @classmethod
    def from_spec(cls, spec: str, *, seed: int = 0) -> "Pipeline":
        return cls(spec, seed=seed)

    @property
    def spec(self) -> str:
        return ",".join(repr(p) for p in self.passes)

    @property
    def exports(self) -> bool:
        return all(p.exports for p in self.passes)

    def __call__(self, gm: fx.GraphModule) -> PipelineResult:
        info = graph_info(gm)
        report = RewriteReport(at={name: info.spec.hint(name) for name in info.symbolic})
        current = gm
        for p in self.passes:
            current, step = self.run_step(p, current)
            report.steps.append(step)
        return PipelineResult(current, report)

    def run_step(self, p: Pass, gm: fx.GraphModule) -> tuple[fx.GraphModule, StepReport]:
        """One pass of this pipeline on ``gm``: rewrite, re-propagate, cost and certify."""
        info = graph_info(gm)
        cost_before = graph_cost(gm)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            try:
                outcome = p.run(gm)
            except FxReduceError:
                raise
            except Exception as error:
                raise PassError(f"pass {p.name} failed: {type(error).__name__}: {error}",
                                where=f"pass {p.name}", fix="please report this with the model") from error
        result = outcome.graph_module
        if outcome.modified:
            try:
                propagate(result, info.spec, method=info.method, source=info.source, time_limit=info.time_limit)
            except FxReduceError as error:
                raise PassError(f"pass {p.name} produced a graph that no longer runs: {error}",
                                where=f"pass {p.name}", fix="please report this with the model") from error
        cost_after = graph_cost(result)
        nodes_before, nodes_after = _nodes(gm), _nodes(result)
        rewrites = [RewriteCost(r, _describe(gm, nodes_before, r.replaced), _describe(result, nodes_after, r.added),
                                _sum_costs(nodes_before, r.replaced), _sum_costs(nodes_after, r.added))
                    for r in outcome.rewrites]
        return result, StepReport(p, rewrites, outcome.skipped, cost_before, cost_after,
                                  certify(cost_before, cost_after))


def _nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {node.name: node for node in gm.graph.nodes}


def _describe(gm: fx.GraphModule, nodes: dict[str, fx.Node], names: list[str]) -> list[str]:
    described = []
    for name in names:
        node = nodes.get(name)
        if node is None:
            described.append(name)
        elif node.op == "call_module":
            described.append(f"{name} ({type(gm.get_submodule(node.target)).__name__})")
        else:
            target = getattr(node.target, "__name__", str(node.target))
            described.append(f"{name} ({target})")
    return described


def _sum_costs(nodes: dict[str, fx.Node], names: list[str]) -> NodeCost:
    total = NodeCost()
    for name in names:
        node = nodes.get(name)
        if node is not None and meta.info(node) is not None:
            total = total + meta.info(node).cost
    return total


def apply(gm: fx.GraphModule, pipeline: Pipeline | Pass | str | Sequence[Pass | str], *, seed: int = 0) -> PipelineResult:
    """Run a pipeline (a spec string, one pass or a list of them) on a traced GraphModule; ``gm`` is not changed."""
    if not isinstance(pipeline, Pipeline):
        pipeline = Pipeline(pipeline, seed=seed)
    return pipeline(gm)
