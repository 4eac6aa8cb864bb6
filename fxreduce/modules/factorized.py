"""AntMan's compression modules for a Linear map ``W`` (out x in): low-rank, grouped, and their compositions.

Every module computes ``x @ W'^T + b`` for a structured ``W'`` without ever forming it at run time:

| module | W' | MACs per input row |
|---|---|---|
| ``LowRankLinear(r)`` | ``U V``, V (r, in), U (out, r) | r (in + out) |
| ``GroupLinear(g)`` | block-diagonal, g blocks (out/g, in/g), optionally shuffled outputs | in out / g |
| ``SparseLowRankLinear("sparse_lr")`` | ``U V``, V block-diagonal | in r / g + out r |
| ``SparseLowRankLinear("lr_sparse")`` | ``U V``, U block-diagonal | in r + out r / g |
| ``SparseLowRankLinear("grouped_shuffle")`` | both block-diagonal, r channels shuffled between | (in + out) r / g |

The group products run as one batched GEMM that reads and writes its blocks in place. Each module
states its MACs and parameter count (``fxreduce_macs``, ``count_params``), multiplies back out to an
``nn.Linear`` (``to_dense``), and is built from a dense weight by truncated SVD (``from_linear``; per
block for grouped factors). ``LowRankLinear`` also gives the decomposed LSTM its two GEMM factors, so a
low-rank gate projection runs on the LSTM's fused kernels; the grouped modules run there through its
per-step autograd path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..errors import OptionError
from .lowrank_kernel import grouped_serves, lowrank_linear
from .truncation import DEFAULT_DAMPING, Truncation, damping_for

FORMS = ("lr", "group", "sparse_lr", "lr_sparse", "grouped_shuffle")


def macs_per_row(form: str, in_features: int, out_features: int, rank, groups: int = 1):
    """Multiply-adds per input row of ``form``; ``rank`` may be a sympy symbol (the pass solves for it)."""
    n, m, g = in_features, out_features, groups

    def div(a, b):
        return a // b if isinstance(a, int) else a / b

    formulas = {
        "dense": lambda: m * n,
        "lr": lambda: rank * (n + m),
        "group": lambda: m * n // g,
        "sparse_lr": lambda: div(n * rank, g) + m * rank,
        "lr_sparse": lambda: n * rank + div(m * rank, g),
        "grouped_shuffle": lambda: div((n + m) * rank, g),
    }
    if form not in formulas:
        raise OptionError(f"unknown factorised form {form!r}", where="fxreduce.modules.factorized",
                          fix=f"choose one of {', '.join(FORMS)}")
    return formulas[form]()


def _rows(shape) -> object:
    rows = 1
    for size in shape[:-1]:
        rows = rows * size
    return rows


def _check_divides(groups: int, sizes: dict[str, int], where: str) -> None:
    if not isinstance(groups, int) or groups < 1:
        raise OptionError(f"groups must be a positive int, got {groups!r}", where=where)
    for name, size in sizes.items():
        if size % groups:
            raise OptionError(f"groups={groups} does not divide {name}={size}", where=where,
                              fix=f"choose groups among the common divisors of {', '.join(sizes)}")


def _truncated_svd(weight: Tensor, rank: int, second_moment: Tensor | None = None,
                   damping: float = DEFAULT_DAMPING) -> tuple[Tensor, Tensor]:
    """(A, B) with A (m, rank), B (rank, n) and A B the best rank-``rank`` approximation of ``weight``
    (plain, or on inputs with second moment ``second_moment`` when given); ranks beyond min(m, n) are
    padded with zeros."""
    return Truncation(weight, second_moment, damping, rank).factors(rank)


def _dense_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _weight_and_bias(source: nn.Linear | Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if isinstance(source, nn.Linear):
        return source.weight.detach(), None if source.bias is None else source.bias.detach()
    return source.detach(), None if bias is None else bias.detach()


def _blocks(matrix: Tensor, groups: int) -> Tensor:
    """(rows, groups * width) -> its (groups, rows, width) view: column block i as batch entry i, no copy.
    The matrix may be stored row-major or column-major (see :func:`_gemm_operand`)."""
    rows, columns = matrix.shape
    row_stride, column_stride = matrix.stride()
    width = columns // groups
    return matrix.as_strided((groups, rows, width), (width * column_stride, row_stride, column_stride),
                             matrix.storage_offset())


def _gemm_operand(matrix: Tensor) -> Tensor:
    """``matrix`` (2-D) itself if BLAS can read it in place (row- or column-major), else a contiguous copy."""
    rows, columns = matrix.shape
    row_stride, column_stride = matrix.stride()
    if (column_stride == 1 and row_stride >= columns) or (row_stride == 1 and column_stride >= rows):
        return matrix
    return matrix.contiguous()


def _block_diagonal(x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    """``x W^T + b`` for the block-diagonal W stored as ``weight`` (g, out/g, in/g): one batched GEMM that reads
    and writes the column blocks of plain (rows, features) matrices in place, through strided views that
    BLAS takes as a leading dimension, with the bias in the GEMM's accumulator: no transposing copies and
    no separate bias pass, which bmm on transposed copies would need (docs/benchmarks.md, "Design
    measurements").

    With ``transposed`` it computes y^T = W x^T block by block into an (out, rows) matrix and returns y as
    its transpose: for a few outputs per block (a factor feeding another GEMM, which reads either layout)
    MKL's kernel for that orientation is the faster one.
    """
    groups, width = weight.shape[:2]
    if transposed:
        y_t = x.new_empty(groups * width, x.shape[0])
        out, left, right = y_t.view(groups, width, -1), weight, _blocks(x, groups).transpose(1, 2)
        bias_blocks = None if bias is None else bias.view(groups, -1, 1)
    else:
        y = x.new_empty(x.shape[0], groups * width)
        out, left, right = _blocks(y, groups), _blocks(x, groups), weight.transpose(1, 2)
        bias_blocks = None if bias is None else bias.view(groups, 1, -1)
    if bias_blocks is None:
        torch.bmm(left, right, out=out)
    else:
        out.copy_(bias_blocks.expand_as(out))
        torch.baddbmm(out, left, right, out=out)
    return y_t.t() if transposed else y


def _shuffle_columns(y: Tensor, groups: int) -> Tensor:
    """Block i's output k moves to column k * groups + i (ShuffleNet's channel shuffle), copying along the
    dimension ``y`` is contiguous in (a column-major ``y`` stays column-major)."""
    rows = y.shape[0]
    if y.stride(0) == 1:
        return y.t().reshape(groups, -1, rows).transpose(0, 1).reshape(-1, rows).t()
    return y.reshape(rows, groups, -1).transpose(1, 2).reshape(rows, -1)


class _BlockDiagonalLinear(torch.autograd.Function):
    """:func:`_block_diagonal` with its own backward: one batched GEMM for each gradient, on the same views."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _block_diagonal(x, weight, bias, transposed)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        groups = weight.shape[0]
        grad = grad.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = x.new_empty(x.shape)
            torch.bmm(_blocks(grad, groups), weight, out=_blocks(grad_x, groups))
        if ctx.needs_input_grad[1]:
            grad_weight = torch.bmm(_blocks(grad, groups).transpose(1, 2), _blocks(x, groups))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias, None


class LowRankLinear(nn.Module):
    """``y = U (V x) + b``: two GEMMs through a rank-r bottleneck, r (in + out) MACs per row."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if not isinstance(rank, int) or not 0 < rank <= min(in_features, out_features):
            raise OptionError(f"rank must be an int in 1..min(in, out) = {min(in_features, out_features)}, "
                              f"got {rank!r}", where=f"LowRankLinear({in_features} -> {out_features})")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.second = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        nn.init.kaiming_uniform_(self.first, a=5 ** 0.5)
        nn.init.kaiming_uniform_(self.second, a=5 ** 0.5)

    @classmethod
    def from_linear(cls, source: nn.Linear | Tensor, rank: int, bias: Tensor | None = None,
                    second_moment: Tensor | None = None, damping: float = DEFAULT_DAMPING) -> "LowRankLinear":
        """Truncated SVD of the weight (``W ~ (P sqrt(S)) (sqrt(S) Q^T)``), whitened by the inputs' second
        moment X X^T when given (the rank-r W' closest on those inputs); the bias is copied."""
        weight, bias = _weight_and_bias(source, bias)
        return cls.from_truncation(Truncation(weight, second_moment, damping, rank), rank, bias)

    @classmethod
    def from_truncation(cls, truncation: Truncation, rank: int, bias: Tensor | None = None) -> "LowRankLinear":
        """The rank-``rank`` factors of an existing decomposition (one decomposition serves every rank)."""
        weight = truncation.weight
        module = cls(weight.shape[1], weight.shape[0], rank, bias is not None, weight.device, truncation.dtype)
        second, first = truncation.factors(rank)
        with torch.no_grad():
            module.first.copy_(first)
            module.second.copy_(second)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def forward(self, x: Tensor) -> Tensor:
        """The fused native product for CPU inference from ``lowrank_kernel.MIN_ROWS`` rows, two GEMMs elsewhere."""
        return lowrank_linear(x, self.first, self.second, self.bias)

    def gemm_factors(self) -> tuple[list[Tensor], Tensor | None]:
        """[V, U] and the bias: the decomposed LSTM's fast path multiplies by them directly."""
        return [self.first, self.second], self.bias

    def dense_weight(self) -> Tensor:
        return self.second @ self.first

    def to_dense(self) -> nn.Linear:
        return _dense_linear(self.dense_weight().detach(), None if self.bias is None else self.bias.detach())

    @staticmethod
    def count_params(in_features: int, out_features: int, rank: int, bias: bool = True) -> int:
        return rank * (in_features + out_features) + (out_features if bias else 0)

    def fxreduce_macs(self, input_shapes, training: bool = False) -> dict[str, object]:
        rows = _rows(input_shapes[0])
        passes = 3 if training else 1  # forward; input- and weight-gradient GEMMs
        return {"V": passes * rows * (self.rank * self.in_features),
                "U": passes * rows * (self.out_features * self.rank)}

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.rank} -> {self.out_features}, bias={self.bias is not None}"


class GroupLinear(nn.Module):
    """Block-diagonal Linear: input and output split into ``groups`` slices, slice i of the output reads
    only slice i of the input (one batched GEMM, in out / g MACs per row).

    With ``shuffle`` the outputs leave interleaved (ShuffleNet's channel shuffle): output k of group i
    lands at position k * groups + i, so a following grouped layer sees every group.
    """

    def __init__(self, in_features: int, out_features: int, groups: int, bias: bool = True, shuffle: bool = False,
                 device=None, dtype=None):
        super().__init__()
        _check_divides(groups, {"in_features": in_features, "out_features": out_features},
                       f"GroupLinear({in_features} -> {out_features})")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.groups, self.shuffle = in_features, out_features, groups, shuffle
        self.weight = nn.Parameter(torch.empty(groups, out_features // groups, in_features // groups, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.transposed_output = False
        for block in self.weight.data:
            nn.init.kaiming_uniform_(block, a=5 ** 0.5)

    @classmethod
    def from_linear(cls, source: nn.Linear | Tensor, groups: int, bias: Tensor | None = None,
                    shuffle: bool = False, second_moment: Tensor | None = None,
                    damping: float = DEFAULT_DAMPING) -> "GroupLinear":
        """The diagonal blocks of the weight (of its un-shuffled rows): the closest block-diagonal matrix.
        Given the inputs' second moment C = X X^T, block i is instead the least-squares fit on those
        inputs, W_i C[:, B_i] (C[B_i, B_i] + delta I)^-1 (delta the stated damping): it absorbs what the
        dropped blocks contributed through inputs correlated with its own."""
        weight, bias = _weight_and_bias(source, bias)
        module = cls(weight.shape[1], weight.shape[0], groups, bias is not None, shuffle, weight.device, weight.dtype)
        out_block, in_block = weight.shape[0] // groups, weight.shape[1] // groups
        if shuffle:
            weight = weight.reshape(out_block, groups, -1).transpose(0, 1).reshape(weight.shape)
        with torch.no_grad():
            for i in range(groups):
                rows, cols = slice(i * out_block, (i + 1) * out_block), slice(i * in_block, (i + 1) * in_block)
                block = weight[rows, cols]
                if second_moment is not None:
                    c = second_moment.double()
                    own = c[cols, cols]
                    ridge = damping_for(own, damping) * torch.eye(in_block, dtype=torch.float64, device=c.device)
                    block = torch.linalg.solve(own + ridge, (weight[rows].double() @ c[:, cols]).T).T
                module.weight[i].copy_(block)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def forward(self, x: Tensor) -> Tensor:
        rows = _gemm_operand(x.reshape(-1, self.in_features))
        bias = self.bias
        if self.shuffle and bias is not None:
            bias = bias.view(-1, self.groups).t().reshape(-1)  # output k * groups + i is block i's output k
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (rows, self.weight, bias)):
            y = _BlockDiagonalLinear.apply(rows, self.weight, bias, self.transposed_output)
        elif not self.shuffle and grouped_serves(rows, None, self.weight, bias):
            y = torch.ops.fxreduce.grouped_lowrank_linear(rows, None, self.weight, bias, False)
        else:
            y = _block_diagonal(rows, self.weight, bias, self.transposed_output)  # inference: no autograd node
        if self.shuffle:
            y = _shuffle_columns(y, self.groups)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> Tensor:
        dense = torch.block_diag(*self.weight)
        if self.shuffle:
            dense = dense.view(self.groups, -1, self.in_features).transpose(0, 1).reshape(dense.shape)
        return dense

    def to_dense(self) -> nn.Linear:
        return _dense_linear(self.dense_weight().detach(), None if self.bias is None else self.bias.detach())

    @staticmethod
    def count_params(in_features: int, out_features: int, groups: int, bias: bool = True) -> int:
        return in_features * out_features // groups + (out_features if bias else 0)

    def fxreduce_macs(self, input_shapes, training: bool = False) -> dict[str, object]:
        passes = 3 if training else 1
        return {"blocks": passes * _rows(input_shapes[0]) * (self.in_features * self.out_features // self.groups)}

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.out_features}, groups={self.groups}, bias={self.bias is not None}, "
                f"shuffle={self.shuffle}")


class SparseLowRankLinear(nn.Module):
    """``y = U (V x) + b`` with one or both factors block-diagonal (``groups`` blocks), AntMan's
    compositions of structured sparsity and low rank:

    - ``"sparse_lr"``: V grouped, U dense;
    - ``"lr_sparse"``: V dense, U grouped;
    - ``"grouped_shuffle"``: both grouped, the r bottleneck channels shuffled between them so that each
      output group reads every input group.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, groups: int, form: str = "grouped_shuffle",
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        where = f"SparseLowRankLinear({form}, {in_features} -> {out_features})"
        if form not in ("sparse_lr", "lr_sparse", "grouped_shuffle"):
            raise OptionError(f"form must be 'sparse_lr', 'lr_sparse' or 'grouped_shuffle', got {form!r}", where=where)
        if not isinstance(rank, int) or not 0 < rank <= min(in_features, out_features):
            raise OptionError(f"rank must be an int in 1..min(in, out) = {min(in_features, out_features)}, "
                              f"got {rank!r}", where=where)
        sizes = {"rank": rank}
        if form != "lr_sparse":
            sizes["in_features"] = in_features
        if form != "sparse_lr":
            sizes["out_features"] = out_features
        _check_divides(groups, sizes, where)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank, self.groups, self.form = (
            in_features, out_features, rank, groups, form)
        if form == "lr_sparse":
            self.first = nn.Linear(in_features, rank, bias=False, **factory)
        else:
            self.first = GroupLinear(in_features, rank, groups, bias=False, shuffle=form == "grouped_shuffle", **factory)
            self.first.transposed_output = True  # its few outputs only feed the second GEMM, which reads either layout
        if form == "sparse_lr":
            self.second = nn.Linear(rank, out_features, bias=bias, **factory)
        else:
            self.second = GroupLinear(rank, out_features, groups, bias=bias, **factory)

    @classmethod
    def from_linear(cls, source: nn.Linear | Tensor, rank: int, groups: int, form: str = "grouped_shuffle",
                    bias: Tensor | None = None, second_moment: Tensor | None = None,
                    damping: float = DEFAULT_DAMPING) -> "SparseLowRankLinear":
        """Truncated SVD per block: of each column block of W (sparse_lr), each row block (lr_sparse), or,
        with both grouped, of each block W_ij at the rank the shuffle routes from input group j to output
        group i. Given the inputs' second moment, each block is whitened by the statistics of the inputs it
        reads: all of them for a row block (lr_sparse, whose data error splits over row blocks, so the
        whitened result is the optimum of that form), input group j's own for a column block."""
        def moment(cols: slice) -> Tensor | None:
            return None if second_moment is None else second_moment[cols, cols]

        weight, bias = _weight_and_bias(source, bias)
        m, n = weight.shape
        module = cls(n, m, rank, groups, form, bias is not None, weight.device, weight.dtype)
        g, width = groups, rank // groups
        first = torch.zeros(rank, n, dtype=weight.dtype, device=weight.device)
        second = torch.zeros(m, rank, dtype=weight.dtype, device=weight.device)
        if form == "sparse_lr":
            for j in range(g):
                cols = slice(j * n // g, (j + 1) * n // g)
                a, b = _truncated_svd(weight[:, cols], width, moment(cols), damping)
                second[:, j * width:(j + 1) * width], first[j * width:(j + 1) * width, cols] = a, b
        elif form == "lr_sparse":
            for i in range(g):
                rows = slice(i * m // g, (i + 1) * m // g)
                a, b = _truncated_svd(weight[rows], width, moment(slice(None)), damping)
                second[rows, i * width:(i + 1) * width], first[i * width:(i + 1) * width] = a, b
        else:
            # The shuffle sends V's channel k of input group j to position k*g + j, read by output group
            # (k*g + j) // width; ``first`` below is in shuffled order, so position p is V's output p.
            for i in range(g):
                rows = slice(i * m // g, (i + 1) * m // g)
                for j in range(g):
                    positions = [p for p in range(i * width, (i + 1) * width) if p % g == j]
                    if not positions:
                        continue
                    cols = slice(j * n // g, (j + 1) * n // g)
                    a, b = _truncated_svd(weight[rows, cols], len(positions), moment(cols), damping)
                    second[rows, positions] = a
                    first[positions, cols] = b
        with torch.no_grad():
            for part, dense in ((module.first, first), (module.second, second)):
                if isinstance(part, GroupLinear):
                    if part.shuffle:  # undo the shuffle: block row (group j, k) sits at position k*g + j
                        dense = dense.view(-1, g, dense.shape[1]).transpose(0, 1).reshape(dense.shape)
                    blocks_out, blocks_in = dense.shape[0] // g, dense.shape[1] // g
                    for i in range(g):
                        part.weight[i].copy_(dense[i * blocks_out:(i + 1) * blocks_out,
                                                   i * blocks_in:(i + 1) * blocks_in])
                else:
                    part.weight.copy_(dense)
            if bias is not None:
                module.second.bias.copy_(bias)
        return module

    def forward(self, x: Tensor) -> Tensor:
        """Both factors in one fused native op for CPU inference (``lowrank_kernel.GROUPED_MIN_ROWS`` rows and
        more), each factor's own module elsewhere (training keeps their batched GEMMs and backward)."""
        rows = x.reshape(-1, self.in_features)
        first, second = (part.weight if isinstance(part, GroupLinear) else part.weight.unsqueeze(0)
                         for part in (self.first, self.second))
        if grouped_serves(rows, first, second, self.bias):
            shuffle = self.form == "grouped_shuffle"
            y = torch.ops.fxreduce.grouped_lowrank_linear(rows, first, second, self.bias, shuffle)
        else:
            y = self.second(self.first(rows))
        return y.view(*x.shape[:-1], self.out_features)

    @property
    def bias(self) -> Tensor | None:
        return self.second.bias

    def dense_weight(self) -> Tensor:
        return self._dense(self.second) @ self._dense(self.first)

    @staticmethod
    def _dense(part: nn.Module) -> Tensor:
        return part.dense_weight() if isinstance(part, GroupLinear) else part.weight

    def to_dense(self) -> nn.Linear:
        return _dense_linear(self.dense_weight().detach(), None if self.bias is None else self.bias.detach())

    @staticmethod
    def count_params(in_features: int, out_features: int, rank: int, groups: int, form: str,
                     bias: bool = True) -> int:
        return int(macs_per_row(form, in_features, out_features, rank, groups)) + (out_features if bias else 0)

    def fxreduce_macs(self, input_shapes, training: bool = False) -> dict[str, object]:
        rows = _rows(input_shapes[0])
        passes = 3 if training else 1
        g_first = 1 if self.form == "lr_sparse" else self.groups
        g_second = 1 if self.form == "sparse_lr" else self.groups
        return {"V": passes * rows * (self.in_features * self.rank // g_first),
                "U": passes * rows * (self.out_features * self.rank // g_second)}

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.rank} -> {self.out_features}, form={self.form!r}, "
                f"groups={self.groups}, bias={self.bias is not None}")


def factorize(source: nn.Linear | Tensor, form: str, rank: int | None = None, groups: int = 1,
              bias: Tensor | None = None, second_moment: Tensor | None = None,
              damping: float = DEFAULT_DAMPING) -> nn.Module:
    """The module of ``form`` initialised from a dense weight (truncated SVD, per block where grouped),
    whitened by the inputs' second moment X X^T when given."""
    if form == "lr":
        return LowRankLinear.from_linear(source, rank, bias, second_moment, damping)
    if form == "group":
        return GroupLinear.from_linear(source, groups, bias, second_moment=second_moment, damping=damping)
    return SparseLowRankLinear.from_linear(source, rank, groups, form, bias, second_moment, damping)
