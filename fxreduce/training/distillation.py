"""Knowledge distillation: fine-tune a compressed student against the uncompressed teacher (AntMan's recipe).

loss = a * CE(student, labels) + b * T^2 * KL(teacher_T || student_T) + c * MSE(student logits, teacher logits)

where ``x_T`` is softmax(logits / T). The T^2 keeps the soft term's gradient on the scale of the hard
one as T grows (Hinton et al.). Logits of any shape (..., classes) are flattened to rows, so sequence
models (N, T, vocabulary) work as they are. Every term is a mean over rows, so under
DistributedDataParallel (which averages gradients over ranks) equal shards give the gradient of the
whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import InputError


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
                      ce_weight: float = 0.5, kd_weight: float = 0.5, mse_weight: float = 0.0,
                      temperature: float = 2.0) -> Tensor:
    """a * CE(labels) + b * T^2 * KL(teacher_T || student_T) + c * MSE(logits), each a mean over rows."""
    if student_logits.shape != teacher_logits.shape:
        raise InputError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape", where="distillation_loss",
                         fix="distil a student whose output matches its teacher's")
    if not temperature > 0:
        raise InputError(f"temperature must be > 0, got {temperature}", where="distillation_loss")
    student = student_logits.flatten(0, -2)
    teacher = teacher_logits.detach().flatten(0, -2)
    loss = student.new_zeros(())
    if ce_weight:
        if labels is None:
            raise InputError("ce_weight > 0 needs labels", where="distillation_loss",
                             fix="pass the labels, or set ce_weight=0 for pure distillation")
        loss = loss + ce_weight * F.cross_entropy(student, labels.flatten())
    if kd_weight:
        kl = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                      reduction="batchmean", log_target=True)
        loss = loss + kd_weight * temperature ** 2 * kl
    if mse_weight:
        loss = loss + mse_weight * F.mse_loss(student, teacher)
    return loss


@dataclass
class DistillationLoss:
    """:func:`distillation_loss` with its weights fixed: ``loss(student_logits, teacher_logits, labels)``."""

    ce_weight: float = 0.5
    kd_weight: float = 0.5
    mse_weight: float = 0.0
    temperature: float = 2.0

    def __post_init__(self) -> None:
        weights = (self.ce_weight, self.kd_weight, self.mse_weight)
        if any(w < 0 for w in weights) or not any(weights):
            raise InputError(f"weights {weights} must be >= 0 and not all zero", where="DistillationLoss")
        if not self.temperature > 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}", where="DistillationLoss")

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None) -> Tensor:
        return distillation_loss(student_logits, teacher_logits, labels, ce_weight=self.ce_weight,
                                 kd_weight=self.kd_weight, mse_weight=self.mse_weight, temperature=self.temperature)


def distill(student: nn.Module, teacher: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
            optimizer: torch.optim.Optimizer, *, loss: DistillationLoss | Callable | None = None,
            epochs: int = 1, clip: float | None = None, progress: bool = True, description: str = "distil") -> list[float]:
    """Train ``student`` (plain or wrapped in DistributedDataParallel) against ``teacher`` (run in eval
    mode without gradients) on ``(inputs, labels)`` batches; returns the mean loss of each epoch.

    ``batches`` is re-iterated each epoch (a list, a DataLoader, or a callable ``epoch -> iterable`` for
    fresh shuffles). ``loss(student_logits, teacher_logits, labels)`` defaults to ``DistillationLoss()``;
    ``clip`` clips the gradient norm before each step.
    """
    loss = DistillationLoss() if loss is None else loss
    teacher_was_training = teacher.training
    teacher.eval()
    student.train()
    means = []
    try:
        for epoch in range(epochs):
            data = batches(epoch) if callable(batches) else batches
            total, count = 0.0, 0
            for inputs, labels in tqdm(data, desc=f"{description} {epoch + 1}/{epochs}", disable=not progress,
                                       leave=False):
                with torch.no_grad():
                    teacher_logits = teacher(inputs)
                value = loss(student(inputs), teacher_logits, labels)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                if clip is not None:
                    nn.utils.clip_grad_norm_(student.parameters(), clip)
                optimizer.step()
                total, count = total + float(value.detach()), count + 1
            means.append(total / max(count, 1))
    finally:
        teacher.train(teacher_was_training)
    return means
