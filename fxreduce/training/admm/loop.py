"""ADMM-NN's whole schedule as a ready training loop over a user's data, loss and optimizer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .state import ADMM


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
