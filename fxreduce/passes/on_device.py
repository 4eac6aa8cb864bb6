"""On-device CNN training (Wu et al., arXiv 2007.03213): error map pruning and the early instance filter.

``error_map_pruning`` swaps Conv2d (and, as an option, Linear) layers for versions whose backward keeps
only the top fraction of output channels of the error map and runs the input- and weight-gradient
convolutions on those channels only. ``instance_filter`` inserts a small filter net at the graph's
input that, in training, drops the instances it predicts to have a low loss before the main forward;
fxreduce.training.on_device trains that filter from the main model's losses. Both leave eval alone.
"""

from __future__ import annotations

import copy
import fnmatch
import operator
from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx
from torch import nn

from ..cost_models import graph_cost, graph_info
from ..cost_models.propagation import set_mode
from ..errors import InputError, OptionError
from ..graph import REWRITTEN_BY, Layer, find_layers, replace_layer, unique_name
from ..modules.error_map import ErrorMapConv2d, ErrorMapLinear, _ErrorMapPruning, check_score
from ..modules.instance_filter import InstanceFilter, default_filter
from .base import Contract, Pass, PassOutcome, Rewrite, Skipped, compare_outputs, option, register, run_eval

SEED = 1234


def _valid_score(score) -> bool:
    try:
        check_score(score, "error_map_pruning")
    except OptionError:
        return False
    return True


@dataclass
class ErrorMapOptions:
    keep: float = option(0.3, "fraction of each layer's output channels whose error map the backward keeps",
                         check=("0 < keep <= 1", lambda value: 0 < value <= 1))
    score: tuple = option((1.0, 1.0), "(g1, g2): weights of a channel's weight-norm share and error-map-norm share "
                                      "in its score", check=("two non-negative weights, not both 0", _valid_score))
    layers: str = option("*", "glob over layer names (module paths or node names) to rewrite, e.g. 'layer*'",
                         check=("a non-empty glob", lambda value: bool(value.strip())))
    linear: bool = option(False, "also prune the error maps of Linear layers (per output feature)")
    multiple: int = option(1, "round each kept count up to a multiple of this (1: ceil(keep * channels))",
                           check=("an int >= 1", lambda value: value >= 1))
    sync: bool = option(True, "under torch.distributed, all-reduce channel scores so every rank prunes the same ones")


def _trainable_upstream(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a trainable parameter feeds ``node``: only then does a training step need its gradient."""
    parameters = dict(gm.named_parameters())
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "get_attr" and current.target in parameters and parameters[current.target].requires_grad:
            return True
        if current.op == "call_module" and any(p.requires_grad for p in gm.get_submodule(current.target).parameters()):
            return True
        stack.extend(current.all_input_nodes)
    return False


def _as_torch_layer(layer: Layer) -> nn.Module:
    """An nn.Conv2d / nn.Linear view of a layer of any dialect, holding the layer's own parameters."""
    if layer.kind == "linear":
        return layer.as_linear()
    if layer.module is not None:
        return layer.module
    weight, a = layer.weight, layer.attrs
    module = nn.Conv2d(weight.shape[1] * a["groups"], weight.shape[0], tuple(weight.shape[2:]), a["stride"],
                       a["padding"], a["dilation"], a["groups"], layer.bias is not None, device="meta")
    module.weight, module.bias = layer.weight, layer.bias
    return module


def _why_not_prunable(layer: Layer) -> str | None:
    if layer.weight is None:
        return f"{layer.describe()} computes its weight in the graph; only parameter weights are pruned"
    if not all(isinstance(t, nn.Parameter) for t in (layer.parameter, layer.bias) if t is not None):
        return f"{layer.describe()} has constant (non-parameter) weights: nothing to train"
    if layer.kind == "linear" and layer.why_shared(keeps_weight=True):
        return layer.why_shared(keeps_weight=True)
    if layer.kind == "conv2d" and layer.weight.shape[0] == layer.attrs["groups"]:
        return "one output channel per group (depthwise): no channel of a group can be pruned"
    return None


def _emp_modules(gm: nn.Module) -> dict[str, _ErrorMapPruning]:
    return {name: m for name, m in gm.named_modules() if isinstance(m, _ErrorMapPruning)}


def _seeded(fn, *args):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return fn(*args)


def _projected_loss(outputs: object) -> torch.Tensor | None:
    """A scalar mixing every differentiable output with fixed random weights (uneven error maps)."""
    leaves = [t for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not leaves:
        return None
    generator = torch.Generator().manual_seed(SEED)
    return sum((leaf * torch.randn(leaf.shape, generator=generator, dtype=leaf.dtype).to(leaf.device)).sum()
               for leaf in leaves)


def _gradients(model: nn.Module, inputs: tuple) -> dict[str, torch.Tensor] | None:
    loss = _seeded(lambda: _projected_loss(model(*inputs)))
    if loss is None:
        return None
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: g if g is not None else torch.zeros_like(p) for n, p, g in zip(names, params, grads)}


@register
class ErrorMapPruning(Pass):
    name = "error_map_pruning"
    summary = "training backward keeps the top channels of each conv's error map; gradient convs run on those only"
    contract = Contract("reference", "forward outputs equal the original's; in training, input/weight/bias "
                                     "gradients equal the dense ones computed from the error map zeroed outside the "
                                     "kept channels (the same channels for the batch); keep=1 gives the dense "
                                     "gradients",
                        tolerance=1e-5)
    Options = ErrorMapOptions

    def rewrite(self, gm: fx.GraphModule, outcome: PassOutcome) -> None:
        o = self.options
        settings = dict(keep=o.keep, score=o.score, multiple=o.multiple, sync=o.sync)
        for layer in find_layers(gm, ["conv2d", "linear"] if o.linear else ["conv2d"]):
            if not (fnmatch.fnmatchcase(layer.name, o.layers) or fnmatch.fnmatchcase(layer.node.name, o.layers)):
                continue
            reason = _why_not_prunable(layer)
            if reason:
                outcome.skipped.append(Skipped(layer.node.name, reason))
                continue
            source = _as_torch_layer(layer)
            if layer.kind == "conv2d":
                module = ErrorMapConv2d.from_conv(source, **settings)
            else:
                module = ErrorMapLinear.from_linear(source, **settings)
            module.train(gm.training)
            module.input_grad = _trainable_upstream(gm, layer.input)
            channels = module.weight.shape[0]
            replaced = layer.node.name
            new = replace_layer(gm, layer, module, pass_name=self.name)
            kept = f"{module.kept_channels} of {channels} channels" if module.prunes else f"all {channels} channels"
            outcome.rewrites.append(Rewrite([replaced], [new.name], f"backward keeps the error map of {kept} "
                                            f"(keep={o.keep:g}); forward unchanged", self.contract))

    def check(self, before: fx.GraphModule, after: fx.GraphModule, inputs: tuple) -> str | None:
        """Eval outputs equal; training outputs equal; gradients equal the masked-dense reference."""
        failure = compare_outputs(_seeded(run_eval, before, inputs), _seeded(run_eval, after, inputs),
                                  self.contract.tolerance)
        if failure:
            return f"eval: {failure}"
        original, pruned, reference = (copy.deepcopy(m) for m in (before, after, after))
        for model in (original, pruned, reference):
            set_mode(model, True)
        failure = compare_outputs(_seeded(original, *inputs), _seeded(pruned, *inputs), self.contract.tolerance)
        if failure:
            return f"training forward: {failure}"
        # Gradients in float64: the contract's 1e-5 is about which channels are kept, not float32 summation order.
        pruned, reference = pruned.double(), reference.double()
        inputs = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
        grads = _gradients(pruned, inputs)
        if grads is None:
            return None
        references = _emp_modules(reference)
        for name, module in _emp_modules(pruned).items():
            references[name].fixed_channels = module.last_kept
            references[name].reference = True
        expected = _gradients(reference, inputs)
        failure = compare_outputs(expected, grads, self.contract.tolerance)
        return f"training gradients vs the masked-error-map reference: {failure}" if failure else None


@dataclass
class InstanceFilterOptions:
    filter: object = option(None, "the filter net: an nn.Module mapping a batch of input 0 to (N, 2) logits "
                                  "(Low, High); default: a small CNN (MLP for vectors) sized by `budget`",
                            check=("an nn.Module", lambda value: isinstance(value, nn.Module)))
    target_high_ratio: float = option(0.1, "R_set: the share of instances the adaptive loss threshold labels High",
                                      check=("0 < ratio < 1", lambda value: 0 < value < 1))
    uncertainty: float = option(0.2, "uncertainty sampling: also keep this share of the batch from the predicted-Low "
                                     "instances with the highest prediction entropy (0: none)",
                                check=("0 <= value <= 1", lambda value: 0 <= value <= 1))
    budget: float = option(0.2, "the default filter's forward multiply-adds per instance, as a fraction of the main "
                                "model's", check=("budget > 0", lambda value: value > 0))
    min_keep: int = option(1, "instances kept when the filter predicts every one Low (2 if the model has "
                              "training-mode BatchNorm: batch statistics need two)", check=("an int >= 1",
                                                                                            lambda value: value >= 1))
    input: int = option(0, "which graph input (placeholder index) the filter reads",
                        check=("an index >= 0", lambda value: value >= 0))


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
    provides = frozenset({"instance_filter"})

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
                                uncertainty=o.uncertainty, min_keep=min_keep).train(gm.training)
        target = unique_name(gm, "instance_filter")
        gm.add_submodule(target, module)
        with gm.graph.inserting_after(placeholders[-1]):
            branch = gm.graph.call_module(target, tuple(node for node, _ in ordered))
        branch.meta[REWRITTEN_BY] = self.name
        added = [branch.name]
        previous = branch
        for index, (node, _) in enumerate(ordered):
            with gm.graph.inserting_after(previous):
                item = gm.graph.call_function(operator.getitem, (branch, index))
            item.meta[REWRITTEN_BY] = self.name
            node.replace_all_uses_with(item, delete_user_cb=lambda user: user is not branch)
            added.append(item.name)
            previous = item
        kind = "user's" if o.filter is not None else f"default ({sum(p.numel() for p in net.parameters())} parameters)"
        note = f"; keeps at least {min_keep} (training-mode BatchNorm)" if min_keep > o.min_keep else ""
        what = f"{kind} filter net before the main forward; in training only predicted-High and uncertain go on"
        outcome.rewrites.append(Rewrite([], added, what + note, self.contract))

    def check(self, before: fx.GraphModule, after: fx.GraphModule, inputs: tuple) -> str | None:
        """Eval outputs equal; training outputs equal the original's on the kept instances."""
        failure = compare_outputs(_seeded(run_eval, before, inputs), _seeded(run_eval, after, inputs),
                                  self.contract.tolerance)
        if failure:
            return f"eval: {failure}"
        original, filtered = copy.deepcopy(before), copy.deepcopy(after)
        set_mode(original, True)
        set_mode(filtered, True)
        actual = _seeded(filtered, *inputs)
        (branch,) = _instance_filters(filtered).values()
        order = [self.options.input] + [i for i, x in enumerate(inputs)
                                        if isinstance(x, torch.Tensor) and i != self.options.input]
        batched = {i for i, flag in zip(order, branch.batched) if flag}
        subset = tuple(x.index_select(0, branch.kept) if i in batched else x for i, x in enumerate(inputs))
        failure = compare_outputs(_seeded(original, *subset), actual, self.contract.tolerance)
        return f"training, on the {branch.kept.numel()} kept instances: {failure}" if failure else None


def _check_filter(net: nn.Module, example: torch.Tensor) -> None:
    """The filter must map a batch to one (Low, High) logit pair per instance."""
    probe = copy.deepcopy(net).eval()
    try:
        with torch.no_grad():
            logits = probe(example)
    except Exception as error:
        raise OptionError(f"the filter net fails on the input of shape {tuple(example.shape)}: "
                          f"{type(error).__name__}: {error}", where="instance_filter(filter=...)",
                          fix="pass a filter that takes the model's first input") from error
    if not (isinstance(logits, torch.Tensor) and tuple(logits.shape) == (example.shape[0], 2)):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise OptionError(f"the filter net returns {got}, not one (Low, High) logit pair per instance "
                          f"({example.shape[0]}, 2)", where="instance_filter(filter=...)",
                          fix="end the filter with a layer of 2 outputs, e.g. nn.Linear(features, 2)")
