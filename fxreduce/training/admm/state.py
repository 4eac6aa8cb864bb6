"""The ADMM state of a model's constrained weights: Z, U and rho, the hard-constraint phases, hooks.

Each method is one step of ADMM-NN's schedule, so a user's own training loop can call them in order;
fxreduce.training.admm.loop.train is that loop ready-made. Under DistributedDataParallel rank 0's
W + U is broadcast before each projection, so Z and U are identical on every rank by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import Tensor, nn

from ...errors import InputError, OptionError
from .projections import project_joint, project_quantized, project_sparse, quantization_scale
from .selection import select


def _from_rank0(tensor: Tensor) -> Tensor:
    """``tensor`` as rank 0 holds it (in place), when running distributed: every rank then projects the same."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


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
        selection = select(model, graph, layers)
        if not selection.found:
            for option, what in ((prune, "prune"), (levels, "levels")):
                for key in option if isinstance(option, Mapping) else ():
                    selection.unknown_key(key, what)
            raise InputError(f"no Linear, Conv2d or LSTM weight matches layers={layers!r}", where="ADMM(model)",
                             fix="check the glob against the model's module names")
        keeps = selection.keeps(prune, reduction)
        level_of = selection.levels(levels)
        self.weights: list[ADMMWeight] = []
        for (name, layer, parameter), keep, n in zip(selection.found, keeps, level_of):
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
