"""structured_dropout: LSTMs and Dropout -> Linear chains whose training GEMMs skip the dropped units.

Sarma et al. (NeurIPS 2021): if one dropout mask is shared by every sample of the batch, the dropped
units' weight columns can be left out of the forward and of both backward GEMMs. The pass swaps each
torch.nn.LSTM (with the Dropout that feeds it, and its between-layer dropout) for a
StructuredDropoutLSTM, and each Dropout feeding only a Linear (e.g. the decoder) for a
StructuredDropoutLinear. Eval mode computes exactly what the original computed; in training the outputs
and gradients equal a dense model applying the same explicit masks (the contract checked below).
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
from ..cost_models import certify
from ..errors import UnsupportedError
from ..graph import Layer, bypass, find_chains, find_layers, only_user, replace_layer
from ..modules.structured_dropout import (MODES, StructuredDropoutLinear, StructuredDropoutLSTM, check_settings,
                                          keep_count)
from ..testing.kit import compare_outputs, run_eval, seeded_gradients
from .base import Contract, LayerSelection, Pass, PassOutcome, Rewrite, Skipped, option, register

CHECK_SEED = 1234


@dataclass
class StructuredDropoutOptions(LayerSelection):
    p: float = option(0.5, "dropout probability of every mask (k = round((1-p) * width) units kept, scaled by "
                           "1/(1-p))", check=("0 <= p < 1", lambda value: 0 <= value < 1))
    mode: str = option("per_step", "per_step: a uniform k-subset per time step (the paper); per_sequence: one per "
                                   "sequence; per_step_window: per step a random cyclic window of k units in a "
                                   "per-sequence permutation (faster, not uniform over subsets)",
                       check=(" or ".join(MODES), lambda value: value in MODES))
    offsets: int = option(None, "per_step_window only: None lets a window start anywhere in the permutation; m "
                                "lets it start at one of m evenly spaced places, so steps sharing a start run "
                                "their input, decoder and weight-gradient GEMMs together (faster)",
                          check=("an int >= 1", lambda value: isinstance(value, int) and value >= 1))
    recurrent: bool = option(False, "also drop units of the recurrent state h feeding W_hh (same p)")
    seed: int = option(0, "seed of the masks; data-parallel ranks with the same seed draw the same masks")

    def __post_init__(self) -> None:
        check_settings(self.p, self.mode, "structured_dropout", self.offsets)

    def describe_masks(self) -> str:
        return self.mode if self.offsets is None else f"{self.mode}, {self.offsets} offsets"


def _training_certificate(module: nn.Module, source: fx.Node) -> str:
    """The training-step MACs of the rewritten GEMMs, dense (3x the forward) vs compacted, certified."""
    shape = meta.shape(source)
    if shape is None:
        return ""
    shapes = (tuple(shape),)
    dense = sympy.expand(3 * sympy.Add(*map(sympy.sympify, module.fxreduce_macs(shapes, training=False).values())))
    compact = sympy.expand(sympy.Add(*map(sympy.sympify, module.fxreduce_macs(shapes, training=True).values())))
    ratio = sympy.simplify(dense / compact)
    speedup = f" ({float(ratio):.2f}x fewer)" if ratio.is_number else ""
    return f"; training-step MACs {dense} -> {compact}{speedup}, {certify(dense, compact, metric='training MACs')}"


def _structured_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (StructuredDropoutLSTM, StructuredDropoutLinear))]


def _sole_use(gm: fx.GraphModule, linear: Layer) -> bool:
    """Whether this layer is the only use of its weight in the graph (no tied layer, no second call of the
    module, no other read of the parameter): only then may the rewrite give it a weight of its own layout."""
    if linear.tied_with or linear.parameter is None:
        return False
    uses = 0
    for node in gm.graph.nodes:
        if node.op == "call_module":
            uses += any(p is linear.parameter for p in gm.get_submodule(node.target).parameters())
        elif node.op == "get_attr":
            uses += operator.attrgetter(node.target)(gm) is linear.parameter
    return uses == 1


def _lstm_layers(gm: fx.GraphModule) -> list[Layer]:
    """nn.LSTM layers, and fxreduce's decomposed LSTMs (after decompose_lstm) not yet given masks."""
    return [layer for layer in find_layers(gm, ["lstm"]) if not isinstance(layer.module, StructuredDropoutLSTM)]


def _time_dim(gm: fx.GraphModule, dropout: Layer) -> int | None:
    """The sequence axis of the dropout's input when it is an LSTM's output (``output, _ = lstm(x)``):
    1 for a batch_first LSTM, else 0; None when the input is not known to be a sequence."""
    source = dropout.input
    if not (source.op == "call_function" and source.target is operator.getitem and source.args[1] == 0):
        return None
    for lstm in _lstm_layers(gm):
        if lstm.node is source.args[0] and lstm.module is not None:
            return 1 if lstm.module.batch_first else 0
    return None


def _feeding_dropout(gm: fx.GraphModule, lstm: Layer) -> Layer | None:
    """The dropout whose only user is this LSTM (its input dropout), if any."""
    source = lstm.input
    for dropout in find_layers(gm, ["dropout"]):
        if dropout.result is source and only_user(source) is lstm.node:
            return dropout
    return None


@register
class StructuredDropout(Pass):
    name = "structured_dropout"
    summary = "batch-shared dropout masks on LSTMs and Dropout->Linear chains: training GEMMs skip dropped units"
    contract = Contract("reference", "eval outputs equal the original's; in training, outputs and parameter "
                                     "gradients equal a dense model applying the same explicit batch-shared masks "
                                     "(same seed)", tolerance=1e-6)
    Options = StructuredDropoutOptions
    needs = frozenset({"dropout", "lstm"})
    invalidates = frozenset({"dropout"})

    def rewrite(self, gm: fx.GraphModule, outcome: PassOutcome) -> None:
        o = self.options
        salt = 0
        for dropout, linear in find_chains(gm, ("dropout", "linear")):
            if not o.selects(linear):
                continue
            if linear.weight is None:
                outcome.skipped.append(Skipped(linear.name, "its weight is computed in the graph; only parameter "
                                                            "weights are compacted"))
                continue
            if linear.why_shared(keeps_weight=True):
                outcome.skipped.append(Skipped(linear.name, linear.why_shared(keeps_weight=True)))
                continue
            salt += 1
            time_dim = _time_dim(gm, dropout)
            module = StructuredDropoutLinear.from_linear(linear.as_linear(), p=o.p, seed=o.seed + salt, mode=o.mode,
                                                         time_dim=time_dim, offsets=o.offsets,
                                                         store_transposed=_sole_use(gm, linear))
            per_step = o.mode != "per_sequence" and time_dim is not None
            sets = f"per time step ({o.describe_masks()})" if per_step else "per call"
            replaced = [dropout.node.name, linear.node.name]
            certificate = _training_certificate(module, dropout.input)
            bypass(gm, dropout)
            new = replace_layer(gm, linear, module, pass_name=self.name)
            outcome.rewrites.append(Rewrite(replaced, [new.name], f"Dropout -> Linear: in training a batch-shared "
                                            f"keep set of {module.kept} of {module.in_features} input units {sets} "
                                            f"(p={o.p:g}){certificate}", self.contract))
        for layer in _lstm_layers(gm):
            if not o.selects(layer):
                continue
            reason = self._why_not(layer)
            if reason:
                outcome.skipped.append(Skipped(layer.node.name, reason))
                continue
            source = layer.module if isinstance(layer.module, nn.LSTM) else layer.module.to_torch()
            dropout = _feeding_dropout(gm, layer)
            salt += 1
            module = StructuredDropoutLSTM.from_lstm(source, p=o.p, mode=o.mode, recurrent=o.recurrent,
                                                     mask_input=dropout is not None, seed=o.seed + salt,
                                                     offsets=o.offsets)
            widths = [w for pair in module.mask_widths().values() for w in pair if w is not None]
            if not widths:
                outcome.skipped.append(Skipped(layer.node.name, "no dropout feeds it, it has no between-layer "
                                                                "dropout and recurrent=False: nothing to drop"))
                continue
            replaced = [layer.node.name]
            certificate = _training_certificate(module, layer.input)
            if dropout is not None:
                replaced.insert(0, dropout.node.name)
                bypass(gm, dropout)
            new = replace_layer(gm, layer, module, pass_name=self.name, args=tuple(layer.node.args),
                                kwargs=dict(layer.node.kwargs))
            what = "; ".join(f"layer {n}: " + ", ".join(f"{name} {keep_count(o.p, w)} of {w}"
                                                         for name, w in zip(("input", "h"), pair) if w is not None)
                             for n, pair in module.mask_widths().items() if any(w is not None for w in pair))
            outcome.rewrites.append(Rewrite(replaced, [new.name], f"LSTM with structured dropout "
                                            f"({o.describe_masks()}, p={o.p:g}) keeping {what}{certificate}",
                                            self.contract))

    @staticmethod
    def _why_not(layer: Layer) -> str | None:
        reason = layer.why_not_decomposable()
        if reason:
            return reason
        module = layer.module
        if not isinstance(module, nn.LSTM):
            try:
                module.to_torch()
            except UnsupportedError:
                return "its projections were replaced by modules without gemm_factors(); drop before compressing"
        return None

    def check(self, before: fx.GraphModule, after: fx.GraphModule, inputs: tuple) -> str | None:
        """Eval outputs equal the original's; training outputs and gradients equal the masked dense reference."""
        failure = compare_outputs(run_eval(before, inputs), run_eval(after, inputs), 1e-4)
        if failure:
            return f"eval: {failure}"
        return check_against_reference(after, inputs, self.contract.tolerance)


def check_against_reference(after: nn.Module, inputs: tuple, tolerance: float) -> str | None:
    """One training forward + backward of ``after`` (float64) vs the same model computing its masks densely.

    Both copies start with the same mask draws; every other random op is seeded alike. Also checks that
    weight columns no mask kept at any step get exactly zero gradient.
    """
    fast, reference = (copy.deepcopy(after).double() for _ in range(2))
    for module in _structured_modules(reference):
        module.reference = True
    inputs = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
    output, grads = seeded_gradients(fast, inputs, CHECK_SEED)
    expected_output, expected_grads = seeded_gradients(reference, inputs, CHECK_SEED)
    failure = compare_outputs(expected_output, output, tolerance)
    if failure:
        return f"training outputs vs the dense masked reference: {failure}"
    failure = compare_outputs(expected_grads, grads, tolerance)
    if failure:
        return f"training gradients vs the dense masked reference: {failure}"
    return _dropped_columns_nonzero(fast, grads)


def _dropped_columns_nonzero(model: nn.Module, grads: dict[str, torch.Tensor]) -> str | None:
    """The name of a weight whose never-kept input columns got a non-zero gradient, else None."""
    for prefix, module in model.named_modules():
        prefix = prefix + "." if prefix else ""
        if isinstance(module, StructuredDropoutLinear):
            sets = {"weight": module.last_keep_set}
        elif isinstance(module, StructuredDropoutLSTM):
            sets = {f"weight_{kind}_l{layer}{suffix}": keep
                    for layer, pair in module.last_keep_sets.items() for kind, keep in zip(("ih", "hh"), pair)
                    for suffix in (("", "_reverse") if module.bidirectional else ("",))}
        else:
            continue
        for name, keep in sets.items():
            if keep is None or prefix + name not in grads:
                continue
            grad = grads[prefix + name]
            dropped = torch.ones(grad.shape[1], dtype=torch.bool)
            dropped[keep.index.flatten()] = False
            if bool(grad[:, dropped].ne(0).any()):
                return f"{prefix}{name}: columns of units no mask kept have non-zero gradients"
    return None
