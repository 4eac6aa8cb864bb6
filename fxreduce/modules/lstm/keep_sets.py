"""Keep sets: the units a batch-shared dropout mask keeps, per sequence or per time step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class KeepSet:
    """The units a batch-shared dropout mask keeps: the same for every sample of the batch.

    ``index`` holds the kept unit numbers, shape ``(k,)`` for one set per sequence or ``(T, k)`` for a
    set per time step (row t applies to the step that reads ``x[t]``); kept units are multiplied by
    ``scale`` (1/(1-p)), all others by 0. Indices must be distinct within a set.
    """

    index: Tensor
    scale: float = 1.0
    order: Tensor | None = None
    offsets: Tensor | None = None

    @classmethod
    def windows(cls, order: Tensor, offsets: Tensor, k: int, scale: float = 1.0) -> "KeepSet":
        """Per-step sets that are cyclic windows of k units in one ordering of the units: row t keeps
        ``order[(offsets[t] + j) % width]`` for j < k. The fast path then reads each step's weight columns
        as a slice of the weight permuted once, instead of gathering them per step."""
        doubled = torch.cat([order, order[: k - 1]])
        index = doubled[offsets[:, None] + torch.arange(k)]
        return cls(index, scale, doubled, offsets)

    @property
    def per_step(self) -> bool:
        return self.index.dim() == 2

    @property
    def size(self) -> int:
        """k, the number of kept units (per step for per-step sets)."""
        return self.index.shape[-1]

    def mask(self, width: int, like: Tensor) -> Tensor:
        """The dense 0/scale mask this set stands for: ``(width,)``, or ``(T, 1, width)`` per step."""
        index = self.index.to(like.device)
        if self.per_step:
            mask = like.new_zeros(index.shape[0], width)
            return mask.scatter_(1, index, self.scale).unsqueeze(1)
        return like.new_zeros(width).index_fill_(0, index, self.scale)
