"""ADMM-NN: joint weight pruning and quantization by ADMM (Ren et al., ASPLOS 2019, arXiv 1812.11677).

Training minimises loss(W) subject to W_i in S_i per selected weight (at most k_i non-zeros; non-zeros on
the levels ±q..±nq). ADMM splits off Z_i = W_i with a scaled dual U_i:

1. W-step: a few SGD steps on loss(W) + sum (rho/2) ||W - Z + U||_F^2   (:meth:`ADMM.penalty`, squared)
2. Z = Proj_S(W + U)   (W + U, not W: NNI's PR #3110 fixed exactly that bug)
3. U = U + W - Z       (:meth:`ADMM.update`; rho may grow by a factor per update)

then the official schedule: hard prune and retrain with the mask on weights and gradients, ADMM with
the quantization set (mask frozen), progressive quantization (each round fixes the weights closest to
their level and retrains the rest) and a final snap. :func:`train` runs all of it; the pieces also plug
into a user's own loop. Under DistributedDataParallel rank 0's W + U is broadcast before each
projection, so Z and U are identical on every rank by construction.

Quantization scales keep 17 significant bits, so every level k*q (|k| <= 127) is exact in float32 and
``lower_int8`` turns the result into int8 values times q bit for bit.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import InputError, OptionError, TraceError, UnsupportedError
from ..graph import find_layers
from ..text import error_summary
from ..tracing import LeafTracer

MAX_LEVELS = 127
_LSTM_WEIGHT = "weight_[ih]h_l[0-9]*"


# --- projections -----------------------------------------------------------------------------------

def project_sparse(x: Tensor, keep: int) -> Tensor:
    """The nearest tensor (Frobenius norm) with at most ``keep`` non-zeros: the ``keep`` largest |x| stay."""
    flat = x.detach().flatten()
    out = torch.zeros_like(flat)
    if keep > 0:
        index = torch.topk(flat.abs(), min(keep, flat.numel()), sorted=False).indices
        out[index] = flat[index]
    return out.view_as(x)


def exact_scale(scale: float) -> float:
    """``scale`` with 17 significant bits, so k * scale is exact in float32 for every |k| <= 127."""
    bits = torch.tensor([scale], dtype=torch.float32).view(torch.int32)
    return float((bits & ~0x7F).view(torch.float32))


def _levels_of(x: Tensor, scale: float, levels: int) -> Tensor:
    """Nearest non-zero level index of every entry: sign(x) * clamp(round(|x| / q), 1, n) (0 -> +1)."""
    sign = torch.where(x < 0, -1.0, 1.0)
    return sign * torch.clamp(torch.round(x.abs() / scale), 1, levels)


def project_quantized(x: Tensor, scale: float, levels: int, mask: Tensor | None = None) -> Tensor:
    """Nearest tensor whose non-zeros lie on {±q, ..., ±nq}: zero is reserved for pruned weights.

    Without ``mask`` zeros stay zero and every non-zero moves to its nearest level; with ``mask`` the
    entries outside it become zero and those inside move to their nearest non-zero level.
    """
    x = x.detach()
    quantized = _levels_of(x, scale, levels) * scale
    support = mask if mask is not None else x != 0
    return torch.where(support, quantized, torch.zeros_like(x))


def project_joint(x: Tensor, keep: int, scale: float, levels: int) -> Tensor:
    """Nearest tensor with at most ``keep`` non-zeros, all on {±q, ..., ±nq}.

    Keeping entry i costs (x_i - Q(x_i))^2 instead of x_i^2, so the best support is the ``keep`` entries
    with the largest positive gain x_i^2 - (x_i - Q(x_i))^2.
    """
    x = x.detach()
    quantized = _levels_of(x, scale, levels) * scale
    gain = (x * x - (x - quantized) ** 2).flatten()
    mask = torch.zeros_like(gain, dtype=torch.bool)
    if keep > 0:
        top = torch.topk(gain, min(keep, gain.numel()), sorted=False)
        mask[top.indices[top.values > 0]] = True
    return torch.where(mask.view_as(x), quantized, torch.zeros_like(x))


def quantization_scale(x: Tensor, levels: int, mask: Tensor | None = None, *, scan: tuple[float, float] = (0.9, 1.1),
                       steps: int = 201) -> float:
    """The level spacing q with the least squared quantization error of the non-zeros (or ``mask``).

    As ADMM-NN: scan q over [0.9, 1.1] x max|x| / n; the winner keeps 17 significant bits (exact_scale).
    """
    x = x.detach()
    support = mask if mask is not None else x != 0
    values = x[support]
    peak = float(values.abs().max()) if values.numel() else 0.0
    if peak == 0.0:
        return exact_scale(1.0)
    best, best_error = None, math.inf
    for factor in torch.linspace(scan[0], scan[1], steps).tolist():
        q = exact_scale(factor * peak / levels)
        error = float(((values - _levels_of(values, q, levels) * q) ** 2).sum())
        if error < best_error:
            best, best_error = q, error
    return best


def _from_rank0(tensor: Tensor) -> Tensor:
    """``tensor`` as rank 0 holds it (in place), when running distributed: every rank then projects the same."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


# --- the per-weight state --------------------------------------------------------------------------

@dataclass
class ADMMWeight:
    """One constrained weight: its parameter, constraint (keep k, levels n), and Z, U, mask, scale."""

    name: str
    layer: str
    parameter: nn.Parameter
    keep: int | None
    levels: int | None
    z: Tensor
    u: Tensor
    mask: Tensor | None = None
    scale: float | None = None
    fixed: Tensor | None = None
    hook: Any = None

    @property
    def numel(self) -> int:
        return self.parameter.numel()

    @property
    def nonzeros(self) -> int:
        return int((self.parameter.detach() != 0).sum())


@dataclass
class LayerSummary:
    name: str
    layer: str
    weights: int
    nonzeros: int
    levels: int | None
    scale: float | None


def _matches(pattern: str, names: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for name in names)


class ADMM:
    """ADMM pruning + quantization state of a model's Linear, Conv2d and LSTM weights.

    ``prune``: a ratio in [0, 1) for every selected layer, or {layer name or glob: ratio}; or
    ``reduction``: a global target (keep 1/reduction of all selected weights, largest magnitudes first;
    each layer keeps what falls in the global top-k). ``levels``: n >= 1 (<= 127) symmetric levels per
    sign, for every layer or {name: n}. Layers are found on the fx-traced graph (``layers`` is a glob
    over their names); pass ``graph`` when the model needs custom tracing (it must share the model's
    parameters, e.g. ``torch.fx.symbolic_trace(model)``).
    """

    def __init__(self, model: nn.Module, *, prune: float | Mapping[str, float] | None = None,
                 reduction: float | None = None, levels: int | Mapping[str, int] | None = None, rho: float = 1e-3,
                 rho_growth: float = 1.0, layers: str = "*", graph: fx.GraphModule | None = None):
        if prune is not None and reduction is not None:
            raise OptionError("give either prune ratios or a global reduction target, not both",
                              where="ADMM(prune=..., reduction=...)")
        if not rho > 0 or not rho_growth >= 1:
            raise OptionError(f"rho={rho} must be > 0 and rho_growth={rho_growth} >= 1", where="ADMM(rho=...)",
                              fix="e.g. rho=1e-3 (ADMM-NN's LeNet: 7e-3), rho_growth=1.3")
        self.model, self.rho, self.rho_growth = model, rho, rho_growth
        self.phase = "prune" if (prune is not None or reduction is not None) else "quantize"
        found, self._weightless = self._select(model, graph, layers)
        if not found:
            for option, what in ((prune, "prune"), (levels, "levels")):
                for key in option if isinstance(option, Mapping) else ():
                    self._unknown_key(key, found, what)
            raise InputError(f"no Linear, Conv2d or LSTM weight matches layers={layers!r}", where="ADMM(model)",
                             fix="check the glob against the model's module names")
        keeps = self._keeps(found, prune, reduction)
        level_of = self._per_layer(found, levels, "levels", self._check_levels)
        self.weights: list[ADMMWeight] = []
        for (name, layer, parameter), keep, n in zip(found, keeps, level_of):
            if keep is None and n is None:
                continue
            data = parameter.detach()
            self.weights.append(ADMMWeight(name, layer, parameter, keep, n, data.clone(), torch.zeros_like(data)))
        if not self.weights:
            raise OptionError("nothing to do: no layer has a prune ratio or quantization levels",
                              where="ADMM(...)", fix="pass prune=..., reduction=... and/or levels=...")
        if self.phase == "quantize":
            self.start_quantization()
        else:
            self._reset_dual()

    # selection -------------------------------------------------------------------------------------

    @staticmethod
    def _select(model: nn.Module, graph: fx.GraphModule | None,
                pattern: str) -> tuple[list[tuple[str, str, nn.Parameter]], set[str]]:
        """(parameter name, layer name, parameter) of every selected weight, and the layers whose weight is
        computed in the graph (nothing to constrain)."""
        if graph is None:
            try:
                graph = fx.GraphModule(model, LeafTracer().trace(model))
            except Exception as error:
                raise TraceError(f"cannot trace {type(model).__name__} to find its layers: "
                                 f"{error_summary(error)}", where="ADMM(model)",
                                 fix="pass graph=torch.fx.symbolic_trace(model, ...) traced your way") from error
        names = {id(p): name for name, p in model.named_parameters()}
        found, seen, weightless = [], set(), set()

        def add(parameter: Tensor | None, layer: str) -> None:
            if parameter is None or id(parameter) not in names or id(parameter) in seen:
                return
            seen.add(id(parameter))
            found.append((names[id(parameter)], layer, parameter))

        for layer in find_layers(graph, ["linear", "conv2d", "lstm"]):
            if not layer.matches(pattern):
                continue
            if layer.kind == "lstm" and layer.module is not None:
                for name, parameter in layer.module.named_parameters():
                    if fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], _LSTM_WEIGHT):
                        add(parameter, layer.name)
            elif layer.weight is None:
                weightless.add(layer.name)
            else:
                add(layer.parameter, layer.name)
        order = {name: index for index, name in enumerate(names.values())}
        found.sort(key=lambda item: order[item[0]])
        return found, weightless

    def _unknown_key(self, key: str, found: list[tuple[str, str, nn.Parameter]], what: str) -> None:
        """A key that names no selected layer: say whether it has no weight or does not exist."""
        if key in self._weightless:
            raise UnsupportedError(f"layer {key!r} computes its weight in the graph: it has no weight to {what}",
                                   where=f"ADMM({what}={{{key!r}: ...}})",
                                   fix="make the weight an nn.Parameter of the model")
        try:
            module = self.model.get_submodule(key)
        except AttributeError:
            module = None
        if module is not None and getattr(module, "weight", None) is None:
            raise UnsupportedError(f"layer {key!r} ({type(module).__name__}) has no weight to {what}",
                                   where=f"ADMM({what}={{{key!r}: ...}})",
                                   fix="name Linear, Conv2d or LSTM layers only")
        layers = ", ".join(sorted({layer for _, layer, _ in found})) or "none"
        raise InputError(f"no selected Linear / Conv2d / LSTM layer matches {key!r}",
                         where=f"ADMM({what}={{{key!r}: ...}})", fix=f"the selected layers are: {layers}")

    def _per_layer(self, found, value, what: str, check: Callable[[Any, str], None]) -> list[Any]:
        """Expand a scalar or {name/glob: value} option to one value (or None) per found weight."""
        if value is None:
            return [None] * len(found)
        if not isinstance(value, Mapping):
            for _, layer, _ in found:
                check(value, layer)
            return [value] * len(found)
        for key in value:
            if not any(_matches(key, (name, layer)) for name, layer, _ in found):
                self._unknown_key(key, found, what)
        result = []
        for name, layer, _ in found:
            chosen = next((value[key] for key in value if key in (name, layer)), None)
            if chosen is None:
                chosen = next((value[key] for key in value if _matches(key, (name, layer))), None)
            if chosen is not None:
                check(chosen, layer)
            result.append(chosen)
        return result

    @staticmethod
    def _check_ratio(ratio: Any, layer: str) -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise OptionError(f"prune ratio {ratio!r} of layer {layer} is outside [0, 1)", where=f"layer {layer}",
                              fix="the ratio is the fraction of weights removed: 0 keeps all, 0.9 keeps 10%")

    @staticmethod
    def _check_levels(levels: Any, layer: str) -> None:
        if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= MAX_LEVELS:
            raise OptionError(f"quantization levels n={levels!r} of layer {layer} must be an integer in 1..127",
                              where=f"layer {layer}", fix="levels are ±q..±nq; n <= 127 fits int8")

    def _keeps(self, found, prune, reduction) -> list[int | None]:
        if reduction is not None:
            if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or not reduction >= 1:
                raise OptionError(f"reduction={reduction!r} must be a number >= 1 (weights before / after)",
                                  where="ADMM(reduction=...)", fix="e.g. reduction=20 keeps 5% of the weights")
            magnitudes = torch.cat([p.detach().abs().flatten() for _, _, p in found])
            total = max(1, int(round(magnitudes.numel() / reduction)))
            threshold = torch.topk(magnitudes, total).values.min()
            keeps = [int((p.detach().abs() >= threshold).sum()) for _, _, p in found]
            for (name, layer, p), keep in zip(found, keeps):
                if keep == 0:
                    raise InputError(f"the global target {reduction:g}x keeps none of the {p.numel()} weights of "
                                     f"layer {layer} ({name}): the layer would be pruned away", where=f"layer {layer}",
                                     fix="lower the target, or give per-layer ratios with prune={...}")
            return keeps
        ratios = self._per_layer(found, prune, "prune", self._check_ratio)
        keeps = []
        for (name, layer, p), ratio in zip(found, ratios):
            if ratio is None:
                keeps.append(None)
                continue
            keep = int(round((1 - ratio) * p.numel()))
            if keep == 0:
                raise InputError(f"prune ratio {ratio} keeps none of the {p.numel()} weights of layer {layer} "
                                 f"({name}): the layer would be pruned away", where=f"layer {layer}",
                                 fix=f"use a ratio below {1 - 0.5 / p.numel():.6g}")
            keeps.append(keep)
        return keeps

    # ADMM steps ------------------------------------------------------------------------------------

    def _project(self, weight: ADMMWeight, x: Tensor) -> Tensor:
        if self.phase == "prune":
            return project_sparse(x, weight.keep) if weight.keep is not None else x.clone()
        if self.phase == "joint":
            return project_joint(x, weight.keep if weight.keep is not None else x.numel(), weight.scale, weight.levels)
        if weight.levels is None:
            return x * weight.mask if weight.mask is not None else x.clone()
        return project_quantized(x, weight.scale, weight.levels, weight.mask)

    def _reset_dual(self) -> None:
        with torch.no_grad():
            for weight in self.weights:
                weight.z = self._project(weight, _from_rank0(weight.parameter.detach().clone()))
                weight.u = torch.zeros_like(weight.z)

    def penalty(self) -> Tensor:
        """sum (rho/2) ||W - Z + U||_F^2 over the constrained weights: add it to the loss in ADMM phases."""
        if self.phase not in ("prune", "quantize", "joint"):
            return torch.zeros(())
        return sum((self.rho / 2) * (w.parameter - w.z + w.u).pow(2).sum() for w in self.weights)

    @torch.no_grad()
    def update(self) -> None:
        """Z = Proj(W + U), U = U + W - Z, then rho *= rho_growth. Rank 0's W + U is used on every rank."""
        for weight in self.weights:
            v = _from_rank0(weight.parameter.detach() + weight.u)
            weight.z = self._project(weight, v)
            weight.u = v - weight.z
        self.rho *= self.rho_growth

    def residual(self) -> float:
        """||W - Z||^2 / ||W||^2 over all constrained weights: how far W is from its constraint set."""
        with torch.no_grad():
            gap = sum(float((w.parameter - w.z).pow(2).sum()) for w in self.weights)
            norm = sum(float(w.parameter.pow(2).sum()) for w in self.weights)
        return gap / norm if norm else 0.0

    # hard constraints ------------------------------------------------------------------------------

    def _install_hooks(self) -> None:
        """Mask gradients: pruned and fixed weights get none (the mask on weights is :meth:`after_step`)."""
        for weight in self.weights:
            if weight.hook is not None:
                weight.hook.remove()
            trainable = self._trainable(weight)
            weight.hook = None if trainable is None else weight.parameter.register_hook(
                lambda grad, keep=trainable: grad * keep)

    @staticmethod
    def _trainable(weight: ADMMWeight) -> Tensor | None:
        if weight.mask is None and weight.fixed is None:
            return None
        keep = weight.mask if weight.mask is not None else torch.ones_like(weight.parameter, dtype=torch.bool)
        if weight.fixed is not None:
            keep = keep & ~weight.fixed
        return keep.to(weight.parameter.dtype)

    @torch.no_grad()
    def after_step(self) -> None:
        """Call after every optimizer step: pruned weights back to zero, fixed weights back to their level.

        Momentum, Adam's moments or weight decay can move a weight whose gradient is masked.
        """
        for weight in self.weights:
            if weight.mask is not None:
                weight.parameter.mul_(weight.mask)
            if weight.fixed is not None:
                weight.parameter.copy_(torch.where(weight.fixed, weight.z, weight.parameter))

    @torch.no_grad()
    def hard_prune(self) -> None:
        """W = Proj_sparse(W) and freeze the support: the start of masked retraining."""
        for weight in self.weights:
            if weight.keep is None:
                continue
            w = weight.parameter.detach()
            support = torch.zeros(weight.numel, dtype=torch.bool)
            support[torch.topk(w.abs().flatten(), weight.keep, sorted=False).indices] = True
            weight.mask = support.view_as(w)
            pruned = w * weight.mask
            weight.parameter.copy_(pruned)
            weight.z, weight.u = pruned.clone(), torch.zeros_like(pruned)
        self.phase = "retrain"
        self._install_hooks()

    @torch.no_grad()
    def start_quantization(self, joint: bool = False) -> None:
        """Choose q per layer (least squares over the kept weights) and start ADMM on the quantization set.

        ``joint`` projects onto sparsity and quantization at once (no mask yet); otherwise the mask from
        :meth:`hard_prune` stays frozen.
        """
        for weight in self.weights:
            if weight.levels is not None:
                weight.scale = quantization_scale(weight.parameter.detach(), weight.levels, weight.mask)
        self.phase = "joint" if joint else "quantize"
        self._reset_dual()

    @torch.no_grad()
    def fix_closest(self, fraction: float) -> None:
        """Progressive quantization: snap and freeze the weights closest to their level until ``fraction``
        of each layer's kept weights are fixed; the rest keep training."""
        if self.phase not in ("quantize", "joint", "progressive"):
            raise OptionError("progressive quantization starts after start_quantization()",
                              where="ADMM.fix_closest", fix="call start_quantization() first")
        if not 0 <= fraction <= 1:
            raise OptionError(f"fraction={fraction} must be in [0, 1]", where="ADMM.fix_closest")
        self.phase = "progressive"
        for weight in self.weights:
            if weight.levels is None:
                continue
            w = weight.parameter.detach()
            support = weight.mask if weight.mask is not None else w != 0
            snapped = project_quantized(w, weight.scale, weight.levels, support)
            fixed = weight.fixed if weight.fixed is not None else torch.zeros_like(support)
            wanted = int(math.ceil(fraction * int(support.sum())))
            extra = wanted - int(fixed.sum())
            if extra > 0:
                distance = torch.where(support & ~fixed, (w - snapped).abs(), torch.full_like(w, math.inf))
                index = torch.topk(distance.flatten(), extra, largest=False, sorted=False).indices
                fixed = fixed.clone()
                fixed.view(-1)[index] = True
            weight.fixed = fixed
            weight.mask = support
            weight.z = torch.where(fixed, snapped, weight.z)
            weight.parameter.copy_(torch.where(fixed, snapped, w))
        self._install_hooks()

    @torch.no_grad()
    def snap(self) -> None:
        """Final step: every constrained weight onto its set (≤ k non-zeros, non-zeros on the levels)."""
        for weight in self.weights:
            w = weight.parameter.detach()
            if weight.levels is not None:
                if weight.scale is None:
                    weight.scale = quantization_scale(w, weight.levels, weight.mask)
                if weight.mask is None and weight.keep is not None:
                    final = project_joint(w, weight.keep, weight.scale, weight.levels)
                else:
                    final = project_quantized(w, weight.scale, weight.levels, weight.mask)
            else:
                final = project_sparse(w, weight.keep) if weight.keep is not None else w.clone()
            if weight.mask is None:
                weight.mask = final != 0
            weight.parameter.copy_(final)
            weight.z, weight.fixed = final.clone(), torch.ones_like(weight.mask)
        self.phase = "done"
        self._install_hooks()

    def remove_hooks(self) -> None:
        for weight in self.weights:
            if weight.hook is not None:
                weight.hook.remove()
                weight.hook = None

    # reporting -------------------------------------------------------------------------------------

    def summary(self) -> list[LayerSummary]:
        return [LayerSummary(w.name, w.layer, w.numel, w.nonzeros, w.levels, w.scale) for w in self.weights]

    def reduction(self) -> float:
        """Constrained weights before / non-zeros now."""
        nonzeros = sum(w.nonzeros for w in self.weights)
        return sum(w.numel for w in self.weights) / nonzeros if nonzeros else math.inf


# --- the ready loop --------------------------------------------------------------------------------

@dataclass
class Schedule:
    """Epochs of each phase of ADMM-NN's schedule; ``fix_fractions`` are the cumulative fractions of kept
    weights fixed per progressive round (the official code fixes 30% more per round)."""

    prune_epochs: int = 10
    retrain_epochs: int = 5
    quantize_epochs: int = 5
    fix_fractions: tuple[float, ...] = (0.3, 0.6, 0.9)
    round_epochs: int = 1
    updates_per_epoch: int = 1

    @property
    def total_epochs(self) -> int:
        return (self.prune_epochs + self.retrain_epochs + self.quantize_epochs
                + self.round_epochs * len(self.fix_fractions))


@dataclass
class EpochRecord:
    """One epoch: mean task loss and penalty, ADMM's residual ||W - Z||^2 / ||W||^2 (NaN outside ADMM
    phases), and the phase's ``evaluate`` result on its last epoch."""

    phase: str
    epoch: int
    loss: float
    penalty: float
    residual: float
    metric: float | None = None


@dataclass
class History:
    epochs: list[EpochRecord] = field(default_factory=list)
    phase_metrics: dict[str, float] = field(default_factory=dict)


def train(model: nn.Module, admm: ADMM, data: Iterable, loss_fn: Callable[[Any, Any], Tensor],
          optimizer: torch.optim.Optimizer, schedule: Schedule = Schedule(), *,
          evaluate: Callable[[], float] | None = None, progress: bool = True) -> History:
    """ADMM-NN's whole schedule: ADMM-prune, masked retrain, ADMM-quantize, progressive rounds, snap.

    ``data`` yields (inputs, targets) batches each epoch; ``model`` may be the DDP-wrapped model whose
    module ``admm`` was built on. ``evaluate`` (e.g. test accuracy) runs after each phase and goes in
    the history and on the progress bar. The optimizer's state is cleared at each phase change.
    """
    history = History()
    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    bar = tqdm(total=schedule.total_epochs, disable=not (progress and rank0), unit="epoch")
    pruning = any(w.keep is not None for w in admm.weights)
    quantizing = any(w.levels is not None for w in admm.weights)

    def phase(name: str, epochs: int, admm_updates: bool) -> None:
        optimizer.state.clear()
        for epoch in range(epochs):
            history.epochs.append(_epoch(model, admm, data, loss_fn, optimizer, name, epoch,
                                         schedule.updates_per_epoch if admm_updates else 0))
            record = history.epochs[-1]
            bar.set_description(name)
            shown = {"loss": f"{record.loss:.4f}"}
            if admm_updates:
                shown["residual"] = f"{record.residual:.2e}"
            bar.set_postfix(shown, refresh=False)
            bar.update(1)
        if evaluate is not None and epochs:
            history.phase_metrics[name] = history.epochs[-1].metric = evaluate()
            bar.set_postfix(metric=f"{history.phase_metrics[name]:.4f}")

    try:
        if pruning and admm.phase == "prune":
            phase("admm-prune", schedule.prune_epochs, True)
            admm.hard_prune()
            phase("retrain", schedule.retrain_epochs, False)
        if quantizing:
            if admm.phase != "quantize":
                admm.start_quantization()
            phase("admm-quantize", schedule.quantize_epochs, True)
            for fraction in schedule.fix_fractions:
                admm.fix_closest(fraction)
                phase(f"fix {fraction:.0%}", schedule.round_epochs, False)
        admm.snap()
        if evaluate is not None:
            history.phase_metrics["final"] = evaluate()
    finally:
        bar.close()
    return history


def _epoch(model, admm: ADMM, data, loss_fn, optimizer, phase: str, epoch: int, updates: int) -> EpochRecord:
    model.train()
    sampler = getattr(data, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    batches = data if hasattr(data, "__len__") else list(data)
    every = max(1, len(batches) // updates) if updates else 0
    total, penalty_total, count = 0.0, 0.0, 0
    for step, (inputs, targets) in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), targets)
        penalty = admm.penalty()
        (loss + penalty).backward()
        optimizer.step()
        admm.after_step()
        if every and (step + 1) % every == 0:
            admm.update()
        total, penalty_total, count = total + loss.item(), penalty_total + float(penalty.detach()), count + 1
    residual = admm.residual() if updates else math.nan
    return EpochRecord(phase, epoch, total / max(count, 1), penalty_total / max(count, 1), residual)


__all__ = ["ADMM", "ADMMWeight", "EpochRecord", "History", "LayerSummary", "Schedule", "exact_scale",
           "project_joint", "project_quantized", "project_sparse", "quantization_scale", "train"]
