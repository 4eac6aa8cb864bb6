"""sparse_lowrank: AntMan's factorisation of Linear layers and LSTM gate matrices (arXiv 1910.01740).

Each selected weight W (out x in) becomes one of fxreduce.modules.factorized's modules — low-rank
``U(Vx)``, block-diagonal, or their sparse x low-rank compositions — initialised by truncation, with
its rank chosen by one sizing rule: a rank, a rank ratio, a kept spectral energy, a per-layer FLOP
reduction (the rank is solved from the module's sympy MAC formula) or a whole-model FLOP reduction
(ranks shared out evenly, or allocated over the layers the pass can reach to minimise the summed relative
truncation error or the summed output divergence each layer's truncation causes on calibration data).
Truncation is plain (closest in weight norms) or, given calibration inputs, whitened by each layer's input
second moment X X^T (closest on those inputs: fxreduce.calibration collects the statistics,
fxreduce.modules.truncation does the algebra from one Gram eigen-decomposition per weight). LSTMs are
rewritten through fxreduce's decomposed LSTM: an ``nn.LSTM`` is converted here (LSTM.from_torch, the
conversion decompose_lstm makes; the pipeline does not insert passes, so this pass needs none before
it), then each of its gate projections is swapped with ``set_projection``.

A layer whose chosen rank would not cost less than the dense product (r >= m n / (m + n) for the
low-rank form) is left alone and the report says why. Every rewrite states its weight error
e = ||W - W'||_2 (sigma_{r+1} for a plain rank-r truncation), the bound its contract promises, and with
calibration its data error ||(W - W') X||_F / ||W X||_F on the calibration inputs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx
from torch import Tensor, nn

from tqdm.auto import tqdm

from .. import meta
from ..calibration import SecondMoment, as_calibration, is_calibration, load_calibration, run_calibration
from ..cost_models import graph_cost, graph_info, symbol
from ..errors import OptionError
from ..graph import find_layers, replace_layer
from ..cost_models.latency import Profile, module_seconds
from ..modules.factorized import FORMS, GroupLinear, LowRankLinear, SparseLowRankLinear, factorize, macs_per_row
from ..modules.lstm import DecomposedLSTM
from ..modules.truncation import DEFAULT_DAMPING, Truncation, data_error, spectral_norm
from ..sensitivity import DIVERGENCES, OutputDivergence
from ..testing.kit import capture_calls, run_eval
from .base import Contract, LatencyObjective, LayerSelection, Pass, PassOutcome, Rewrite, Skipped, option, register

GROUPED_FACTORS = {"lr": (), "group": ("in", "out"), "sparse_lr": ("in",), "lr_sparse": ("out",),
                   "grouped_shuffle": ("in", "out")}
ALLOCATIONS = ("even", "global", "sensitivity")
LADDER_STEP = 2 ** 0.5  # allocation='sensitivity' measures ranks 1, 2, 3, 4, 6, 8, 11, ... (and the even rank)
SIZINGS = ("rank", "rank_ratio", "energy", "flop_reduction", "model_flop_reduction")
DEFAULT_FLOP_REDUCTION = 4.0
OVERSHOOT = 1.25  # objective='latency' compares forms whose MAC cut is at most this many times the one asked for
# objective='latency' leaves the form option's choice for another form only when that one is predicted this many
# times faster: a smaller predicted gain is within the latency model's error (docs/cost-model.md), and a
# switch on it trades a known form for a coin toss.
SWITCH_MARGIN = 1.2


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SparseLowRankOptions(LatencyObjective, LayerSelection):
    form: str = option("lr", f"module family: {', '.join(FORMS)}", check=(f"one of {', '.join(FORMS)}",
                                                                          lambda v: v in FORMS))
    rank: int = option(None, "the rank r of every rewritten layer", check=("an int >= 1", _positive_int))
    rank_ratio: float = option(None, "r = rank_ratio * min(in, out), rounded",
                               check=("a number in (0, 1]", lambda v: _number(v) and 0 < v <= 1))
    energy: float = option(None, "smallest r keeping this share of W's squared singular values",
                           check=("a number in (0, 1]", lambda v: _number(v) and 0 < v <= 1))
    flop_reduction: float = option(None, "per rewritten layer: at least this many times fewer MACs, the largest "
                                         f"rank that meets it (the default, {DEFAULT_FLOP_REDUCTION:g}, when no "
                                         "sizing is given)", check=("a number > 1", lambda v: _number(v) and v > 1))
    model_flop_reduction: float = option(None, "whole model: at least this many times fewer MACs, shared out as one "
                                               "per-layer reduction over the layers the pass can reach",
                                         check=("a number > 1", lambda v: _number(v) and v > 1))
    groups: int = option(1, "blocks of the grouped factors (must divide their dims; form 'group' with "
                            "flop_reduction chooses it)", check=("an int >= 1", _positive_int))
    types: tuple = option(("linear", "lstm"), "layer types to rewrite: 'linear' and/or 'lstm'",
                          check=("a non-empty subset of ('linear', 'lstm')",
                                 lambda v: bool(v) and set(v) <= {"linear", "lstm"}))
    min_size: int = option(0, "leave weights with fewer than this many elements alone",
                           check=("an int >= 0", lambda v: isinstance(v, int) and v >= 0))
    calibration: object = option(None, "inputs whose layer statistics X X^T whiten the truncation: a file saved "
                                       "with torch.save (a tensor or a tuple of input tensors, or a list of "
                                       "those), or tensors in Python (the CLI: --calibration FILE)",
                                 check=("a file path, tensors, or None", is_calibration))
    method: str = option(None, "'whitened' (the rank-r W' closest on the calibration inputs; the default when "
                               "calibration is given) or 'svd' (closest in weight norms; the default without)",
                         check=("'whitened', 'svd' or None", lambda v: v in (None, "whitened", "svd")))
    damping: float = option(DEFAULT_DAMPING, "ridge added to X X^T where a solve needs it (a Cholesky factor, a "
                                             "grouped block's fit), relative to its mean diagonal",
                            check=("a number in (0, 1)", lambda v: _number(v) and 0 < v < 1))
    allocation: str = option("even", "model_flop_reduction's ranks: 'even' (one per-layer reduction for every "
                                     "layer), 'global' (form 'lr': minimise the summed relative truncation "
                                     "error under the MAC budget; measured to lose perplexity against even "
                                     "ranks on both example LMs, docs/antman.md) or 'sensitivity' (form 'lr', "
                                     "calibration: minimise the summed output divergence each layer's "
                                     "truncation alone causes on the calibration inputs, measured over a "
                                     "ladder of ranks; kept only where its joint divergence beats even ranks')",
                             check=("'even', 'global' or 'sensitivity'", lambda v: v in ALLOCATIONS))
    divergence: str = option(None, "allocation='sensitivity''s measure of the model output's change: "
                                   "'relative_squared' (sum ||y' - y||^2 / sum ||y||^2; the default) or 'kl' "
                                   "(KL of softmax over the output's last dim, for logits)",
                             check=(f"one of {', '.join(DIVERGENCES)}, or None", lambda v: v in (None, *DIVERGENCES)))

    def __post_init__(self) -> None:
        given = [name for name in SIZINGS if getattr(self, name) is not None]
        if len(given) > 1:
            raise OptionError(f"sparse_lowrank takes one sizing rule, got {' and '.join(given)}",
                              where="sparse_lowrank(...)", fix=f"give one of {', '.join(SIZINGS)}")
        if not given:
            self.flop_reduction = DEFAULT_FLOP_REDUCTION
        self.calibration = as_calibration(self.calibration, "sparse_lowrank(calibration=...)")
        if self.method is None:
            self.method = "svd" if self.calibration is None else "whitened"
        if self.method == "whitened" and self.calibration is None:
            raise OptionError("method='whitened' needs calibration inputs", where="sparse_lowrank(...)",
                              fix="give calibration='inputs.pt' (or tensors; the CLI's --calibration FILE), "
                                  "or method='svd'")
        if self.objective == "latency" and not (given == ["flop_reduction"] or not given
                                                 or given == ["model_flop_reduction"]):
            raise OptionError(f"objective='latency' chooses the rank for a MAC reduction, but {given[0]} fixes it",
                              where="sparse_lowrank(objective='latency')",
                              fix="size it with flop_reduction or model_flop_reduction")
        if self.objective == "latency" and self.allocation != "even":
            raise OptionError("objective='latency' picks each layer's form by its own predicted time; "
                              f"allocation={self.allocation!r} spends one rank budget across layers",
                              where="sparse_lowrank(objective='latency')", fix="use allocation='even'")
        if self.allocation != "even" and self.form != "lr":
            raise OptionError(f"allocation={self.allocation!r} ranks the truncations of one factorisation; form "
                              f"{self.form!r} truncates block by block", where=f"sparse_lowrank(form={self.form!r})",
                              fix=f"use form='lr' for allocation={self.allocation!r}, or allocation='even'")
        if self.allocation == "sensitivity" and self.calibration is None:
            raise OptionError("allocation='sensitivity' measures the model's output on calibration inputs, and "
                              "none were given", where="sparse_lowrank(allocation='sensitivity')",
                              fix="give calibration='inputs.pt' (or tensors; the CLI's --calibration FILE)")
        if self.divergence is not None and self.allocation != "sensitivity":
            raise OptionError(f"divergence={self.divergence!r} is the measure of allocation='sensitivity', but "
                              f"allocation={self.allocation!r}",
                              where=f"sparse_lowrank(divergence={self.divergence!r})",
                              fix="add allocation='sensitivity' (with model_flop_reduction), or drop divergence")
        if self.allocation == "sensitivity" and self.divergence is None:
            self.divergence = "relative_squared"
        if self.form == "group":
            if set(given) & {"rank", "rank_ratio", "energy"}:
                raise OptionError(f"form 'group' has no rank, got {given[0]}", where="sparse_lowrank(form='group')",
                                  fix="size it with groups=G or flop_reduction / model_flop_reduction")
            if given == [] and self.groups > 1:
                self.flop_reduction = None


@dataclass
class Slot:
    """One weight matrix the pass can rewrite: a Linear layer, or one gate projection of an LSTM."""

    name: str
    weight: Tensor
    bias: Tensor | None
    rows: float  # input rows per call at the example sizes
    node: fx.Node
    projection: tuple[str, int, bool] | None = None  # (kind, layer, reverse) of an LSTM
    moment: SecondMoment | None = None  # its inputs' X X^T on the calibration set (whitened method)

    @property
    def dense_macs(self) -> float:
        return self.rows * self.weight.shape[0] * self.weight.shape[1]


@dataclass
class Choice:
    rank: int | None
    groups: int
    why: str = ""  # the global allocation's or the latency objective's reason for this choice
    form: str | None = None  # None: the pass's form option

    def describe(self, form: str) -> str:
        form = self.form or form
        parts = [form] + ([f"r={self.rank}"] if self.rank is not None else []) + (
            [f"g={self.groups}"] if self.groups > 1 or form == "group" else [])
        return " ".join(parts)


def _shaped(form: str, n: int, m: int, choice: Choice, bias: bool) -> nn.Module:
    """A module of ``form`` with the chosen sizes (any values: the latency model prices shapes)."""
    if form == "lr":
        return LowRankLinear(n, m, choice.rank, bias)
    if form == "group":
        return GroupLinear(n, m, choice.groups, bias)
    return SparseLowRankLinear(n, m, choice.rank, choice.groups, form, bias)


def _slot_name(kind: str, layer: int, reverse: bool) -> str:
    return f"{kind}_l{layer}{'_reverse' if reverse else ''}"


def _lstm_slots(lstm: nn.Module) -> list[tuple[str, int, bool]]:
    directions = (False, True) if lstm.bidirectional else (False,)
    return [(kind, layer, reverse) for layer in range(lstm.num_layers) for reverse in directions
            for kind in ("ih", "hh")]


def _dense_projection(lstm: nn.Module, kind: str, layer: int, reverse: bool) -> tuple[Tensor, Tensor | None] | None:
    """The dense weight and bias of one gate projection, or None when it is already replaced."""
    name = _slot_name(kind, layer, reverse)
    if isinstance(lstm, DecomposedLSTM):
        projection = lstm.projection(kind, layer, reverse)
        if type(projection) is not nn.Linear:
            return None
        return projection.weight, projection.bias
    return getattr(lstm, "weight_" + name), getattr(lstm, "bias_" + name, None)


class _Rows:
    """Rows of a layer input at the example sizes: product of its leading dims."""

    def __init__(self, gm: fx.GraphModule):
        info = graph_info(gm)
        self.values = {symbol(name): info.spec.hint(name) for name in info.symbolic}

    def __call__(self, node: fx.Node, leading: int | None = None) -> float:
        shape = meta.shape(node)
        shape = shape if isinstance(shape, tuple) else ()
        dims = shape[:-1] if leading is None else shape[:leading]
        rows = sympy.Integer(1)
        for size in dims:
            rows = rows * sympy.sympify(size)
        return float(rows.subs(self.values))


def _projection_weights(lstm: nn.Module, kind: str, layer: int, reverse: bool) -> tuple[Tensor, Tensor | None]:
    """The weight (dense, multiplied out if factorised) and bias of one gate projection."""
    if isinstance(lstm, DecomposedLSTM):
        projection = lstm.projection(kind, layer, reverse)
        weight = projection.weight if type(projection) is nn.Linear else projection.dense_weight()
        return weight.detach(), None if projection.bias is None else projection.bias.detach()
    name = _slot_name(kind, layer, reverse)
    bias = getattr(lstm, "bias_" + name, None)
    return getattr(lstm, "weight_" + name).detach(), None if bias is None else bias.detach()


def gate_inputs(lstm: nn.Module, x: Tensor) -> dict[tuple[str, int, bool], Tensor]:
    """What each gate projection of ``lstm`` reads over the sequence ``x`` (eval mode, zero initial state):
    the layer's input for ih, the previous step's hidden state for hh."""
    seq = x.unsqueeze(0) if x.dim() == 2 else (x if lstm.batch_first else x.transpose(0, 1))
    seq = seq.double()
    hidden = lstm.hidden_size
    inputs: dict[tuple[str, int, bool], Tensor] = {}
    directions = (False, True) if lstm.bidirectional else (False,)
    for layer in range(lstm.num_layers):
        outputs = []
        for reverse in directions:
            (w_ih, b_ih), (w_hh, b_hh) = (_projection_weights(lstm, kind, layer, reverse) for kind in ("ih", "hh"))
            steps = seq.flip(1) if reverse else seq
            pre = steps @ w_ih.double().T + (0 if b_ih is None else b_ih.double())
            h = seq.new_zeros(seq.shape[0], hidden)
            c = torch.zeros_like(h)
            states = []
            for t in range(seq.shape[1]):
                gates = pre[:, t] + h @ w_hh.double().T + (0 if b_hh is None else b_hh.double())
                i, f, g, o = gates.chunk(4, -1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                states.append(h)
            out = torch.stack(states, 1)
            inputs[("ih", layer, reverse)] = seq
            inputs[("hh", layer, reverse)] = torch.cat([out.new_zeros(out.shape[0], 1, hidden), out[:, :-1]], 1)
            outputs.append(out.flip(1) if reverse else out)
        seq = torch.cat(outputs, -1)
    return inputs


def _break_even(form: str, m: int, n: int, groups: int) -> sympy.Expr:
    """The rank at which ``form`` costs as much as the dense product (the cost model solves it)."""
    r = sympy.Symbol("r", positive=True)
    return sympy.solve(sympy.Eq(macs_per_row(form, n, m, r, groups), m * n), r)[0]


def _multiple_at_most(value: float, step: int) -> int:
    return int(math.floor(value / step + 1e-9)) * step


@register
class SparseLowRank(Pass):
    name = "sparse_lowrank"
    summary = "AntMan: Linear layers and LSTM gate matrices -> low-rank / grouped / sparse x low-rank modules (SVD init)"
    contract = Contract("bounded", "each rewritten weight W' (its module's to_dense()) satisfies ||W x - W' x|| <= "
                                   "e ||x|| for every x, with e = ||W - W'||_2 as the report states (sigma_{r+1}(W) "
                                   "for a rank-r truncation; 0 at full rank with groups=1), and each module "
                                   "computes its own to_dense(); with calibration inputs X, each rewrite's "
                                   "||(W - W') X||_F / ||W X||_F on them is as the report states (for form 'lr' "
                                   "the smallest of any rank-r W')", tolerance=1e-4)
    Options = SparseLowRankOptions
    needs = frozenset({"linear", "lstm"})
    invalidates = frozenset({"linear"})

    def rewrite(self, gm: fx.GraphModule, outcome: PassOutcome) -> None:
        options = self.options
        slots, lstm_nodes = self._slots(gm, outcome)
        self._truncations: dict[str, Truncation] = {}
        if options.method == "whitened":
            self._collect(gm, slots)
        reduction = options.flop_reduction
        if options.model_flop_reduction is not None:
            reduction = self._per_layer_reduction(gm, slots)
        choices = {}
        if options.model_flop_reduction is not None and options.allocation != "even":
            choices = self._allocate(gm, slots, reduction, outcome)
        else:
            profile = options.latency_profile()
            for slot in slots:
                choice = self._choose(slot, reduction) if profile is None else self._fastest(slot, reduction, profile)
                if isinstance(choice, str):
                    outcome.skipped.append(Skipped(slot.name, choice))
                else:
                    choices[slot.name] = choice
        progress = tqdm(total=len(choices), desc="sparse_lowrank", unit="layer", leave=False,
                        disable=len(choices) < 4 or None)
        for slot in slots:
            if slot.projection is None and slot.name in choices:
                self._rewrite_linear(gm, slot, choices[slot.name], outcome)
                progress.update()
        for node, slot_list in lstm_nodes.items():
            chosen = [slot for slot in slot_list if slot.name in choices]
            if chosen:
                self._rewrite_lstm(gm, node, chosen, choices, outcome)
                progress.update(len(chosen))
        progress.close()

    def _truncation(self, slot: Slot, rank: int | None = None) -> Truncation:
        """The slot's (whitened) Gram decomposition, made once and shared by sizing, allocation and factors:
        of every rank, or, where only ``rank`` is needed, of ranks up to it (much faster on big layers)."""
        made = self._truncations.get(slot.name)
        if made is None or (made.count < made.size and (rank is None or rank >= made.count)):
            moment = None if slot.moment is None else slot.moment.gram
            made = self._truncations[slot.name] = Truncation(slot.weight, moment, self.options.damping, rank)
        return made

    def _collect(self, gm: fx.GraphModule, slots: list[Slot]) -> None:
        """Each slot's input second moment X X^T over the calibration batches (streamed, float64)."""
        where = "sparse_lowrank(calibration=...)"
        batches, source = load_calibration(self.options.calibration, where,
                                           "torch.save a batch (or a list of batches) of real inputs to that path")
        layer_inputs = {layer.node: layer.input for layer in find_layers(gm, ["linear"])}
        linear: dict[fx.Node, SecondMoment] = {}
        lstms: dict[fx.Node, list[tuple[fx.Node, Slot]]] = {}
        for slot in slots:
            n = slot.weight.shape[1]
            if slot.projection is None:
                slot.moment = linear.setdefault(layer_inputs[slot.node], SecondMoment(n, f"layer {slot.name}"))
            else:
                slot.moment = SecondMoment(n, f"LSTM gate {slot.name}")
                lstms.setdefault(slot.node.args[0], []).append((slot.node, slot))

        def on_value(node: fx.Node, value, batch: int) -> None:
            if node in linear:
                linear[node].add(value, batch)
            gates: dict[fx.Node, dict] = {}
            for lstm_node, slot in lstms.get(node, []):
                if lstm_node not in gates:
                    gates[lstm_node] = gate_inputs(gm.get_submodule(lstm_node.target), value)
                slot.moment.add(gates[lstm_node][slot.projection], batch)

        run_calibration(gm, batches, source, set(linear) | set(lstms), on_value)
        self._calibration_source = source
        for slot in slots:
            if slot.moment.rows == 0:
                raise OptionError(f"no calibration batch reached {slot.name}", where=source,
                                  fix="give inputs that run through every layer, or leave the layer out (layers=...)")

    def _slots(self, gm: fx.GraphModule, outcome: PassOutcome) -> tuple[list[Slot], dict[fx.Node, list[Slot]]]:
        options, rows = self.options, _Rows(gm)
        slots: list[Slot] = []
        lstm_nodes: dict[fx.Node, list[Slot]] = {}

        if "linear" in options.types:
            for layer in find_layers(gm, ["linear"]):
                if not options.selects(layer):
                    continue
                if layer.weight is None:
                    outcome.skipped.append(Skipped(layer.name, "its weight is computed in the graph; only "
                                                               "parameter weights are factorised"))
                    continue
                if layer.why_shared():
                    outcome.skipped.append(Skipped(layer.name, layer.why_shared()))
                    continue
                slots.append(Slot(layer.name, layer.weight.detach(), None if layer.bias is None else
                                  layer.bias.detach(), rows(layer.input), layer.node))
        if "lstm" in options.types:
            for lstm in find_layers(gm, ["lstm"]):
                reason = lstm.why_not_decomposable()
                if reason:
                    outcome.skipped.append(Skipped(lstm.node.name, reason))
                    continue
                node, module = lstm.node, lstm.module
                seq_rows = rows(node.args[0], leading=2)
                for kind, layer, reverse in _lstm_slots(module):
                    name = f"{node.target}.{_slot_name(kind, layer, reverse)}"
                    if not options.selects(lstm, name):
                        continue
                    dense = _dense_projection(module, kind, layer, reverse)
                    if dense is None:
                        outcome.skipped.append(Skipped(name, "already replaced by a non-dense projection"))
                        continue
                    weight, bias = dense
                    slot = Slot(name, weight.detach(), None if bias is None else bias.detach(), seq_rows, node,
                                (kind, layer, reverse))
                    slots.append(slot)
                    lstm_nodes.setdefault(node, []).append(slot)
        return slots, lstm_nodes

    def _per_layer_reduction(self, gm: fx.GraphModule, slots: list[Slot]) -> float:
        """One per-layer reduction rho with total / (unreachable + reachable / rho) = the model target."""
        target = self.options.model_flop_reduction
        info = graph_info(gm)
        total = float(graph_cost(gm).at(**{name: info.spec.hint(name) for name in info.symbolic}).macs)
        reachable = sum(slot.dense_macs for slot in slots if slot.weight.numel() >= self.options.min_size)
        unreachable = total - reachable
        where = f"sparse_lowrank(model_flop_reduction={target:g})"
        if reachable <= 0:
            raise OptionError("no layer this pass can rewrite was selected", where=where,
                              fix="check the layers / types / min_size options")
        budget = total / target - unreachable
        if budget <= 0:
            ceiling = total / unreachable
            raise OptionError(
                f"a {target:g}x smaller model is out of reach: the layers this pass can rewrite hold "
                f"{100 * reachable / total:.1f}% of the model's MACs, so even removing them entirely leaves "
                f"{ceiling:.2f}x (the rest, e.g. attention or convolutions, is not a Linear or LSTM gate matrix "
                f"this pass reaches)", where=where,
                fix=f"ask for less than {ceiling:.2f}x, or flop_reduction=... for a per-layer reduction")
        return reachable / budget

    def _unfit(self, slot: Slot) -> str | None:
        """Why no factorisation of this weight is considered, or None."""
        m, n = slot.weight.shape
        if slot.weight.numel() < self.options.min_size:
            return f"{m}x{n} weight is below min_size={self.options.min_size}"
        if not slot.weight.is_floating_point():
            return f"its weight is {slot.weight.dtype}; the factorised modules are floating point"
        return None

    def _allocate(self, gm: fx.GraphModule, slots: list[Slot], reduction: float,
                  outcome: PassOutcome) -> dict[str, Choice]:
        """Ranks for model_flop_reduction shared over the layers by one greedy rule on a per-layer error curve
        (``greedy_ranks``): every layer starts at rank 1, then steps along each curve's monotone lower
        envelope are taken in order of error removed per MAC added (rows x (in + out) a rank, the module's
        formula) while the model's MACs stay within total / target. 'global' reads the curve from the
        truncation (relative squared error at every rank); 'sensitivity' measures it on the model's output
        (``_sensitivity_curves``). The even ranks are the fallback: whichever allocation has the smaller error
        (summed for 'global', measured jointly for 'sensitivity') is used."""
        target, allocation = self.options.model_flop_reduction, self.options.allocation
        info = graph_info(gm)
        total = float(graph_cost(gm).at(**{name: info.spec.hint(name) for name in info.symbolic}).macs)
        eligible = []
        for slot in slots:
            reason = self._unfit(slot)
            if reason:
                outcome.skipped.append(Skipped(slot.name, reason))
            else:
                eligible.append(slot)
        budget = total / target - (total - sum(slot.dense_macs for slot in eligible))
        unit = {slot.name: slot.rows * sum(slot.weight.shape) for slot in eligible}
        caps = {slot.name: min(self._truncation(slot).max_rank,
                               (slot.weight.shape[0] * slot.weight.shape[1] - 1) // sum(slot.weight.shape))
                for slot in eligible}
        where = f"sparse_lowrank(model_flop_reduction={target:g})"
        if any(cap < 1 for cap in caps.values()) or sum(unit.values()) > budget:
            raise OptionError(f"no ranks meet a {target:g}x smaller model: rank 1 in every layer already costs "
                              f"more than the budget of {budget:.4g} MACs for the rewritable layers", where=where,
                              fix="ask for a smaller model_flop_reduction")
        even = {}
        for slot in eligible:
            try:
                choice = self._choose(slot, reduction)
            except OptionError:  # no even rank reaches this layer's share; the allocation still may
                choice = None
            even[slot.name] = choice.rank if isinstance(choice, Choice) else None
        if allocation == "global":
            kind = "data" if self.options.method == "whitened" else "Frobenius"
            measure = f"relative squared {kind} error"
            curves = {}
            for slot in eligible:
                truncation = self._truncation(slot)
                scale = truncation.total() or 1.0
                curves[slot.name] = {rank: truncation.squared_error(rank) / scale
                                     for rank in range(1, caps[slot.name] + 1)}
        else:
            measure = f"output divergence ({self.options.divergence})"
            divergence = self._output_divergence(gm)
            curves = self._sensitivity_curves(eligible, caps, even, divergence)
        ranks, envelopes, admitted = greedy_ranks(curves, unit, budget)
        complete = all(rank is not None for rank in even.values())
        if allocation == "global":
            def summed(chosen: dict[str, int | None]) -> float:
                return sum(curves[name][rank] for name, rank in chosen.items() if rank is not None)

            chosen_error, even_error = summed(ranks), summed(even)
            totals = f"summed {measure} {chosen_error:.4g} (global) vs {even_error:.4g} (even ranks)"
        else:
            for slot in eligible:  # ranks the fill moved off the ladder are measured alone too
                if ranks[slot.name] not in curves[slot.name]:
                    curves[slot.name][ranks[slot.name]] = divergence(self._swaps([slot], ranks))
            chosen_error = divergence(self._swaps(eligible, ranks))
            even_error = divergence(self._swaps(eligible, even)) if complete else float("inf")
            totals = (f"joint {measure} on {len(divergence.batches)} calibration batch(es) {chosen_error:.4g} "
                      f"(sensitivity ranks) vs " + (f"{even_error:.4g} (even ranks)" if complete else
                                                     "no even ranks (a layer's share is out of their reach)"))
        use_even = even_error < chosen_error and complete
        chosen = even if use_even else ranks
        summary = f"{'even ranks kept' if use_even else f'{allocation} allocation'}: {totals}"
        choices = {}
        for slot in eligible:
            name, rank = slot.name, chosen[slot.name]
            following = next(((end, rate) for _, end, rate in envelopes[name] if end > rank), None)
            step = (f"rank {following[0]} would remove {following[1]:.3g} of it per MAC" if following else
                    "no rank above it saves MACs")
            if allocation == "global":
                left = f"leaves {100 * math.sqrt(curves[name][rank]):.2f}% relative {kind} error"
            else:
                alone = curves[name].get(rank)
                left = (f"alone causes {measure} {alone:.4g}" if alone is not None else "not measured alone") + (
                    f" (even rank alone: {curves[name][even[name]]:.4g})" if even[name] in curves[name] else "")
            why = (f"{summary}; r={rank} (even: r={even[name]}) {left}; {step}, the last step taken removed "
                   f"{admitted:.3g}")
            choices[name] = Choice(rank, 1, why)
        return choices

    def _output_divergence(self, gm: fx.GraphModule) -> OutputDivergence:
        where = "sparse_lowrank(calibration=...)"
        batches, source = load_calibration(self.options.calibration, where,
                                           "torch.save a batch (or a list of batches) of real inputs to that path")
        return OutputDivergence(gm, batches, source, self.options.divergence)

    def _swaps(self, slots: list[Slot], ranks: dict[str, int | None]) -> dict[str, tuple[Tensor, Tensor]]:
        """Each slot's weight (the graph's own tensor) and its rank-r truncation, for OutputDivergence."""
        return {slot.name: (slot.weight, self._truncation(slot).dense(ranks[slot.name]).to(slot.weight.dtype))
                for slot in slots if ranks[slot.name] is not None}

    def _sensitivity_curves(self, slots: list[Slot], caps: dict[str, int], even: dict[str, int | None],
                            divergence: OutputDivergence) -> dict[str, dict[int, float]]:
        """Per layer, the output divergence of truncating that layer alone to each rank of a geometric ladder
        (1, 2, 3, 4, 6, 8, 11, ... up to the largest rank that saves MACs, and its even rank)."""
        ladders = {}
        for slot in slots:
            cap = caps[slot.name]
            ladder = {min(cap, round(LADDER_STEP ** step)) for step in range(int(math.log(cap, LADDER_STEP)) + 2)}
            ladders[slot.name] = sorted(ladder | ({even[slot.name]} if even[slot.name] else set()) | {cap})
        curves: dict[str, dict[int, float]] = {}
        with tqdm(total=sum(map(len, ladders.values())), desc="sparse_lowrank sensitivity", unit="measurement",
                  leave=False) as progress:
            for slot in slots:
                curves[slot.name] = {}
                for rank in ladders[slot.name]:
                    curves[slot.name][rank] = divergence(self._swaps([slot], {slot.name: rank}))
                    progress.update()
        return curves

    def _fastest(self, slot: Slot, reduction: float, profile: Profile) -> Choice | str:
        """objective='latency': of every form and group count that meets ``reduction`` without cutting more
        than OVERSHOOT times that (a deeper cut would buy time with accuracy), the one the profile predicts
        fastest at the example sizes, unless the form option's own choice is within SWITCH_MARGIN of it; a
        string (why) when none beats the dense layer."""
        m, n = slot.weight.shape
        shape = (max(int(round(slot.rows)), 1), n)
        dense = module_seconds(profile, nn.Linear(n, m, bias=slot.bias is not None), shape)
        timed = []
        for form in FORMS:
            for groups in [1] if form == "lr" else [g for g in (2, 4, 8, 16) if m % g == 0 and n % g == 0]:
                try:
                    choice = self._choose(slot, reduction, form, groups)
                except OptionError:
                    continue
                if isinstance(choice, str) or m * n / macs_per_row(form, n, m, choice.rank, groups) > \
                        OVERSHOOT * reduction:
                    continue
                module = _shaped(form, n, m, choice, slot.bias is not None)
                timed.append((module_seconds(profile, module, shape), form, choice))
        if not timed:
            return self._choose(slot, reduction)
        seconds, form, choice = min(timed, key=lambda item: item[0])
        kept = ""
        default = [item for item in timed if item[1] == self.options.form and item[2].groups == self.options.groups]
        if default and default[0][2] is not choice and default[0][0] < SWITCH_MARGIN * seconds:
            kept = (f"; kept form {self.options.form!r} within {SWITCH_MARGIN:g}x of the fastest predicted, "
                    f"{choice.describe(form)} at {seconds * 1e6:.3g} us")
            seconds, form, choice = default[0]
        if seconds >= dense:
            return (f"no factorisation at {reduction:.3g}x is predicted faster on this machine: the best, "
                    f"{choice.describe(form)}, {seconds * 1e6:.3g} us against {dense * 1e6:.3g} us dense on input "
                    f"{'x'.join(map(str, shape))} (latency profile; objective='latency')")
        return Choice(choice.rank, choice.groups, f"predicted {seconds * 1e6:.3g} us against {dense * 1e6:.3g} us "
                      f"dense on input {'x'.join(map(str, shape))}, fastest of {len(timed)} forms and group counts"
                      f"{kept}", form)

    def _choose(self, slot: Slot, reduction: float | None, form: str | None = None,
                groups: int | None = None) -> Choice | str:
        """The (rank, groups) for one weight in ``form`` (default: the form option); a string says why the
        layer is left alone."""
        options = self.options
        form = form or options.form
        m, n = slot.weight.shape
        where = f"layer {slot.name} ({n} -> {m})"
        reason = self._unfit(slot)
        if reason:
            return reason
        dims = {"in": n, "out": m}
        groups = 1 if form == "lr" else groups or options.groups
        if form == "group":
            if reduction is not None:
                common = [g for g in range(2, math.gcd(m, n) + 1) if m % g == 0 and n % g == 0 and g >= reduction]
                if not common:
                    raise OptionError(f"no group count of at least {reduction:.3g} divides both {n} and {m}",
                                      where=where, fix="ask for a smaller reduction, or another form")
                groups = common[0]
            self._check_groups(groups, {k: dims[k] for k in GROUPED_FACTORS[form]}, where)
            if groups == 1:
                return "groups=1 is the dense layer; nothing to save"
            return Choice(None, groups, form=form)
        self._check_groups(groups, {k: dims[k] for k in GROUPED_FACTORS[form]}, where)
        largest = _multiple_at_most(min(m, n), groups)
        if options.rank is not None:
            rank = options.rank
            if rank > min(m, n):
                raise OptionError(f"rank={rank} exceeds min(in, out) = {min(m, n)}", where=where,
                                  fix=f"choose a rank in 1..{min(m, n)} (or restrict the layers option)")
            if rank % groups:
                raise OptionError(f"rank={rank} is not a multiple of groups={groups}", where=where,
                                  fix="the grouped factor splits the rank into equal blocks")
        elif options.rank_ratio is not None:
            rank = max(groups, _multiple_at_most(round(options.rank_ratio * min(m, n)), groups))
        elif options.energy is not None:
            values = self._truncation(slot).values
            kept = torch.cumsum(values, 0) / values.sum()
            needed = int(torch.searchsorted(kept, torch.tensor(options.energy, dtype=kept.dtype) - 1e-12)) + 1
            rank = min(largest, math.ceil(needed / groups) * groups)
        else:
            bound = sympy.Symbol("r", positive=True)
            solved = sympy.solve(sympy.Eq(macs_per_row(form, n, m, bound, groups) * sympy.nsimplify(reduction),
                                          m * n), bound)[0]
            rank = min(largest, _multiple_at_most(float(solved), groups))
            if rank < groups:
                best = m * n / macs_per_row(form, n, m, groups, groups)
                raise OptionError(f"no rank meets a {reduction:.3g}x reduction: even rank {groups} gives "
                                  f"{best:.3g}x", where=where,
                                  fix="ask for a smaller reduction, use more groups, or leave this layer out "
                                      "(layers / min_size options)")
        if macs_per_row(form, n, m, rank, groups) >= m * n:
            even = _break_even(form, m, n, groups)
            return (f"rank {rank} would not reduce cost: {form} with g={groups} saves only below the break-even "
                    f"r < {sympy.nsimplify(even)} = {float(even):.1f}")
        return Choice(rank, groups, form=form)

    @staticmethod
    def _check_groups(groups: int, sizes: dict[str, int], where: str) -> None:
        for name, size in sizes.items():
            if size % groups:
                raise OptionError(f"groups={groups} does not divide the layer's {name}_features={size}", where=where,
                                  fix=f"choose groups dividing {' and '.join(str(s) for s in sizes.values())}")

    def _factorised(self, slot: Slot, choice: Choice) -> tuple[nn.Module, str, float, float | None]:
        """The module for one slot, the report's text for it, its weight error e = ||W - W'||_2 and, with
        calibration, its relative data error ||(W - W') X||_F / ||W X||_F."""
        options, weight = self.options, slot.weight
        form = choice.form or options.form
        moment = None if slot.moment is None else slot.moment.gram
        if form == "lr":
            truncation = self._truncation(slot, choice.rank)
            module = LowRankLinear.from_truncation(truncation, choice.rank, slot.bias)
            error = truncation.spectral_error(choice.rank)
            relative = truncation.relative_frobenius_error(choice.rank)
        else:
            module = factorize(weight, form, choice.rank, choice.groups, slot.bias, moment, options.damping)
            with torch.no_grad():
                difference = weight.double() - module.dense_weight().double()
                norm = float(weight.double().norm())
                relative = float(difference.norm()) / norm if norm > 0 else 0.0
            error = spectral_norm(difference)
        m, n = weight.shape
        ratio = m * n / macs_per_row(form, n, m, choice.rank, choice.groups)
        params = sum(p.numel() for p in module.parameters())
        dense_params = weight.numel() + (0 if slot.bias is None else slot.bias.numel())
        text = (f"{choice.describe(options.form)}: {float(ratio):.2f}x fewer MACs, params {dense_params} -> "
                f"{params}, ||W - W'||_2 = {error:.3g} (relative Frobenius error {100 * relative:.1f}%)")
        data = None
        if moment is not None:
            with torch.no_grad():
                residual, reference = data_error(weight, module.dense_weight(), moment)
            data = residual / reference if reference > 0 else 0.0
            rows = slot.moment.rows
            text += (f", whitened: ||(W - W')X||_F / ||WX||_F = {100 * data:.2f}% on {rows} calibration rows")
            if rows < n:
                text += (f" (X X^T rank-deficient: {rows} rows < {n} inputs; solves add {options.damping:g} x its "
                         f"mean diagonal)")
        if choice.why:
            text += f"; {choice.why}"
        return module, text, error, data

    def _rewrite_linear(self, gm: fx.GraphModule, slot: Slot, choice: Choice, outcome: PassOutcome) -> None:
        layer = next(layer for layer in find_layers(gm, ["linear"]) if layer.node is slot.node)
        module, text, error, data = self._factorised(slot, choice)
        new = replace_layer(gm, layer, module, pass_name=self.name)
        meta.add_details(new, errors={"": error}, data_errors={} if data is None else {slot.name: data})
        outcome.rewrites.append(Rewrite([slot.node.name], [new.name], text, self.contract))

    def _rewrite_lstm(self, gm: fx.GraphModule, node: fx.Node, slots: list[Slot], choices: dict[str, Choice],
                      outcome: PassOutcome) -> None:
        original = gm.get_submodule(node.target)
        lstm = DecomposedLSTM.from_torch(original) if isinstance(original, nn.LSTM) else copy.deepcopy(original)
        errors, data_errors, texts = {}, {}, []
        for slot in slots:
            module, text, error, data = self._factorised(slot, choices[slot.name])
            lstm.set_projection(*slot.projection, module.to(slot.weight.device))
            key = _slot_name(*slot.projection)
            errors[key] = error
            if data is not None:
                data_errors[slot.name] = data
            texts.append(f"{key} {text}")
        name = node.name
        layer = next(layer for layer in find_layers(gm, ["lstm"]) if layer.node is node)
        new = replace_layer(gm, layer, lstm, pass_name=self.name, args=tuple(node.args), kwargs=dict(node.kwargs))
        meta.add_details(new, errors=errors, data_errors=data_errors)
        head = "nn.LSTM decomposed; " if isinstance(original, nn.LSTM) else ""
        outcome.rewrites.append(Rewrite([name], [new.name], head + "; ".join(texts), self.contract))

    def check(self, before: fx.GraphModule, after: fx.GraphModule, inputs: tuple) -> str | None:
        """Each rewritten weight is within its stated spectral error of the original (the bound for every
        x at once), and on these inputs each module's output is within e ||x|| of the dense layer's; with
        calibration, the stated data errors hold on statistics collected afresh from ``before``."""
        if self.options.method == "whitened":
            failure = self._check_data_errors(before, after)
            if failure:
                return failure
        originals = {node.name: node for node in before.graph.nodes}
        rewritten = self._rewritten(after)
        seen = {node: args[0] for node, (args, _) in capture_calls(after, rewritten, inputs).items()}
        tolerance = self.contract.tolerance
        for node, module in rewritten.items():
            source, errors = meta.replaced(node), meta.details(node)["errors"]
            if source not in originals:  # rewritten by an earlier pass of the pipeline, not by this one
                continue
            original = originals[source]
            with torch.no_grad():
                if isinstance(module, DecomposedLSTM):
                    old = before.get_submodule(original.target)
                    for kind, layer, reverse in _lstm_slots(module):
                        key = _slot_name(kind, layer, reverse)
                        if key not in errors:
                            continue
                        weight = _dense_projection(old, kind, layer, reverse)[0]
                        dense = module.projection(kind, layer, reverse).dense_weight()
                        failure = _spectral_check(f"{node.name}.{key}", weight, dense, errors[key], tolerance)
                        if failure:
                            return failure
                    if node in seen:
                        failure = _lstm_agrees(node.name, module, seen[node], tolerance)
                        if failure:
                            return failure
                    continue
                old = next(layer for layer in find_layers(before, ["linear"]) if layer.node.name == source)
                failure = _spectral_check(node.name, old.weight, module.dense_weight(), errors[""], tolerance)
                if failure or node not in seen:
                    return failure
                x = seen[node]
                dense_out = torch.nn.functional.linear(x, old.weight, old.bias)
                excess = (module(x) - dense_out).norm(dim=-1) - errors[""] * x.norm(dim=-1)
                allowed = tolerance * (1 + dense_out.norm(dim=-1))
                if bool((excess > allowed).any()):
                    return (f"{node.name}: ||Wx - W'x|| exceeds e ||x|| (e = {errors['']:.3g}) by "
                            f"{float((excess - allowed).max()):.3g}")
        return None

    def _rewritten(self, after: fx.GraphModule) -> dict[fx.Node, nn.Module]:
        """The modules this pass added to ``after``, by node."""
        return {node: after.get_submodule(node.target) for node in after.graph.nodes
                if node.op == "call_module" and meta.rewritten_by(node) == self.name and "errors" in meta.details(node)}

    def _check_data_errors(self, before: fx.GraphModule, after: fx.GraphModule) -> str | None:
        """Each stated ||(W - W') X||_F / ||W X||_F, recomputed from X X^T collected again on ``before``."""
        slots, _ = self._slots(before, PassOutcome(before, [], []))
        self._collect(before, slots)
        by_name = {slot.name: slot for slot in slots}
        tolerance = self.contract.tolerance
        for node, module in self._rewritten(after).items():
            for name, stated in meta.details(node).get("data_errors", {}).items():
                slot = by_name.get(name)
                if slot is None:  # rewritten by an earlier pass of the pipeline, not by this one
                    continue
                part = module if slot.projection is None else module.projection(*slot.projection)
                with torch.no_grad():
                    residual, reference = data_error(slot.weight, part.dense_weight(), slot.moment.gram)
                actual = residual / reference if reference > 0 else 0.0
                if abs(actual - stated) > tolerance * (1 + stated):
                    return (f"{name}: ||(W - W')X||_F / ||WX||_F = {actual:.6g} on the calibration inputs, the "
                            f"report states {stated:.6g}")
        return None


def lower_envelope(curve: dict[int, float]) -> list[tuple[int, float]]:
    """The (rank, error) points of a per-layer curve on its monotone lower convex envelope: from the smallest
    rank, only points below every smaller rank's error, then their lower convex hull (Andrew's monotone
    chain), so that the error removed per rank falls step by step."""
    points: list[tuple[int, float]] = []
    for rank, error in sorted(curve.items()):
        if not points or error < min(e for _, e in points):
            points.append((rank, error))
    hull: list[tuple[int, float]] = []
    for point in points:
        while len(hull) >= 2:
            (r0, e0), (r1, e1) = hull[-2], hull[-1]
            if (e1 - e0) * (point[0] - r0) > (point[1] - e0) * (r1 - r0):  # hull[-1] above the chord
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def greedy_ranks(curves: dict[str, dict[int, float]], unit: dict[str, float],
                  budget: float) -> tuple[dict[str, int], dict[str, list[tuple[int, int, float]]], float]:
    """Ranks within ``budget`` MACs (``unit`` a rank), each layer from its envelope's first rank: envelope
    steps in order of error removed per MAC, each taken when it is its layer's next, whole where it fits, else
    as many of its ranks as fit (its error there is unmeasured, and that layer stops there). Returns the
    ranks, each layer's steps (start, end, rate) and the rate of the last step taken."""
    envelopes = {}
    for name, curve in curves.items():
        hull = lower_envelope(curve)
        envelopes[name] = [(r0, r1, (e0 - e1) / (unit[name] * (r1 - r0)))
                           for (r0, e0), (r1, e1) in zip(hull, hull[1:])]
    ranks = {name: min(curve) for name, curve in curves.items()}
    spend = sum(unit[name] * rank for name, rank in ranks.items())
    admitted = 0.0
    steps = sorted(((rate, start, end, name) for name, envelope in envelopes.items()
                    for start, end, rate in envelope), key=lambda step: (-step[0], step[1]))
    for rate, start, end, name in steps:
        if ranks[name] != start:
            continue
        taken = min(end - start, int((budget - spend) // unit[name]))
        if taken > 0:
            ranks[name], spend, admitted = start + taken, spend + unit[name] * taken, rate
    return ranks, envelopes, admitted


def _spectral_check(name: str, weight: Tensor, dense: Tensor, stated: float, tolerance: float) -> str | None:
    error = float(torch.linalg.matrix_norm(weight.double() - dense.double(), ord=2))
    if error > stated * (1 + tolerance) + tolerance * float(weight.abs().max()):
        return f"{name}: ||W - W'||_2 = {error:.4g}, the report states {stated:.4g}"
    return None


def _lstm_agrees(name: str, module: DecomposedLSTM, x: Tensor, tolerance: float) -> str | None:
    """The factorised LSTM computes what the same LSTM with each projection multiplied out computes."""
    dense = copy.deepcopy(module)
    for kind, layer, reverse in _lstm_slots(module):
        projection = module.projection(kind, layer, reverse)
        if type(projection) is not nn.Linear:
            dense.set_projection(kind, layer, reverse, projection.to_dense())
    expected = run_eval(dense, (x,))[0]
    actual = run_eval(module, (x,))[0]
    error = float((expected - actual).abs().max())
    if error > tolerance * max(1.0, float(expected.abs().max())):
        return f"{name}: output differs from its own to_dense() LSTM by {error:.3g}"
    return None
