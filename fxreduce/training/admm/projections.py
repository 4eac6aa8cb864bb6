"""Euclidean projections onto ADMM-NN's constraint sets: at most k non-zeros, non-zeros on ±q..±nq, or both.

They are pure functions of a tensor, so they are tested against brute force and reused by ``lower_int8``'s
tests; quantization scales keep 17 significant bits, so every level k*q (|k| <= 127) is exact in float32
and ``lower_int8`` turns the result into int8 values times q bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MAX_LEVELS = 127


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
