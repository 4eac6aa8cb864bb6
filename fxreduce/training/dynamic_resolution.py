"""Training a DRNet (a graph rewritten by the dynamic_resolution pass), DRNet's two-step recipe.

1. Multi-resolution pre-training: every batch goes through the backbone at every candidate resolution
   (each with its own BatchNorm set) and the losses are summed; the predictor is not involved.
2. Joint fine-tuning: the predictor picks a resolution per image (straight-through Gumbel-softmax) and
   L = CE + eta * max(0, (E[FLOPs] - alpha) / (C_max - C_min)), E[FLOPs] the batch mean of the chosen
   resolutions' FLOPs plus the predictor's. The predictor trains from scratch at its own learning rate
   (DRNet: 0.1x the backbone's).

C_r are the backbone's FLOPs per image at resolution r, derived by the pass from the symbolic cost model
(the backbone's cost with H = W = r). FLOPs are 2 x multiply-adds throughout, fxreduce's convention.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import InputError
from ..modules.dynamic_resolution import DynamicResolutionParts, dynamic_resolution_parts

Batches = Iterable[tuple[Tensor, Tensor]]
OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]


def sgd(groups: list[dict]) -> torch.optim.Optimizer:
    """DRNet's optimizer: SGD with Nesterov momentum 0.9 and weight decay 1e-4."""
    return torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=1e-4)


@dataclass(frozen=True)
class ResolutionCosts:
    """FLOPs per image: the backbone's at each candidate resolution, and the predictor's."""

    resolutions: tuple[int, ...]
    backbone_flops: tuple[float, ...]
    predictor_flops: float

    def expected_flops(self, shares: Sequence[float] | Tensor) -> float:
        """Mean FLOPs per image when the given shares of images run at each resolution (predictor included)."""
        shares = torch.as_tensor(shares, dtype=torch.float64)
        return self.predictor_flops + float(shares @ torch.tensor(self.backbone_flops, dtype=torch.float64))

    @property
    def spread(self) -> float:
        """C_max - C_min, the normaliser of DRNet's FLOPs penalty."""
        return max(self.backbone_flops) - min(self.backbone_flops)


def resolution_costs(gm: nn.Module) -> ResolutionCosts:
    dispatch = dynamic_resolution_parts(gm).dispatch
    if dispatch.backbone_macs is None or dispatch.predictor_macs is None:
        raise InputError("the dispatch carries no per-resolution costs", where="ResolutionDispatch",
                         fix="build the model with the dynamic_resolution pass")
    return ResolutionCosts(dispatch.resolutions, tuple(2 * float(c) for c in dispatch.backbone_macs),
                           2 * float(dispatch.predictor_macs))


@contextlib.contextmanager
def captured_choices(parts: DynamicResolutionParts) -> Iterator[list[Tensor]]:
    """Collects the one-hot choice (N, m) of every forward pass run inside the block."""
    choices: list[Tensor] = []
    handle = parts.choice.register_forward_hook(lambda module, inputs, output: choices.append(output))
    try:
        yield choices
    finally:
        handle.remove()


def _cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))


def _length(batches: Batches) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def pretrain_multi_resolution(gm: nn.Module, batches: Batches, *, epochs: int = 1, lr: float = 0.1,
                              optimizer: OptimizerFactory = sgd, progress: bool = True) -> list[float]:
    """Step 1: train the backbone on the summed loss over all resolutions. Returns the mean loss per epoch."""
    dispatch = dynamic_resolution_parts(gm).dispatch
    optim = optimizer([{"params": [p for p in dispatch.backbone.parameters() if p.requires_grad], "lr": lr}])
    schedule = _cosine(optim, epochs * (_length(batches) or 1))
    gm.train()
    history = []
    for epoch in range(epochs):
        total, count = 0.0, 0
        bar = tqdm(batches, total=_length(batches), disable=not progress, leave=False,
                   desc=f"multi-resolution pre-training {epoch + 1}/{epochs}")
        for x, y in bar:
            loss = sum(F.cross_entropy(dispatch.run_at(x, j), y) for j in range(len(dispatch.resolutions)))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            schedule.step()
            total, count = total + loss.item(), count + 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append(total / max(count, 1))
    gm.eval()
    return history


@dataclass(frozen=True)
class FinetuneEpoch:
    loss: float
    cross_entropy: float
    mean_flops: float
    shares: tuple[float, ...]


def finetune_joint(gm: nn.Module, batches: Batches, *, target_flops: float, epochs: int = 1, eta: float = 0.2,
                   lr: float = 0.01, predictor_lr: float | None = None, optimizer: OptimizerFactory = sgd,
                   progress: bool = True) -> list[FinetuneEpoch]:
    """Step 2: backbone and predictor together under the FLOPs target ``target_flops`` (alpha, per image,
    predictor included). ``predictor_lr`` defaults to 0.1 x ``lr`` (DRNet). Returns per-epoch means."""
    if target_flops <= 0:
        raise InputError(f"target_flops={target_flops!r} must be positive", where="finetune_joint",
                         fix="pass the mean FLOPs per image to aim for, e.g. 0.7 x resolution_costs(gm).backbone_flops[0]")
    parts = dynamic_resolution_parts(gm)
    costs = resolution_costs(gm)
    flops = torch.tensor(costs.backbone_flops)
    predictor_params = [p for p in parts.predictor.parameters() if p.requires_grad]
    optim = optimizer([{"params": [p for p in parts.dispatch.backbone.parameters() if p.requires_grad], "lr": lr},
                       {"params": predictor_params, "lr": 0.1 * lr if predictor_lr is None else predictor_lr}])
    schedule = _cosine(optim, epochs * (_length(batches) or 1))
    gm.train()
    history = []
    with captured_choices(parts) as choices:
        for epoch in range(epochs):
            sums, counts, images = torch.zeros(3, dtype=torch.float64), torch.zeros(len(flops)), 0
            bar = tqdm(batches, total=_length(batches), disable=not progress, leave=False,
                       desc=f"joint fine-tuning {epoch + 1}/{epochs}")
            for x, y in bar:
                choices.clear()
                cross_entropy = F.cross_entropy(gm(x), y)
                choice = choices[-1]
                mean_flops = costs.predictor_flops + (choice @ flops.to(choice.dtype)).mean()
                penalty = torch.relu((mean_flops - target_flops) / costs.spread)
                loss = cross_entropy + eta * penalty
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                schedule.step()
                values = torch.stack([loss, cross_entropy, mean_flops]).detach().double()
                sums += len(x) * values
                counts += choice.detach().sum(0)
                images += len(x)
                bar.set_postfix(loss=f"{values[0]:.3f}", mflops=f"{values[2] / 1e6:.3g}")
            means = (sums / max(images, 1)).tolist()
            history.append(FinetuneEpoch(means[0], means[1], means[2], tuple((counts / max(images, 1)).tolist())))
    gm.eval()
    return history


@dataclass(frozen=True)
class Evaluation:
    """Accuracy and cost of a DRNet on a dataset: the measured share of images at each resolution and the
    mean FLOPs per image they imply (predictor included)."""

    accuracy: float
    shares: tuple[float, ...]
    mean_flops: float
    images: int


@torch.no_grad()
def evaluate(gm: nn.Module, batches: Batches) -> Evaluation:
    """Evaluation-mode accuracy, resolution shares and mean FLOPs per image over ``batches``."""
    parts = dynamic_resolution_parts(gm)
    costs = resolution_costs(gm)
    was_training = gm.training
    gm.eval()
    correct, images, counts = 0, 0, torch.zeros(len(costs.resolutions))
    try:
        with captured_choices(parts) as choices:
            for x, y in batches:
                choices.clear()
                correct += int((gm(x).argmax(1) == y).sum())
                counts += choices[-1].sum(0)
                images += len(x)
    finally:
        gm.train(was_training)
    shares = (counts / max(images, 1)).tolist()
    return Evaluation(correct / max(images, 1), tuple(shares), costs.expected_flops(shares), images)
