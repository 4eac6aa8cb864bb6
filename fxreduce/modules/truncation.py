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

Every rank (rank sizing by energy, global allocation) takes the whole eigen-decomposition, in float64
(the Gram squares the condition number). A known rank r takes only the top r + 1 eigenpairs, from
LAPACK's syevr (through scipy; torch has no subset eigensolver), which skips the eigenvectors a full
decomposition spends most of its time on. Plain truncation of a float32 weight at a known rank also runs
in float32 (half the memory traffic of the Gram's reduction to tridiagonal form): the subspace is then
accurate to float32's rounding, which the module's float32 factors carry anyway, and the stated
sqrt(lambda_{r+1}) is restated as the float64 Rayleigh quotient of the (r+1)-th eigenvector (its error is
second order in float32's). Where lambda_{r+1} < FLOAT32_FLOOR x lambda_1, float32's absolute eigenvalue
error (~ eps x lambda_1) would reach 1e-4 of the stated error, so that case runs in float64.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from scipy.linalg.blas import get_blas_funcs
from threadpoolctl import threadpool_limits
from torch import Tensor

DEFAULT_DAMPING = 1e-6
FLOAT32_FLOOR = 1e-3


def damping_for(second_moment: Tensor, damping: float) -> float:
    """The absolute ridge delta = damping x the mean diagonal of C (scale-free, stated in reports)."""
    mean = float(second_moment.diagonal().mean()) if second_moment.numel() else 0.0
    return damping * mean if mean > 0 else damping


class Truncation:
    """Truncations of ``weight`` from one Gram eigen-decomposition (see the module docstring): of every
    rank, or, given ``rank``, of ranks up to ``rank`` (only the top rank + 1 eigenpairs are computed)."""

    def __init__(self, weight: Tensor, second_moment: Tensor | None = None, damping: float = DEFAULT_DAMPING,
                 rank: int | None = None):
        self.dtype = weight.dtype
        m, n = weight.shape
        self.size = min(m, n)
        self.second_moment = None if second_moment is None else second_moment.detach().double()
        if self.second_moment is not None and self.second_moment.shape != (n, n):
            raise ValueError(f"second moment {tuple(self.second_moment.shape)} does not fit a weight of in={n}")
        self.side = "left" if m <= n else "right"
        self.count = self.size if rank is None else min(rank + 1, self.size)
        in_float32 = self.count < self.size and second_moment is None and weight.dtype == torch.float32
        self._decompose(weight.detach(), torch.float32 if in_float32 else torch.float64, damping)
        if in_float32 and self.count > 1 and float(self.values[self.count - 1]) < FLOAT32_FLOOR * float(self.values[0]):
            self._decompose(weight.detach(), torch.float64, damping)

    def _decompose(self, weight: Tensor, dtype: torch.dtype, damping: float) -> None:
        self.weight = weight.to(dtype)
        n = weight.shape[1]
        self.delta = 0.0
        self.cholesky = None
        if self.side == "left" and self.second_moment is not None:
            gram = self.weight @ self.second_moment @ self.weight.T
        elif self.side == "left":
            gram = _gram(self.weight.T)
        else:
            whitened = self.weight
            if self.second_moment is not None:
                self.delta = damping_for(self.second_moment, damping)
                eye = torch.eye(n, dtype=torch.float64, device=self.weight.device)
                self.cholesky = torch.linalg.cholesky(self.second_moment + self.delta * eye)
                whitened = self.weight @ self.cholesky
            self.whitened = whitened
            gram = _gram(whitened)
        self.trace = float(gram.diagonal().double().sum())
        if self.count == self.size:
            values, vectors = torch.linalg.eigh(gram, UPLO="U")
            values, vectors = values.flip(0), vectors.flip(1)
        else:
            values, vectors = _top_eigenpairs(gram, self.count)
        self.values = values.double().clamp_min(0.0)
        self.vectors = vectors.to(dtype)

    @property
    def max_rank(self) -> int:
        return self.size

    def squared_error(self, rank: int) -> float:
        """||W - W'||_F^2 (plain) or ||(W - W') L||_F^2 (whitened; = ||(W - W') X||_F^2 on the left side)."""
        if self.count == self.size:
            return float(self.values[rank:].sum())
        self._check_rank(rank)
        return max(self.trace - float(self.values[:rank].sum()), 0.0)

    def total(self) -> float:
        return self.trace

    def relative_frobenius_error(self, rank: int) -> float:
        """||W - W'||_F / ||W||_F (plain: from the eigenvalues, ||W||_F^2 being the Gram's trace; whitened:
        from W' itself)."""
        if self.second_moment is None:
            return (self.squared_error(rank) / self.trace) ** 0.5 if self.trace > 0 else 0.0
        weight = self.weight.double()
        norm = float(weight.norm())
        return float((weight - self.dense(rank)).norm()) / norm if norm > 0 else 0.0

    def _check_rank(self, rank: int) -> None:
        if rank >= self.count and self.count < self.size:
            raise ValueError(f"rank {rank} is beyond the {self.count - 1} this truncation was made for")

    def dense(self, rank: int) -> Tensor:
        """W' in float64."""
        second, first = self._factors(rank)
        return (second @ first).double()

    def _factors(self, rank: int) -> tuple[Tensor, Tensor]:
        self._check_rank(rank)
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
        a = second.new_zeros(self.weight.shape[0], rank)
        b = second.new_zeros(rank, self.weight.shape[1])
        a[:, :kept] = second * scale
        b[:kept] = first / scale[:, None]
        return a.to(self.dtype), b.to(self.dtype)

    def spectral_error(self, rank: int) -> float:
        """||W - W'||_2 exactly: sqrt(lambda_{r+1}) for plain truncation, else from the residual's Gram."""
        if rank >= self.max_rank:
            return 0.0
        if self.second_moment is not None:
            return spectral_norm(self.weight.double() - self.dense(rank))
        self._check_rank(rank)
        if self.vectors.dtype == torch.float64:
            return float(self.values[rank].sqrt())
        return self._rayleigh_error(rank)

    def _rayleigh_error(self, rank: int) -> float:
        """sqrt of the float64 Rayleigh quotient of the (r+1)-th eigenvector, made orthogonal to the first r:
        ||W - W'|| along it, which equals sigma_{r+1} to second order in the float32 eigenvector's error."""
        basis = self.vectors[:, :rank].double()
        vector = self.vectors[:, rank].double()
        vector = vector - basis @ (basis.T @ vector)
        vector = vector / vector.norm()
        weight = self.weight.double()
        image = vector @ weight if self.side == "left" else weight @ vector
        return float(image.norm())


def _gram(a: Tensor) -> Tensor:
    """a^T a in the upper triangle (the lower may not hold it), by BLAS's syrk on CPU: half the multiply-adds
    of a general product."""
    if a.device.type != "cpu" or a.dtype not in (torch.float32, torch.float64) or a.numel() == 0:
        return a.T @ a
    rows = a.detach().numpy()
    syrk = get_blas_funcs("syrk", (rows,))
    with threadpool_limits(torch.get_num_threads(), user_api="blas"):
        upper = syrk(1.0, np.asfortranarray(rows), trans=1)  # copied only where not column-major
    return torch.from_numpy(upper)


def _top_eigenpairs(gram: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The ``count`` largest eigenvalues (descending) of a symmetric matrix given by its upper triangle, and
    their eigenvectors, by LAPACK's syevr, which computes only those eigenvectors."""
    n = gram.shape[0]
    with threadpool_limits(torch.get_num_threads(), user_api="blas"):
        values, vectors = scipy.linalg.eigh(gram.cpu().numpy(), lower=False, subset_by_index=[n - count, n - 1],
                                            driver="evr", overwrite_a=True)
    return (torch.from_numpy(values[::-1].copy()).to(gram.device),
            torch.from_numpy(vectors[:, ::-1].copy()).to(gram.device))


def spectral_norm(matrix: Tensor) -> float:
    """||A||_2 from the eigenvalues of the smaller Gram (float64; cheaper than an SVD)."""
    a = matrix.double()
    gram = _gram(a.T) if a.shape[0] <= a.shape[1] else _gram(a)
    if gram.numel() == 0:
        return 0.0
    return float(torch.linalg.eigvalsh(gram, UPLO="U")[-1].clamp_min(0.0).sqrt())


def data_error(weight: Tensor, approximation: Tensor, second_moment: Tensor) -> tuple[float, float]:
    """(||(W - W') X||_F, ||W X||_F) from C = X X^T alone: sqrt(tr(D C D^T)), D = W - W'."""
    c = second_moment.double()
    w = weight.double()
    d = w - approximation.double()
    return float(((d @ c) * d).sum().clamp_min(0.0).sqrt()), float(((w @ c) * w).sum().clamp_min(0.0).sqrt())
