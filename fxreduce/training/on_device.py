"""Training with the on-device rewrites: the instance filter's self-supervised training, and counted FLOPs.

A model rewritten by ``instance_filter`` (and/or ``error_map_pruning``) trains through
:class:`OnDeviceTrainer`. Each step: the filter branch keeps the predicted-High and uncertain (or, with
``selection="unbiased"``, randomly sampled) instances; the main model trains on those (the mean of their
losses, or the importance-weighted estimate of the whole batch's mean: ``InstanceFilter.batch_loss``);
their losses label them High (loss >= T_l) or Low; the filter trains on those labels with a weighted
cross-entropy (w_High = 1/R_set, w_Low = 1/(1 - R_set)), from the same forward that chose them. The
threshold adapts: over the last ``window`` batches, if the share of High labels is >= R_set,
T_l *= a1 (> 1), else T_l *= a2 (< 1). The first T_l is the (1 - R_set) quantile of the first batch's losses.

FLOPs are counted as the paper counts savings: the main model's forward and backward on the kept
instances (error-map-pruned backward where the model has it), plus the filter's inference on the whole
batch and its training on the kept instances. :func:`training_step_flops` gives the same as a sympy
expression in the graph's dims, with the keep ratio and the kept-instance ratio as symbols if wanted.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .. import meta
from ..cost_models import graph_cost, graph_info, symbol
from ..errors import InputError
from ..modules.error_map import ErrorMapPruningModule
from ..modules.instance_filter import InstanceFilter

KEEP = sympy.Symbol("alpha", positive=True)
KEPT_RATIO = sympy.Symbol("rho", positive=True)


def per_instance_cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(output, target, reduction="none")


def _filter_nodes(model: fx.GraphModule) -> dict[str, InstanceFilter]:
    return {node.name: model.get_submodule(node.target) for node in model.graph.nodes
            if node.op == "call_module" and isinstance(model.get_submodule(node.target), InstanceFilter)}


def training_step_flops(model: fx.GraphModule, *, keep: sympy.Expr | float | None = None,
                        kept_ratio: sympy.Expr | float | None = None) -> sympy.Expr:
    """FLOPs (2 x multiply-adds) of one training step of a traced, rewritten model, in its named dims.

    ``kept_ratio`` (rho) is the fraction of the batch the instance filter keeps (None: 1): the main
    model's forward and backward and the filter's training scale with it, the filter's inference does
    not. ``keep`` (alpha) replaces every error-map-pruned layer's kept fraction in its backward (None:
    the layers' own kept counts). Pass ``KEEP`` / ``KEPT_RATIO`` (or any sympy symbols) to get the
    cost as a function of them. Assumes per-instance computation (cost linear in the batch size).
    """
    cost = graph_cost(model, training=True)
    filters = _filter_nodes(model)
    nodes = {node.name: node for node in model.graph.nodes}
    ratio = sympy.Integer(1) if kept_ratio is None else sympy.sympify(kept_ratio)
    main, filtering = sympy.Integer(0), sympy.Integer(0)
    for name, node_cost in cost.nodes.items():
        node = nodes.get(name)
        if name in filters:
            forward, backward = filters[name].per_instance_macs()
            instances = meta.shape(node.all_input_nodes[0])[0]
            filtering += forward * instances + backward * instances * ratio
            continue
        module = model.get_submodule(node.target) if node is not None and node.op == "call_module" else None
        if keep is not None and isinstance(module, ErrorMapPruningModule):
            shapes = [tuple(meta.shape(arg)) for arg in node.all_input_nodes]
            step = module.fxreduce_macs(shapes, training=True, keep=sympy.sympify(keep))
            main += sympy.Add(*map(sympy.sympify, step.values()))
        else:
            main += node_cost.total_macs
    return sympy.expand(2 * (main * ratio + filtering))


@dataclass
class StepResult:
    """One training step. ``kept``: batch indices the main model trained on (all when there is no filter)."""

    loss: float
    kept: Tensor
    batch_size: int
    flops: int
    forced: bool = False
    filter_loss: float | None = None
    threshold: float | None = None
    high_ratio: float | None = None
    note: str = ""


@dataclass
class ThresholdState:
    """The adaptive loss threshold T_l and the label history it tracks."""

    value: float | None
    a1: float
    a2: float
    window: int
    history: collections.deque = field(default_factory=collections.deque)

    def update(self, high: int, labelled: int, target: float) -> float:
        self.history.append((high, labelled))
        while len(self.history) > self.window:
            self.history.popleft()
        ratio = sum(h for h, _ in self.history) / max(1, sum(n for _, n in self.history))
        self.value *= self.a1 if ratio >= target else self.a2
        return ratio


class OnDeviceTrainer:
    """Train a model rewritten by instance_filter / error_map_pruning, one batch at a time.

    ``model`` is a GraphModule from fxreduce.trace / fxreduce.apply (a plain traced model works too:
    then it is plain training with the same accounting). ``optimizer`` covers its parameters, the
    filter net's included. ``loss`` maps (outputs, kept targets) to one loss per instance. ``threshold``
    is the initial T_l (None: set from the first batch); ``a1`` > 1 and ``a2`` < 1 its update factors
    over a ``window`` of batches; ``reweight`` weighs uncertainty-sampled instances for the predicted-Low
    ones they stand for. ``count_flops`` needs a graph traced by fxreduce (its symbolic cost).
    """

    def __init__(self, model: fx.GraphModule, optimizer: torch.optim.Optimizer, *,
                 loss: Callable[[object, Tensor], Tensor] = per_instance_cross_entropy,
                 threshold: float | None = None, a1: float = 1.05, a2: float = 0.95, window: int = 10,
                 reweight: bool = True, count_flops: bool = True):
        if not (a1 > 1 and 0 < a2 < 1):
            raise InputError(f"a1={a1!r} must be > 1 and a2={a2!r} in (0, 1)", where="OnDeviceTrainer",
                             fix="T_l grows by a1 when too many instances are High and shrinks by a2 otherwise")
        if not (isinstance(window, int) and window >= 1):
            raise InputError(f"window={window!r} must be an int >= 1", where="OnDeviceTrainer")
        self.model, self.optimizer, self.loss, self.reweight = model, optimizer, loss, reweight
        filters = [m for m in model.modules() if isinstance(m, InstanceFilter)]
        if len(filters) > 1:
            raise InputError(f"the model has {len(filters)} instance filters", where="OnDeviceTrainer",
                             fix="apply instance_filter once")
        self.filter = filters[0] if filters else None
        self.threshold = ThresholdState(threshold, a1, a2, window)
        self.total_flops = 0
        self._flops = self._flop_counter() if count_flops else None

    def _flop_counter(self) -> Callable[[tuple, int, int], int]:
        """A fast function (inputs, kept count, batch size) -> FLOPs of the step, from the symbolic cost."""
        info = graph_info(self.model)
        expression = training_step_flops(self.model, kept_ratio=KEPT_RATIO)
        names = list(info.symbolic)
        evaluate = sympy.lambdify([KEPT_RATIO] + [symbol(n) for n in names], expression, modules=["math"])

        def count(inputs: tuple, kept: int, batch: int) -> int:
            sizes = [inputs[info.spec.dims[n][0]].shape[info.spec.dims[n][1]] for n in names]
            return int(round(evaluate(kept / batch, *sizes)))

        return count

    def step(self, inputs: Tensor | Sequence[Tensor], target: Tensor) -> StepResult:
        """One training step on a batch; returns the loss, the kept indices and the step's FLOPs."""
        inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        self.model.train()
        outputs = self.model(*inputs)
        if self.filter is not None:
            kept, batch = self.filter.kept, self.filter.predicted_high.numel()
        else:
            batch = inputs[0].shape[0]
            kept = torch.arange(batch, device=inputs[0].device)
        losses = self.loss(outputs, target.index_select(0, kept.to(target.device)))
        if losses.dim() != 1 or losses.shape[0] != kept.numel():
            raise InputError(f"the loss returned shape {tuple(losses.shape)}, not one loss per kept instance "
                             f"({kept.numel()},)", where="OnDeviceTrainer(loss=...)",
                             fix="use reduction='none', e.g. F.cross_entropy(output, target, reduction='none')")
        main_loss = self.filter.batch_loss(losses) if self.filter is not None else losses.mean()
        result = StepResult(main_loss.item(), kept, batch, 0)
        total = main_loss
        if self.filter is not None:
            total = total + self._filter_loss(losses.detach(), result)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        if self._flops is not None:
            result.flops = self._flops(inputs, kept.numel(), batch)
            self.total_flops += result.flops
        return result

    def _filter_loss(self, losses: Tensor, result: StepResult) -> Tensor:
        """Label the kept instances by T_l, weighted CE on the filter's logits, then adapt T_l.

        With ``reweight``, each uncertainty-sampled instance stands for all the predicted-Low instances
        (weight #Low / #sampled) in the High ratio and the filter loss, so both describe the whole batch
        rather than the kept part, which the filter chose to be rich in High instances.
        """
        ratio = self.filter.target_high_ratio
        state = self.threshold
        if state.value is None:
            state.value = max(float(torch.quantile(losses.float(), 1 - ratio)), 1e-8)
        labels = (losses >= state.value).long()
        importance = torch.ones_like(losses, dtype=torch.float32)
        if self.reweight:
            predicted_high = self.filter.predicted_high.index_select(0, result.kept)
            sampled = int((~predicted_high).sum())
            if sampled:
                low = int((~self.filter.predicted_high).sum())
                importance = importance.masked_fill(~predicted_high, low / sampled)
        class_weights = torch.tensor([1 / (1 - ratio), 1 / ratio], device=losses.device)
        weights = class_weights[labels] * importance
        logits = self.filter.logits.index_select(0, result.kept).float()
        filter_loss = (F.cross_entropy(logits, labels, reduction="none") * weights).sum() / weights.sum()
        high = float((importance * labels).sum())
        result.high_ratio = state.update(high, float(importance.sum()), ratio)
        result.threshold, result.filter_loss, result.forced = state.value, filter_loss.item(), self.filter.forced
        if self.filter.forced:
            result.note = (f"the filter predicted all {result.batch_size} instances Low; kept "
                           f"{result.kept.numel()} (uncertainty sampling / min_keep)")
        return filter_loss

    def fit(self, batches: Iterable[tuple], *, epochs: int = 1, progress: bool = True,
            description: str = "training") -> list[StepResult]:
        """Train over ``batches`` (an iterable of (inputs, targets), re-iterated each epoch) with a progress bar."""
        results: list[StepResult] = []
        for epoch in range(epochs):
            bar = tqdm(batches, desc=f"{description} {epoch + 1}/{epochs}", disable=not progress, leave=False)
            for inputs, target in bar:
                result = self.step(inputs, target)
                results.append(result)
                postfix = {"loss": f"{result.loss:.3f}", "kept": f"{result.kept.numel()}/{result.batch_size}"}
                if result.threshold is not None:
                    postfix["T_l"] = f"{result.threshold:.3g}"
                bar.set_postfix(postfix, refresh=False)
        return results


__all__ = ["KEEP", "KEPT_RATIO", "OnDeviceTrainer", "StepResult", "per_instance_cross_entropy", "training_step_flops"]
