"""instance_filter, on-device CNN training (Wu et al., arXiv 2007.03213): skip the easy instances.

The pass inserts a small filter net at the graph's input that, in training, drops the instances it
predicts to have a low loss before the main forward; fxreduce.training.on_device trains that filter from
the main model's losses. Eval is left alone.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx
from torch import nn

from .. import meta
from ..cost_models import graph_cost, graph_info
from ..errors import InputError, OptionError
from ..graph import find_layers, unique_name
from ..modules.instance_filter import SELECTIONS, InstanceFilter, default_filter
from ..testing.kit import compare_outputs, run_eval, seeded_forward
from ..text import error_summary
from .base import Contract, Pass, PassOutcome, Rewrite, Skipped, option, register

SEED = 1234


@dataclass
class InstanceFilterOptions:
    filter: object = option(None, "the filter net: an nn.Module mapping a batch of input 0 to (N, 2) logits "
                                  "(Low, High); default: a small CNN (MLP for vectors) sized by `budget`",
                            check=("an nn.Module", lambda value: isinstance(value, nn.Module)))
    target_high_ratio: float = option(0.1, "R_set: the share of instances the adaptive loss threshold labels High",
                                      check=("0 < ratio < 1", lambda value: 0 < value < 1))
    uncertainty: float = option(0.2, "uncertainty sampling: also keep this share of the batch from the predicted-Low "
                                     "instances with the highest prediction entropy (0: none; with "
                                     "selection='unbiased', a uniform random sample of this share)",
                                check=("0 <= value <= 1", lambda value: 0 <= value <= 1))
    budget: float = option(0.2, "the default filter's forward multiply-adds per instance, as a fraction of the main "
                                "model's", check=("budget > 0", lambda value: value > 0))
    min_keep: int = option(1, "instances kept when the filter predicts every one Low (2 if the model has "
                              "training-mode BatchNorm: batch statistics need two)", check=("an int >= 1",
                                                                                            lambda value: value >= 1))
    input: int = option(0, "which graph input (placeholder index) the filter reads",
                        check=("an index >= 0", lambda value: value >= 0))
    selection: str = option("uncertainty", "which predicted-Low instances also train: 'uncertainty' (the paper's: "
                                           "the highest prediction entropy; a sample biased towards hard instances) "
                                           "or 'unbiased' (a uniform random sample, each loss weighted by the "
                                           "inverse of its keep probability, so the expected loss is the whole "
                                           "batch's mean)",
                            check=(f"one of {', '.join(map(repr, SELECTIONS))}", lambda value: value in SELECTIONS))

    def __post_init__(self) -> None:
        if self.selection == "unbiased" and self.uncertainty == 0:
            raise OptionError("selection='unbiased' needs uncertainty > 0: with 0 a predicted-Low instance is never "
                              "kept, so its loss cannot be stood for", where="instance_filter(uncertainty=0)",
                              fix="give uncertainty > 0 (the share of the batch sampled from the predicted Low)")


def _main_macs_per_instance(gm: fx.GraphModule, batch: int) -> float:
    info = graph_info(gm)
    cost = graph_cost(gm)
    values = {cost.symbols[name]: info.spec.hint(name) for name in info.symbolic}
    return float(sympy.sympify(cost.macs).subs(values)) / max(batch, 1)


def _instance_filters(gm: nn.Module) -> dict[str, InstanceFilter]:
    return {name: m for name, m in gm.named_modules() if isinstance(m, InstanceFilter)}


@register
class InstanceFilterPass(Pass):
    name = "instance_filter"
    summary = "early instance filter: in training a small net drops instances it predicts to have a low loss"
    contract = Contract("reference", "eval outputs equal the original's; in training, the outputs equal the original "
                                     "model's outputs on the kept instances (instance_filter.kept)", tolerance=1e-5)
    Options = InstanceFilterOptions

    def rewrite(self, gm: fx.GraphModule, outcome: PassOutcome) -> None:
        o = self.options
        placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
        examples = graph_info(gm).spec.example_inputs
        if _instance_filters(gm):
            outcome.skipped.append(Skipped(placeholders[0].name if placeholders else "graph",
                                           "the graph already has an instance filter"))
            return
        first = examples[o.input] if o.input < len(placeholders) else None
        if not isinstance(first, torch.Tensor) or first.dim() < 2:
            raise InputError(f"instance_filter reads input {o.input}, which is not a batched tensor input",
                             where=f"instance_filter(input={o.input})",
                             fix=f"name a tensor input with a batch axis (the graph has {len(placeholders)} inputs)")
        tensors = [(node, value) for node, value in zip(placeholders, examples) if isinstance(value, torch.Tensor)]
        ordered = [(placeholders[o.input], first)] + [(n, v) for n, v in tensors if n is not placeholders[o.input]]
        batched = [value.dim() >= 1 and value.shape[0] == first.shape[0] for _, value in ordered]
        instance_shape = tuple(first.shape[1:])
        net = o.filter if o.filter is not None else default_filter(
            instance_shape, o.budget * _main_macs_per_instance(gm, first.shape[0]))
        net = copy.deepcopy(net).to(device=first.device)
        _check_filter(net, first)
        has_batchnorm = any(layer.attrs["training"] for layer in find_layers(gm, ["batchnorm"]))
        min_keep = max(o.min_keep, 2) if has_batchnorm and first.shape[0] >= 2 else o.min_keep
        module = InstanceFilter(net, batched, instance_shape, target_high_ratio=o.target_high_ratio,
                                uncertainty=o.uncertainty, min_keep=min_keep,
                                selection=o.selection).train(gm.training)
        target = unique_name(gm, "instance_filter")
        gm.add_submodule(target, module)
        with gm.graph.inserting_after(placeholders[-1]):
            branch = gm.graph.call_module(target, tuple(node for node, _ in ordered))
        meta.mark_rewritten(branch, self.name)
        added = [branch.name]
        previous = branch
        for index, (node, _) in enumerate(ordered):
            with gm.graph.inserting_after(previous):
                item = gm.graph.call_function(operator.getitem, (branch, index))
            meta.mark_rewritten(item, self.name)
            node.replace_all_uses_with(item, delete_user_cb=lambda user: user is not branch)
            added.append(item.name)
            previous = item
        kind = "user's" if o.filter is not None else f"default ({sum(p.numel() for p in net.parameters())} parameters)"
        note = f"; keeps at least {min_keep} (training-mode BatchNorm)" if min_keep > o.min_keep else ""
        rest = "uncertain" if o.selection == "uncertainty" else "a weighted random sample of the rest"
        what = f"{kind} filter net before the main forward; in training only predicted-High and {rest} go on"
        outcome.rewrites.append(Rewrite([], added, what + note, self.contract))

    def check(self, before: fx.GraphModule, after: fx.GraphModule, inputs: tuple) -> str | None:
        """Eval outputs equal; training outputs equal the original's on the kept instances."""
        failure = compare_outputs(run_eval(before, inputs), run_eval(after, inputs), self.contract.tolerance)
        if failure:
            return f"eval: {failure}"
        original, filtered = copy.deepcopy(before), copy.deepcopy(after)
        actual = seeded_forward(filtered, inputs, SEED)
        (branch,) = _instance_filters(filtered).values()
        order = [self.options.input] + [i for i, x in enumerate(inputs)
                                        if isinstance(x, torch.Tensor) and i != self.options.input]
        batched = {i for i, flag in zip(order, branch.batched) if flag}
        subset = tuple(x.index_select(0, branch.kept) if i in batched else x for i, x in enumerate(inputs))
        failure = compare_outputs(seeded_forward(original, subset, SEED), actual, self.contract.tolerance)
        return f"training, on the {branch.kept.numel()} kept instances: {failure}" if failure else None


def _check_filter(net: nn.Module, example: torch.Tensor) -> None:
    """The filter must map a batch to one (Low, High) logit pair per instance."""
    probe = copy.deepcopy(net).eval()
    try:
        with torch.no_grad():
            logits = probe(example)
    except Exception as error:
        raise OptionError(f"the filter net fails on the input of shape {tuple(example.shape)}: "
                          f"{error_summary(error)}", where="instance_filter(filter=...)",
                          fix="pass a filter that takes the model's first input") from error
    if not (isinstance(logits, torch.Tensor) and tuple(logits.shape) == (example.shape[0], 2)):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise OptionError(f"the filter net returns {got}, not one (Low, High) logit pair per instance "
                          f"({example.shape[0]}, 2)", where="instance_filter(filter=...)",
                          fix="end the filter with a layer of 2 outputs, e.g. nn.Linear(features, 2)")
