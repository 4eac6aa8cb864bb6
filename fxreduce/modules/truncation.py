"""Rank-r truncation of a weight W (out x in) from one eigen-decomposition of a Gram matrix, plain or whitened.

Plain truncation keeps the best rank-r approximation in every unitarily invariant norm (Eckart-Young);
whitened truncation (SVD-LLM's truncation-aware whitening) keeps the rank-r W' that minimises
||(W - W') X||_F for calibration inputs X (columns = samples), given only their second moment
C = X X^T. Both come from the symmetric eigen-decomposition of the smaller Gram matrix instead of a full
SVD of W, so one decomposition serves every rank (the pass's rank allocation reads all of them) and the
truncation error is stated exactly:

- left (out <= in): G = W C W^T (C = I for plain) = U diag(lambda) U^T, and W' = U_r U_r^T W. No inverse of
  C is needed, so a rank-deficient C costs nothing.
- right (out > in): M = W L with C + delta I = L L^T (delta the stated damping; plain: L = I), M^T M =
  V diag(lambda) V^T, and W' = M V_r V_r^T L^-1, applied by a triangular solve.

lambda are the squared singular values of W (plain) or of W L (whitened), so the squared Frobenius or
data error at rank r is the sum of lambda beyond r, and the plain spectral error is sqrt(lambda_{r+1}).
Everything runs in float64 (the Gram squares the condition number).
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_DAMPING = 1e-6


def damping_for(second_moment: Tensor, damping: float) -> float:
    """The absolute ridge delta = damping x the mean diagonal of C (scale-free, stated in reports)."""
    mean = float(second_moment.diagonal().mean()) if second_moment.numel() else 0.0
    return damping * mean if mean > 0 else damping


class Truncation:
    """Every rank's truncation of ``weight``, from one Gram eigen-decomposition (see the module docstring)."""

    def __init__(self, weight: Tensor, second_moment: Tensor | None = None, damping: float = DEFAULT_DAMPING):
        self.weight = weight.detach().double()
        self.dtype = weight.dtype
        m, n = self.weight.shape
        self.second_moment = None if second_moment is None else second_moment.detach().double()
        if self.second_moment is not None and self.second_moment.shape != (n, n):
            raise ValueError(f"second moment {tuple(self.second_moment.shape)} does not fit a weight of in={n}")
        self.side = "left" if m <= n else "right"
        self.delta = 0.0
        self.cholesky = None
        if self.side == "left":
            reference = self.weight if self.second_moment is None else self.weight @ self.second_moment
            gram = reference @ self.weight.T
        else:
            whitened = self.weight
            if self.second_moment is not None:
                self.delta = damping_for(self.second_moment, damping)
                eye = torch.eye(n, dtype=torch.float64, device=self.weight.device)
                self.cholesky = torch.linalg.cholesky(self.second_moment + self.delta * eye)
                whitened = self.weight @ self.cholesky
            self.whitened = whitened
            gram = whitened.T @ whitened
        values, vectors = torch.linalg.eigh((gram + gram.T) / 2)
        self.values = values.flip(0).clamp_min(0.0)
        self.vectors = vectors.flip(1)

    @property
    def max_rank(self) -> int:
        return self.values.numel()

    def squared_error(self, rank: int) -> float:
        """||W - W'||_F^2 (plain) or ||(W - W') L||_F^2 (whitened; = ||(W - W') X||_F^2 on the left side)."""
        return float(self.values[rank:].sum())

    def total(self) -> float:
        return float(self.values.sum())

    def dense(self, rank: int) -> Tensor:
        """W' in float64."""
        second, first = self._factors(rank)
        return second @ first

    def _factors(self, rank: int) -> tuple[Tensor, Tensor]:
        basis = self.vectors[:, :rank]
        if self.side == "left":
            return basis, basis.T @ self.weight
        if self.cholesky is None:
            return self.weight @ basis, basis.T
        first = torch.linalg.solve_triangular(self.cholesky.T, basis, upper=True).T  # V_r^T L^-1
        return self.whitened @ basis, first

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """(A, B), A (out, rank), B (rank, in), A B = W', each rank-one term scaled to equal norms on both
        sides (the factors fine-tune evenly); ranks beyond the Gram's size are padded with zeros."""
        kept = min(rank, self.max_rank)
        second, first = self._factors(kept)
        left, right = second.norm(dim=0), first.norm(dim=1)
        scale = torch.where((left > 0) & (right > 0), (right / left.clamp_min(1e-300)).sqrt(),
                            torch.ones_like(left))
        a = self.weight.new_zeros(self.weight.shape[0], rank)
        b = self.weight.new_zeros(rank, self.weight.shape[1])
        a[:, :kept] = second * scale
        b[:kept] = first / scale[:, None]
        return a.to(self.dtype), b.to(self.dtype)

    def spectral_error(self, rank: int) -> float:
        """||W - W'||_2 exactly: sqrt(lambda_{r+1}) for plain truncation, else from the residual's Gram."""
        if self.second_moment is None:
            return float(self.values[rank].sqrt()) if rank < self.max_rank else 0.0
        return spectral_norm(self.weight - self.dense(rank))


def spectral_norm(matrix: Tensor) -> float:
    """||A||_2 from the eigenvalues of the smaller Gram (float64; cheaper than an SVD)."""
    a = matrix.double()
    gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    if gram.numel() == 0:
        return 0.0
    return float(torch.linalg.eigvalsh((gram + gram.T) / 2)[-1].clamp_min(0.0).sqrt())


def data_error(weight: Tensor, approximation: Tensor, second_moment: Tensor) -> tuple[float, float]:
    """(||(W - W') X||_F, ||W X||_F) from C = X X^T alone: sqrt(tr(D C D^T)), D = W - W'."""
    c = second_moment.double()
    w = weight.double()
    d = w - approximation.double()
    return float(((d @ c) * d).sum().clamp_min(0.0).sqrt()), float(((w @ c) * w).sum().clamp_min(0.0).sqrt())
